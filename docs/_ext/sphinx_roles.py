"""A griffe extension for the API site (mkdocs.yml): the reStructuredText in emakit's docstrings, in Markdown.

The docstrings cross-reference with Sphinx roles (``:class:`~emakit.EMA```, ``:meth:`set_run_length```),
which Markdown would show as literal text. Once the package is loaded, every role becomes an *optional*
autorefs cross-reference: a link where the target is on the site, plain code where it is not (no warning,
so ``mkdocs build --strict`` never fails on a docstring's reference to an undocumented name). Names without
a dot-path from ``emakit`` are looked up from the docstring's object outwards (method, class, module).
A literal block's ``::`` ("Example::") becomes one colon: the indented block below it is Markdown code already.
"""

from __future__ import annotations

import html
import re
from typing import Any

import griffe

LITERAL_BLOCK_MARK = re.compile(r"(?P<space> ?)::$", re.MULTILINE)  # "text::" -> "text:", "text ::" -> "text"
ROLE = re.compile(r":(?:py:)?(?:class|meth|func|attr|mod|data|exc|obj):`(?P<short>~)?(?P<target>[\w.]+)`")


def resolve(target: str, scope: griffe.Object) -> str:
    """The full path ``target`` names, seen from ``scope``; ``target`` itself when no enclosing scope has it."""
    head = target.split(".")[0]
    if head == "emakit":
        return target
    current: griffe.Object | None = scope
    while current is not None:
        if head in current.members:
            return f"{current.path}.{target}"
        current = current.parent
    return target


def rewrite(text: str, scope: griffe.Object) -> str:
    """``text`` with each Sphinx role an optional cross-reference to what it names, and ``::`` one colon."""

    def link(match: re.Match[str]) -> str:
        target = match["target"]
        title = target.rsplit(".", 1)[-1] if match["short"] else target
        identifier = html.escape(resolve(target, scope), quote=True)
        return f'<autoref identifier="{identifier}" optional><code>{html.escape(title)}</code></autoref>'

    return LITERAL_BLOCK_MARK.sub(lambda match: "" if match["space"] else ":", ROLE.sub(link, text))


class SphinxRoles(griffe.Extension):
    """Rewrite the roles of every docstring in the package once it is loaded (all members known by then)."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        pending: list[griffe.Object] = [pkg]
        while pending:
            obj = pending.pop()
            if obj.docstring is not None:
                obj.docstring.value = rewrite(obj.docstring.value, obj)
            pending.extend(member for member in obj.members.values() if not member.is_alias)
