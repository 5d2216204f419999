"""Checkpoint stall: BiART checkpoints written in the background against written synchronously.

One process, the DeepSpeed engine (ZeRO-2) on ``biart-mini`` by default, checkpoints written
through lverse's writer (``runtime/trainer.py`` ``FileWriter``, ``Checkpoints``) exactly as
``lverse train`` writes them: each file to a temporary name, fsync, rename; the marker once the
files are on disk. The two modes take turns, ``--rounds`` rounds each, in the same process and
folder, so that drift of the machine (and of its disk cache) hits both alike. A round trains
``--intervals`` intervals of ``--every`` steps and checkpoints after each; a round without
checkpoints gives the time of an interval alone. Figures, as ``name=value`` lines:

    checkpoint_stall_ratio=<median time training is held up by a background checkpoint /
                            that of a synchronous one>                (goal: at most 0.2)
    checkpoint_write_mb_per_s=<MB written / seconds the writer spent writing them (fsync included)>
    checkpoint_overhead_ratio=<extra wall time per checkpoint interval, background / synchronous>

The stall is what the training loop waits for: the copy of the state into host memory (background)
or the whole write (synchronous). The overhead also counts what the background write costs the
steps it overlaps (on a machine with few cores the writer thread competes with training).

Usage: python benchmarks/checkpoint.py [--preset biart-mini] [--every 4] [--intervals 3] [--rounds 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time

import torch
from common import build_engine, deepspeed_config, micro_step, random_batches

from lverse.model.biart import PRESETS, BiART, Direction
from lverse.runtime.deepspeed import WriterEngine
from lverse.runtime.distributed import setup_env
from lverse.runtime.trainer import Checkpoints, FileWriter


class Trainer:
    """The engine, its batches and a step counter; ``interval`` trains ``every`` steps."""

    def __init__(self, engine, batches, every: int):
        self.engine, self.batches, self.every, self.steps = engine, batches, every, 0

    def interval(self, checkpoints: Checkpoints | None) -> None:
        for _ in range(self.every):
            micro_step(self.engine, *self.batches[self.steps % len(self.batches)], Direction(self.steps % 2))
            self.steps += 1
            if checkpoints is not None:  # one rank: its own writer is all there is to agree on
                checkpoints.settle(checkpoints.writing())


def round_of(trainer: Trainer, folder: str, background: bool | None, intervals: int) -> tuple[float, list[dict]]:
    """Seconds for ``intervals`` intervals, each followed by a checkpoint (none when
    ``background`` is None), and the figures of each checkpoint."""
    engine, checkpoints = trainer.engine, None
    if background is not None:
        writer = FileWriter(background)
        engine.checkpoint_engine = WriterEngine(writer)
        checkpoints = Checkpoints(folder, keep=1, rank=0, writer=writer)
    start = time.perf_counter()
    for _ in range(intervals):
        trainer.interval(checkpoints)
        if checkpoints is not None:
            checkpoints.start(trainer.steps, {}, lambda f: engine.save_checkpoint(
                os.path.dirname(f), tag=os.path.basename(f), save_latest=False))
    if checkpoints is None:
        return time.perf_counter() - start, []
    checkpoints.finish()
    return time.perf_counter() - start, checkpoints.completed()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="biart-mini", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--every", type=int, default=4, help="steps between checkpoints")
    parser.add_argument("--intervals", type=int, default=3, help="checkpoints per round")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each mode")
    parser.add_argument("--deepspeed", default="zero2_fp32", help="a ds_config (its ZeRO stage and precision)")
    parser.add_argument("--dir", default=None, help="where checkpoints go (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    setup_env()
    import deepspeed
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda" if cuda else "cpu")
    torch.manual_seed(0)
    engine, _ = build_engine(BiART(PRESETS[args.preset]), deepspeed_config(args.deepspeed, args.batch), 1e-4, device,
                             fused=cuda)
    engine.train()
    trainer = Trainer(engine, random_batches(engine.module.cfg, args.batch, 4, device), args.every)
    root = tempfile.mkdtemp(prefix="lverse-ckpt-", dir=args.dir)
    try:
        trainer.interval(None)  # warm-up
        round_of(trainer, os.path.join(root, "warmup"), False, 1)  # DeepSpeed's first save pays for imports
        times = {"none": [], "sync": [], "background": []}
        figures = {"sync": [], "background": []}
        for r in range(args.rounds):
            seconds, _ = round_of(trainer, root, None, args.intervals)
            times["none"].append(seconds)
            for mode in ("sync", "background"):
                seconds, found = round_of(trainer, os.path.join(root, f"{mode}{r}"), mode == "background",
                                          args.intervals)
                times[mode].append(seconds)
                figures[mode] += found
    finally:
        shutil.rmtree(root, ignore_errors=True)

    stall = {m: statistics.median(f["checkpoint_stall_s"] for f in figures[m]) for m in figures}
    per_interval = {m: sum(t) / (args.rounds * args.intervals) for m, t in times.items()}
    overhead = {m: per_interval[m] - per_interval["none"] for m in figures}
    written = sum(f["checkpoint_mb"] for m in figures for f in figures[m])
    writing = sum(f["checkpoint_write_s"] for m in figures for f in figures[m])
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({os.cpu_count()} cores), preset {args.preset}, "
          f"{args.deepspeed}, {figures['sync'][0]['checkpoint_mb']:.1f} MB per checkpoint, checkpoints in {root}")
    print(f"interval of {args.every} steps: {per_interval['none']:.3f} s without a checkpoint")
    for m in figures:
        print(f"{m}: training held up {stall[m]:.4f} s per checkpoint (median of {len(figures[m])}); "
              f"an interval with its checkpoint {per_interval[m]:.3f} s ({overhead[m]:+.3f} s)")
    print(f"checkpoint_stall_sync_s={stall['sync']:.4f}")
    print(f"checkpoint_stall_background_s={stall['background']:.4f}")
    print(f"checkpoint_stall_ratio={stall['background'] / stall['sync']:.3f}")
    print(f"checkpoint_write_mb_per_s={written / writing:.1f}")
    print(f"checkpoint_overhead_ratio={overhead['background'] / overhead['sync']:.3f}")


if __name__ == "__main__":
    main()
