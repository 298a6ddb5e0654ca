"""Run emakit's benchmarks: ``python benchmarks/run.py [--json out.json] [--quick] [--device cuda]``.

A thin wrapper over :mod:`emakit.bench` (the same as ``emakit bench``); ``--help`` lists the options.
"""

import sys

from emakit.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
