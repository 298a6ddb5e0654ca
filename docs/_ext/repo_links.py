"""An mkdocs hook (mkdocs.yml): links from a page to repository files that the site does not hold become text.

docs/ pages are read on GitHub too, where a link such as ``../../examples/accelerate_loop.py`` or a folder
``evidence/warmup-tf/`` opens. The site holds neither, so ``mkdocs build --strict`` would fail on them. This
hook replaces such a link by its text (``[`examples/accelerate_loop.py`](../../examples/...)`` becomes
``` `examples/accelerate_loop.py` ```) when its target exists in the repository outside docs/, or is a folder
of docs/ without an index page. A link to a target that exists nowhere is left alone, so the strict build
still fails on it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\((?P<target>[^)\s]+)\)")


def off_site(target: str, page_folder: Path, docs: Path) -> bool:
    """Whether the relative link ``target`` names an existing file or folder the site does not hold."""
    if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith(("#", "/")):
        return False  # a URL, an anchor, or a site-absolute path
    path = (page_folder / target.split("#")[0]).resolve()
    if not path.exists():
        return False
    if path.is_dir():
        return not (path / "index.md").exists() and not (path / "README.md").exists()
    return not path.is_relative_to(docs)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    page_folder = Path(page.file.abs_src_path).parent

    def text_if_off_site(match: re.Match[str]) -> str:
        return match["text"] if off_site(match["target"], page_folder, docs) else match[0]

    return LINK.sub(text_if_off_site, markdown)
