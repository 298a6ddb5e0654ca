"""README's "Coming from another library" table: every row's emakit code runs, as the table says to use it.

The first code cell runs once, the second after every optimizer step of a short training loop, the third at the end;
then the EMA the row built must have counted every optimizer step, and (rows without a start or warmup) hold the
float64 closed form of its smoothing. The hidden setup is a model, its loop and ``evaluate(model)``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from closed_form import ClosedForm
from torch import nn

from emakit import EMA

README = Path(__file__).resolve().parents[1] / "README.md"
STEPS = 120  # past the ema-pytorch row's start (step 100)


def rows() -> list[tuple[str, list[str]]]:
    text = README.read_text(encoding="utf-8")
    table = text[text.index("<!-- coming-from -->") : text.index("<!-- /coming-from -->")]
    found = []
    for line in table.splitlines()[3:]:  # the marker, the header, the rule
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        code = ["\n".join(re.findall(r"`([^`]+)`", cell)) for cell in cells[2:]]
        found.append((cells[0], code))
    return found


@pytest.mark.parametrize(("peer", "code"), rows(), ids=[peer for peer, _ in rows()])
def test_each_row_of_coming_from_runs_and_averages(peer: str, code: list[str]) -> None:
    if peer == "Lightning":
        pytest.importorskip("lightning")
    assert len(code) == 3, f"{peer}: three emakit cells (once, each step, at the end)"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 4)

    def evaluate(module: nn.Module) -> float:
        with torch.no_grad():
            return float(module(x).square().mean())

    names = {"model": model, "x": x, "evaluate": evaluate, "torch": torch}
    exec(
        "from emakit import EMA\nfrom emakit.integrations.lightning import EMACallback\n"
        if peer == "Lightning"
        else "from emakit import EMA",
        names,
    )
    if peer == "Lightning":
        exec("from lightning.pytorch import Trainer", names)
    exec(code[0], names)
    reference = ClosedForm(names["ema"].smoothing) if "ema" in names else None
    for _ in range(STEPS):
        nn.functional.cross_entropy(model(x), torch.randint(0, 3, (16,))).backward()
        optimizer.step()
        optimizer.zero_grad()
        exec(code[1], names)
        if reference is not None:
            reference.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    exec(code[2], names)
    ema = names["ema"]
    assert isinstance(ema, EMA)
    if peer == "Lightning":
        return  # the callback updates inside Lightning's loop (tests/test_integration_lightning.py)
    assert ema.batches_seen == STEPS, f"{peer}: the row's update ran {ema.batches_seen} times in {STEPS} steps"
    if ema.ema_start.value == 0 and ema.warmup is None and ema.update_interval.value == 1:
        assert reference is not None and reference.ema is not None
        for key, value in ema.ema_state_dict().items():
            torch.testing.assert_close(value.double(), reference.ema[key], rtol=1e-6, atol=1e-7, msg=f"{peer}: {key}")
