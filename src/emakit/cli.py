"""The ``emakit`` command: ``demo`` (the main job), ``bench``, ``evidence``, ``export``, ``posthoc``, ``merge``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emakit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from emakit import bench, demo, evidence, export, merging, posthoc

    subcommands = {
        "demo": demo,
        "bench": bench,
        "evidence": evidence,
        "export": export,
        "posthoc": posthoc,
        "merge": merging,
    }
    for name, module in subcommands.items():
        module.add_arguments(commands.add_parser(name, help=(module.__doc__ or name).splitlines()[0]))
    args = parser.parse_args(argv)
    runner = subcommands[args.command].run
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
