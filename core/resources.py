"""What a worker runs on: its device, how many workers a stage starts, and each one's share of
the CPU (torch, OpenMP/MKL and decode threads).

Device: ``"auto"`` is CUDA when torch sees a GPU, else the CPU (``resolve_device``, the one rule
every stage uses). Workers: one per GPU on CUDA; one on a CPU (``default_workers`` says why).

torch starts as many intra-op threads as the machine has cores, in every process. N worker
processes on C cores then run N x C busy threads that fight over C cores (README, "Workers and
threads", has what that cost). So every process a stage
starts gets ``cores // workers`` threads (at least 1), set in the process before torch does any
work: the thread variables for libraries that read them once at start (OpenMP, MKL, OpenBLAS),
and torch's own pools. ``cores`` are those this process may run on (its CPU affinity: SLURM's
and cgroups' CPU binding show there, not in ``os.cpu_count()``); on Ray they are the CPUs Ray
gives the actor or task.

A user who sets ``OMP_NUM_THREADS`` (or a stage's ``--threads``) gets that number in every
worker instead, and the log says so.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

from .errors import InputError

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def resolve_device(name: str) -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is visible, else ``"cpu"``; any other name as given."""
    if name != "auto":
        return name
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_workers(device: str = "auto") -> int:
    """Model replicas a stage starts on this machine when the user names none.

    On CUDA one per visible GPU. On a CPU one worker with every core's threads: more workers of
    fewer threads each gain little on a CPU (``encode_workers_scaling`` and
    ``caption_workers_scaling`` in benchmarks/README.md), while every worker holds its own copy of
    the model (450 MB for augvae-sl, more for BiART + CLIP); ``--workers`` raises it where memory
    allows.
    """
    if resolve_device(device) == "cuda":
        import torch
        return max(1, torch.cuda.device_count())
    return 1


def available_cores() -> int:
    """Cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ThreadPlan:
    workers: int  # processes (or actors) running at once on this machine
    threads: int  # threads each of them runs
    cores: int  # cores they share
    source: str  # "share" (cores // workers), "--threads" or "OMP_NUM_THREADS"

    def describe(self) -> str:
        why = "each its share" if self.source == "share" else f"{self.source} as given"
        return f"{self.workers} workers x {self.threads} threads on {self.cores} cores ({why})"


def plan_threads(workers: int, cores: int | None = None, threads: int | None = None,
                 env: dict[str, str] | None = None) -> ThreadPlan:
    """Threads per worker: ``threads`` when given (a stage's ``--threads``), else the user's
    ``OMP_NUM_THREADS``, else ``cores // workers`` and at least 1."""
    env = os.environ if env is None else env
    workers, cores = max(1, workers), cores or available_cores()
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads must be at least 1, got {threads}")
        return ThreadPlan(workers, threads, cores, "--threads")
    given = env.get("OMP_NUM_THREADS", "").strip()
    if given:
        if not given.isdigit() or int(given) < 1:
            raise InputError(f"OMP_NUM_THREADS={given!r} is not a positive whole number; unset it or fix it")
        return ThreadPlan(workers, int(given), cores, "OMP_NUM_THREADS")
    return ThreadPlan(workers, max(1, cores // workers), cores, "share")


def apply_threads(threads: int) -> None:
    """Run this process with ``threads`` threads: the variables for libraries not yet loaded (torch
    reads OMP_NUM_THREADS at import, capped at the cores), and torch's pools if torch is loaded (its
    inter-op pool can be sized only before its first use)."""
    for name in THREAD_VARIABLES:
        os.environ[name] = str(threads)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(threads)
        try:
            torch.set_num_interop_threads(threads)
        except RuntimeError:  # already used in this process: the intra-op count above still holds
            pass
