"""The training core shared by BiART, AugVAE and CLIP training: what a resumable run needs besides
its model and its loss.

A run continues exactly from its last checkpoint because everything else is a function of the
step: the learning rate (``Schedule``, one type for every stage, no scheduler state to save) and
the random numbers (``reseed`` from (seed, step, rank) before every step). The data position is
the stage's business (``runtime/data.py`` skips to a micro-batch).

Checkpoints live in ``run_dir/checkpoints/step_NNNNNNNN/``. A folder counts once its marker
``lverse.json`` is written, atomically and last, after every rank's files are on disk
(``write_checkpoint``): a folder without it is what a killed run left, is removed at the next start
(``latest_checkpoint``) and is never counted among the ``keep`` newest.

Also here: process and device setup on top of ``distributed.setup_env`` (``start_process``), the
stop signal every rank agrees on (``StopFlag``), the resolved config written into the run folder
(``write_run_config``), and the one image grid of sample and reconstruction images (``image_grid``).
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import shutil
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lverse.core.config import write_config
from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json
from lverse.core.resources import pick_device

from .distributed import check_rendezvous, setup_env

log = logging.getLogger(__name__)

MARKER = "lverse.json"  # written last into a checkpoint folder: the folder is complete


# ---------------------------------------------------------------------------------------------
# the process

@dataclass(frozen=True)
class Process:
    rank: int
    world: int
    local_rank: int
    device: torch.device


def start_process(master_port: int | None = None) -> Process:
    """Join the job's process group (NCCL on CUDA, else gloo) on this rank's device
    (``pick_device``: what the rank can see, logged). The rendezvous is checked first
    (``check_rendezvous``), so a wrong address is an error that names it. DeepSpeed adopts the
    group when ``deepspeed.init_distributed`` is called after this."""
    info = setup_env(master_port)
    pick = pick_device("auto")
    log.info(pick.describe(f"rank {info.rank}"))
    check_rendezvous(info)
    device = torch.device(pick.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":  # what the rule cannot see alone: two ranks given the same GPU
        mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        shared = shared_devices(everyone)
        if shared:
            raise InputError(f"{shared[0]}: give each rank its own GPU (one task per GPU, --gpus-per-task=1)")
    return Process(dist.get_rank(), dist.get_world_size(), info.local_rank, device)


def shared_devices(devices: Sequence[tuple[str, str]]) -> list[str]:
    """Which ranks share a GPU, from every rank's (host, device UUID) in rank order."""
    first, shared = {}, []
    for rank, device in enumerate(devices):
        if device in first:
            shared.append(f"ranks {first[device]} and {rank} on {device[0]} both use GPU {device[1]}")
        first.setdefault(device, rank)
    return shared


def reseed(seed: int, step: int, rank: int) -> None:
    """Torch's RNG from (seed, step, rank): dropout and the like of a resumed step are those of
    the uninterrupted run."""
    torch.manual_seed(int(np.random.SeedSequence([seed, step, rank]).generate_state(1)[0]))


class StopFlag:
    """Set by a signal (SLURM's warning before a time limit or preemption); every rank stops at the
    same step because the flag is all-reduced (a signal may reach the ranks at different steps)."""

    def __init__(self, name: str | None):
        self.set = False
        if name:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.set = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([float(self.set)], device=device)
        dist.all_reduce(flag)
        return bool(flag.item())


# ---------------------------------------------------------------------------------------------
# the learning rate

