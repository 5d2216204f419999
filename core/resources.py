"""What a worker runs on: its device, how many workers a stage starts, and each one's share of
the CPU (torch, OpenMP/MKL and decode threads).

Device: ``pick_device`` is the one rule every stage and every training rank uses: it follows
what the process can see (CUDA_VISIBLE_DEVICES, torch's device count, its local rank), so a task
that SLURM or cgroups bound to one GPU uses that one as ``cuda:0``. Workers: one per GPU on CUDA,
each given its own GPU (``worker_gpus``); one on a CPU (``default_workers`` says why).

torch starts as many intra-op threads as the machine has cores, in every process. N worker
processes on C cores then run N x C busy threads that fight over C cores (docs/inference.md, "Workers and
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
import re
import socket
import sys
from dataclasses import dataclass

from .errors import InputError

log = logging.getLogger(__name__)

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def cuda_count() -> int:
    """CUDA devices torch sees in this process (0 without CUDA)."""
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus(env: dict[str, str] | None = None, count: int | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA names them to it: the entries of
    ``CUDA_VISIBLE_DEVICES`` when set (SLURM sets it per task), else devices 0..n-1 of the ``count``
    torch sees (with cgroup-constrained devices a task sees only its own, as device 0)."""
    env = os.environ if env is None else env
    given = env.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        return [d.strip() for d in given.split(",") if d.strip()]
    return [str(i) for i in range(cuda_count() if count is None else count)]


def local_rank(env: dict[str, str] | None = None) -> int:
    """This process's rank among the job's processes on its node: torchrun's and DeepSpeed's
    LOCAL_RANK, else SLURM's SLURM_LOCALID, else 0."""
    env = os.environ if env is None else env
    for name in ("LOCAL_RANK", "SLURM_LOCALID"):
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return 0


def local_world_size(env: dict[str, str] | None = None) -> int:
    """Ranks of this job on this node: torchrun's LOCAL_WORLD_SIZE, the deepspeed launcher's
    LOCAL_SIZE, else SLURM's tasks per node (the first node's, "4(x2)" -> 4), else 1."""
    env = os.environ if env is None else env
    for name in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "SLURM_STEP_TASKS_PER_NODE", "SLURM_NTASKS_PER_NODE"):
        m = re.match(r"\d+", env.get(name, ""))
        if m:
            return max(1, int(m.group()))
    return 1


@dataclass(frozen=True)
class DevicePick:
    device: str  # "cuda:N" or "cpu": what torch is given
    visible: str  # CUDA_VISIBLE_DEVICES as this process sees it ("unset" when not set)
    why: str  # for the log

    def describe(self, who: str) -> str:
        return f"{who} on {socket.gethostname()}: {self.device} of CUDA_VISIBLE_DEVICES={self.visible} ({self.why})"


def pick_device(requested: str = "auto", env: dict[str, str] | None = None, count: int | None = None) -> DevicePick:
    """The device this process uses: the one rule of training, encode, caption, generate and
    evaluate.

    It follows what the process can see, never a global GPU index: ``count`` devices are visible
    (torch's count; the tests pass it). One visible device is this process's own, whatever its
    index on the node (SLURM's ``--gpus-per-task=1``, ``--gpu-bind``, cgroup-constrained devices,
    or a pool worker given one): ``cuda:0``. Several visible devices are shared by the node's
    ranks (``--gres=gpu:N``, torchrun): local rank r takes ``cuda:r``, and fewer devices than
    ranks is an error, never two ranks silently on one GPU. ``"cpu"`` and an explicit
    ``"cuda:N"`` are taken as given; ``"auto"`` is the CPU when no device is visible.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES", "unset")
    if requested == "cpu" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        return DevicePick(requested, visible, "as given")
    if requested not in ("auto", "cuda"):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, got {requested!r}")
    count = cuda_count() if count is None else count
    if count == 0:
        if requested == "cuda":
            raise InputError(f"device cuda: this process sees no CUDA device (CUDA_VISIBLE_DEVICES={visible}); "
                             "ask SLURM for GPUs (--gpus-per-node) or use device auto or cpu")
        return DevicePick("cpu", visible, "no CUDA device visible")
    rank, ranks = local_rank(env), local_world_size(env)
    if count == 1:
        return DevicePick("cuda:0", visible, f"the one device this process sees; local rank {rank} of {ranks}")
    if count < ranks or rank >= count:
        raise InputError(f"local rank {rank} of {ranks} ranks on this node sees {count} devices "
                         f"(CUDA_VISIBLE_DEVICES={visible}): fewer devices than ranks would put two ranks on one "
                         f"GPU. Start one rank per GPU (--ntasks-per-node={count}), or give each task its own GPU "
                         "(--gpus-per-task=1)")
    return DevicePick(f"cuda:{rank}", visible, f"local rank {rank} of {ranks} sharing {count} devices")


def resolve_device(name: str) -> str:
    """The device name ``pick_device`` gives this process ("cuda:N" or "cpu")."""
    return pick_device(name).device


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def compute_dtype(precision: str, device: str):
    """The torch dtype a sampling model (BiART) runs in: ``auto`` is bf16 on a CUDA device that has
    it, fp16 on older ones, fp32 on a CPU (where half precision is slower, not faster). The AugVAE
    and CLIP always stay FP32: the paper's quantizer underflows in half precision."""
    import torch
    if precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    cuda = str(device).startswith("cuda")
    if precision == "auto":
        precision = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "fp32"
    if precision == "fp16" and not cuda:
        raise InputError("--precision fp16 needs a CUDA device; on a CPU use fp32 or bf16")
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def worker_gpus(workers: int, device: str = "auto", env: dict[str, str] | None = None,
                count: int | None = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES for each of ``workers`` local worker processes of a stage on ``device``
    (empty on the CPU): each worker its own GPU, round-robin when there are more workers than
    GPUs (``--workers`` above the GPU count shares them, as asked). ``env``/``count`` as in
    ``pick_device``."""
    if pick_device(device, env, count).device == "cpu":
        return []
    gpus = visible_gpus(env, count)
    return [gpus[k % len(gpus)] for k in range(workers)] if gpus else []


def default_workers(device: str = "auto") -> int:
    """Model replicas a stage starts on this machine when the user names none.

    On CUDA one per visible GPU. On a CPU one worker with every core's threads: more workers of
    fewer threads each gain little on a CPU (``encode_workers_scaling`` and
    ``caption_workers_scaling`` in benchmarks/README.md), while every worker holds its own copy of
    the model (450 MB for augvae-sl, more for BiART + CLIP); ``--workers`` raises it where memory
    allows.
    """
    if pick_device(device).device != "cpu":
        return max(1, len(visible_gpus()))
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
