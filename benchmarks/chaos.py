"""Chaos hunt: a stage killed at random, many times (tests/chaos.py's harness, for longer runs than
the suite's).

For each ``--stage``, makes the test suite's small inputs in a temporary folder (debug AugVAE and
BiART with random weights, synthetic image shards, the synthetic image server for download and
``pipeline``, which is `lverse pipeline run`: download, tokenizer and encode on a private local Ray), runs
the stage once uninterrupted, then ``--rounds`` rounds of ``--kills`` SIGKILLs each of a random
process of the stage's session at random moments, and the same command until it succeeds. Every
kill is printed (round, moment, victim, its role); then, per stage:

    chaos_kills=<SIGKILLs sent>
    chaos_orphans=<processes of a killed run still alive 5 s after its driver ended>
    chaos_temporaries=<temporary files left in the output after the final run>
    chaos_hangs=<killed runs whose driver had not ended after --timeout seconds (then SIGKILLed)>
    chaos_unexplained_failures=<runs that failed (not killed) without lverse's one line last: a
                                traceback, or Ray ending the driver itself; each is printed>
    chaos_outputs_identical=<True: the outputs equal the uninterrupted run's, byte for byte>

Replay a failure with the same ``--stage`` and ``--seed``: the same moments and the same picks
from the list of live processes (which processes are alive at a moment depends on the machine).

    python benchmarks/chaos.py --stage encode --rounds 40 --seed 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository: tests.chaos

from tests.chaos import STAGES, chaos, stage  # noqa: E402
from tests.conftest import make_biart, make_data, make_vae  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", action="append", choices=STAGES, help="repeat for several (default: all)")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--kills", type=int, default=3, help="SIGKILLs a round (a round ends when its driver dies)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds a run may take; a killed run's driver still running then is a hang, counted")
    parser.add_argument("--folder", help="keep the inputs, outputs and logs here (default: a temporary folder)")
    args = parser.parse_args()
    failed = False
    with contextlib.ExitStack() as stack:
        folder = args.folder or stack.enter_context(tempfile.TemporaryDirectory(prefix="lverse-chaos-"))
        files = inputs(folder, args.stage or STAGES, stack)
        for name in args.stage or STAGES:
            result = chaos(stage(name, os.path.join(folder, name, "inputs"), files), os.path.join(folder, name),
                           args.rounds, args.seed, args.kills, say=lambda line: print(line, flush=True),
                           timeout=args.timeout)
            failed |= bool(result.orphans or result.temporaries or result.hangs or result.differences)
    return 1 if failed else 0


def inputs(folder: str, stages, stack: contextlib.ExitStack) -> dict:
    """The files the stages need (conftest's fixtures), and the image server if download runs."""
    os.makedirs(folder, exist_ok=True)
    vae = make_vae(os.path.join(folder, "vae.safetensors"))
    files = {"vae": vae}
    if set(stages) - {"encode", "download", "pipeline"}:
        files["data"] = make_data(os.path.join(folder, "data"), vae)
        files["biart"] = make_biart(os.path.join(folder, "biart.safetensors"), files["data"])
    if {"download", "pipeline"} & set(stages):
        from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
        files["server"] = stack.enter_context(SyntheticServer(SyntheticSet(seed=1, train=12, heldout=2,
                                                                           image_size=64)))
    return files


if __name__ == "__main__":
    sys.exit(main())
