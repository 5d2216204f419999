"""How long the ``lverse`` command takes to answer ``--help`` (target: at most 0.5 s).

Every command's options come from dataclasses in modules that import no torch, DeepSpeed or Ray
(lverse/cli.py), so help is the Python start, lverse's light modules and argparse. Runs the
installed command (the interpreter beside this one) RUNS times per argument list and prints the
median and the slowest of each:

    python benchmarks/cli.py [--runs 9]

Figures: help_seconds (``lverse --help``), command_help_seconds (the slowest median of
``lverse COMMAND --help`` over the commands timed), each with a ``_max``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

COMMANDS = ("train", "caption", "generate", "evaluate", "encode", "slurm")


def seconds(argv: list[str], runs: int) -> list[float]:
    lverse = os.path.join(os.path.dirname(sys.executable), "lverse")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([lverse, *argv], check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=9, help="runs per argument list (default: 9)")
    args = parser.parse_args()
    top = seconds(["--help"], args.runs)
    print(f"help_seconds={statistics.median(top):.3f}")
    print(f"help_seconds_max={max(top):.3f}")
    each = {name: seconds([name, "--help"], args.runs) for name in COMMANDS}
    slowest = max(each, key=lambda name: statistics.median(each[name]))
    print(f"command_help_seconds={statistics.median(each[slowest]):.3f}")
    print(f"command_help_seconds_max={max(each[slowest]):.3f}")
    print(f"command_help_slowest={slowest}")


if __name__ == "__main__":
    main()
