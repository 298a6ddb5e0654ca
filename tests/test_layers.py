"""The layers of the house: the averages used by hand know nothing of the trainer, and modules stay small.

``emakit.ema`` (EMA by hand), ``emakit.posthoc``, ``emakit.shadow`` and ``emakit.storage`` import nothing
of ``emakit.core``, ``emakit.trainer``, ``emakit.loggers`` or the trainer's adapters (``emakit.algorithms``)
when they are loaded; the adapters are imported lazily, by ``as_algorithm()``, when a Trainer runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "emakit"
BY_HAND = ["ema", "posthoc", "shadow", "storage", "deprecated.py", "tracked.py", "average_module.py", "export.py"]
TRAINER_SIDE = ("emakit.core", "emakit.trainer", "emakit.loggers", "emakit.algorithms")
MAX_LINES = 400
SPLIT = ["ema", "posthoc", "shadow", "storage", "algorithms", "core", "trainer"]  # the packages kept under MAX_LINES


def modules(names: list[str]) -> list[Path]:
    found = []
    for name in names:
        path = SOURCE / name
        found += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return found


def imports_at_load(path: Path) -> list[str]:
    """The modules ``path`` imports when it is loaded: top-level imports, not those inside functions or under
    ``if TYPE_CHECKING:``."""
    names = []
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


@pytest.mark.parametrize("path", modules(BY_HAND), ids=lambda p: str(p.relative_to(SOURCE)))
def test_the_averages_by_hand_import_nothing_of_the_trainer(path: Path) -> None:
    trainer_side = [name for name in imports_at_load(path) if name.startswith(TRAINER_SIDE)]
    assert trainer_side == [], f"{path.relative_to(SOURCE)} imports {trainer_side} when it is loaded"


@pytest.mark.parametrize("path", modules(SPLIT), ids=lambda p: str(p.relative_to(SOURCE)))
def test_modules_of_the_averages_and_their_adapters_stay_under_400_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SOURCE)} has {lines} lines: split it along a seam"
