"""The ``emakit`` command: ``emakit demo`` (the main job) and ``emakit bench`` (update-speed benchmarks)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emakit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    from emakit import bench, demo

    demo.add_arguments(commands.add_parser("demo", help=demo.__doc__.splitlines()[0]))
    bench.add_arguments(commands.add_parser("bench", help=bench.__doc__.splitlines()[0]))
    args = parser.parse_args(argv)
    runner = {"demo": demo.run, "bench": bench.run}[args.command]
    return int(runner(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