@dataclass(frozen=True)
class Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then ``constant`` or ``cosine`` down to
    ``min_lr_ratio`` x the peak at the last step. A pure function of the step: a resumed run needs
    no scheduler state."""

    kind: str = "constant"  # "constant" or "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1

    def __post_init__(self):
        _check_kind(self.kind, "")

    @classmethod
    def of(cls, cfg, where: str = "") -> Schedule:
        """From a run config's ``schedule``, ``warmup_steps`` and ``min_lr_ratio``; ``where``
        prefixes the field's name in the error message (``optim.``)."""
        _check_kind(cfg.schedule, where)
        return cls(cfg.schedule, cfg.warmup_steps, cfg.min_lr_ratio)

    def lr_at(self, step: int, total: int, peak: float) -> float:
        """Learning rate of step ``step`` (0-based) of ``total``."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return peak
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps - 1)
        floor = peak * self.min_lr_ratio
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _check_kind(kind: str, where: str) -> None:
    if kind not in ("constant", "cosine"):
        raise InputError(f"{where}schedule must be 'constant' or 'cosine', got {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


# ---------------------------------------------------------------------------------------------
# checkpoints

def checkpoint_folder(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"step_{step:08d}")


def complete_checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(step, folder) of every checkpoint whose marker exists, oldest first."""
    found = []
    for marker in glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step_*", MARKER)):
        folder = os.path.dirname(marker)
        found.append((int(os.path.basename(folder).removeprefix("step_")), folder))
    return sorted(found)


def remove_partial_checkpoints(run_dir: str) -> None:
    """Delete checkpoint folders without a marker: what a run killed mid-write left."""
    for folder in glob.glob(os.path.join(glob.escape(run_dir), "checkpoints", "step_*")):
        if not os.path.isfile(os.path.join(folder, MARKER)):
            log.warning("removing %s: a partial checkpoint (its run stopped while writing it)", folder)
            shutil.rmtree(folder, ignore_errors=True)


def read_checkpoint_meta(folder: str) -> dict:
    with open(os.path.join(folder, MARKER)) as f:
        return json.load(f)


@dataclass(frozen=True)
class Checkpoint:
    step: int
    folder: str
    meta: dict  # what its marker holds (``step`` included)


def latest_checkpoint(run_dir: str, rank: int) -> Checkpoint | None:
    """The newest complete checkpoint, after rank 0 removed the partial ones (collective)."""
    if rank == 0:
        remove_partial_checkpoints(run_dir)
    dist.barrier()
    found = complete_checkpoints(run_dir)
    if not found:
        return None
    step, folder = found[-1]
    return Checkpoint(step, folder, read_checkpoint_meta(folder))


def write_checkpoint(run_dir: str, step: int, meta: dict, keep: int, rank: int, write: Callable[[str], None],
                     collective: bool = False, derived: Sequence[str] = ()) -> str:
    """Checkpoint of ``step`` (collective): ``write(folder)`` writes its files, on every rank when
    ``collective`` (DeepSpeed: each rank its shards), else on rank 0 only (identical replicas);
    then rank 0 writes the marker (``meta`` + ``step``) and keeps the ``keep`` newest complete
    checkpoints (``derived``: folders of run_dir holding per-checkpoint copies, pruned with them)."""
    folder = checkpoint_folder(run_dir, step)
    if collective or rank == 0:
        write(folder)
    if collective:
        dist.barrier()  # every rank's files are on disk before the marker says so
    if rank == 0:
        atomic_write_json(os.path.join(folder, MARKER), {**meta, "step": step})
        for _, old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            for root in derived:
                shutil.rmtree(os.path.join(run_dir, root, os.path.basename(old)), ignore_errors=True)
        log.info("checkpoint %s written", folder)
    dist.barrier()
    return folder


def write_run_config(run_dir: str, cfg, rank: int) -> None:
    """The resolved run config as ``run_dir/config.yaml`` (rank 0, atomically): what the run was
    started with, and what ``export`` rebuilds the model from."""
    if rank == 0:
        write_config(os.path.join(run_dir, "config.yaml"), cfg)


# ---------------------------------------------------------------------------------------------
# images

def image_grid(*rows: torch.Tensor) -> np.ndarray:
    """Batches of (B, 3, H, W) images in [-1, 1], one a row (B side by side) -> (rows x H, B x W, 3)
    uint8: BiART's samples, AugVAE's originals above their reconstructions."""
    grid = torch.cat([torch.cat(list(row.detach().float().cpu()), dim=2) for row in rows], dim=1).clamp(-1, 1)
    return ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()


def save_image(path: str, array: np.ndarray) -> None:
    """(H, W, 3) uint8 as a PNG file, atomically."""
    from PIL import Image
    with atomic_output(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
