"""The training core shared by BiART, AugVAE and CLIP training: what a resumable run needs besides
its model and its loss.

A run continues exactly from its last checkpoint because everything else is a function of the
step: the learning rate (``Schedule``, one type for every stage; the ``Plateau`` rule's few numbers
go into the checkpoint) and the random numbers (``reseed`` from (seed, step, rank) before every
step). The data position is the stage's business (``runtime/data.py`` skips to a micro-batch).

Checkpoints live in ``run_dir/checkpoints/step_NNNNNNNN/``. A folder counts once its marker
``lverse.json`` is written, atomically and last, after every rank's files are on disk
(``write_checkpoint``): a folder without it is what a killed run left, is removed at the next start
(``latest_checkpoint``) and is never counted among the ``keep`` newest. The marker records the
checkpoint format (``core/formats.CHECKPOINT_FORMAT``); a checkpoint of another is refused.

Also here: process and device setup on top of ``distributed.setup_env`` (``start_process``), the
stop signal every rank agrees on (``StopFlag``), the resolved config written into the run folder
and read back (``write_run_config``, ``read_run_config``), and the one image grid of sample and
reconstruction images (``image_grid``).
"""

from __future__ import annotations

import copy
import datetime
import glob
import json
import logging
import math
import os
import shutil
import signal
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lverse.core.config import load_run_config, write_config
from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json
from lverse.core.formats import CHECKPOINT_FORMAT, check_format
from lverse.core.resources import pick_device
from lverse.core.storage import is_url

from .distributed import check_rendezvous, collective_timeout, setup_env

log = logging.getLogger(__name__)

MARKER = "lverse.json"  # written last into a checkpoint folder: the folder is complete
# what to do with a checkpoint or a run config of another format: they cannot be converted
NEW_RUN_DIR = "train into a new run_dir with this lverse"


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
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=collective_timeout())
    global _LONG_WAITS
    _LONG_WAITS = dist.new_group(backend="gloo", timeout=LONG_WAIT)
    if device.type == "cuda":  # what the rule cannot see alone: two ranks given the same GPU
        mine = (socket.gethostname(), str(torch.cuda.get_device_properties(device).uuid))
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        shared = shared_devices(everyone)
        if shared:
            raise InputError(f"{shared[0]}: give each rank its own GPU (one task per GPU, --gpus-per-task=1)")
    return Process(dist.get_rank(), dist.get_world_size(), info.local_rank, device)


# How long the ranks wait for one rank's work alone (converting a checkpoint to the universal
# format, writing or removing checkpoint files) in ``wait_for_ranks``: far longer than the
# collective timeout that tells a dead node (``distributed.COLLECTIVE_TIMEOUT``).
LONG_WAIT = datetime.timedelta(hours=1)
_LONG_WAITS = None  # the gloo group ``wait_for_ranks`` meets on (start_process makes it)


def wait_for_ranks() -> None:
    """A barrier after work that some rank may do alone for minutes (a checkpoint's conversion,
    files, removal): on a group with the ``LONG_WAIT`` timeout, so that the short collective
    timeout that spots a dead node does not fail a healthy run there."""
    dist.barrier(group=_LONG_WAITS)


def end_process() -> None:
    """Leave the process group, after the run ended (done or stopped). Left to the interpreter's
    exit, the group and its backend's threads are torn down among the static destructors, which is
    where a rank of a finished run was seen to abort ("terminate called without an active
    exception", a rank of 2 on gloo); PyTorch asks for this call before a process exits."""
    global _LONG_WAITS
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # every group, the long waits' too
    _LONG_WAITS = None


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int = 2048, seconds: float = 1.0) -> float:
    """FLOP/s of a large square matmul on ``device``: what MFU is measured against when no peak is
    configured."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


# What ends a training job early, each leading to the same clean stop: SIGUSR1 is what the SLURM
# template asks for before the time limit (--signal=USR1@300), SIGTERM what preemption, scancel and
# most schedulers send (and SIGKILL after a grace time: SLURM's KillWait), SIGINT a person's Ctrl-C.
STOP_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")
HOLD_SECONDS = 300  # the longest a run waits at LVERSE_HOLD_AT_STEP (StopFlag.holding)


class StopFlag:
    """Set by any of ``STOP_SIGNALS``; every rank stops at the same step because the flag is
    all-reduced (a signal may reach the ranks at different steps). The handler only sets the flag,
    so a second signal while the checkpoint is written changes nothing: the checkpoint completes.

    A run that stopped so says it in ``RUN_DIR/stopped.json`` (``finish``), on which the SLURM job
    scripts requeue the job; the next start of the run removes it first (``clear_stop_record``)."""

    def __init__(self, run_dir: str, rank: int):
        self.received: str | None = None
        self.marker, self.rank = _stopped_marker(run_dir), rank
        for name in STOP_SIGNALS:
            signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.received = self.received or signal.Signals(signum).name

    @staticmethod
    def holding(step: int, start: int) -> bool:
        """A fixed point for tests that stop or kill a run mid-way: with ``LVERSE_HOLD_AT_STEP=k``
        in its environment, a run that started from step 0 holds after step ``k`` (its metrics
        logged, its earlier checkpoints complete: the training loop sees to both) and ``wait``s for
        a stop signal, so the signal or the kill lands at step ``k`` however fast or slow the
        machine is, and the run needs only a few steps more. A resumed run never holds (the
        requeued job goes on to the end)."""
        return start == 0 and step == int(os.environ.get("LVERSE_HOLD_AT_STEP") or 0)

    def wait(self) -> None:
        """Until a stop signal arrives, at most ``HOLD_SECONDS``."""
        deadline = time.monotonic() + HOLD_SECONDS
        while self.received is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def agreed(self, device: torch.device, *flags: bool) -> tuple[bool, ...]:
        """(stopping, *flags) as every rank sees them: each set on any rank is set on all. The
        training loop's other per-step agreements ride on this one all-reduce."""
        values = torch.tensor([float(self.received is not None), *map(float, flags)], device=device)
        dist.all_reduce(values)
        return tuple(bool(v) for v in values.tolist())

    def finish(self, step: int) -> None:
        """Checkpointed at ``step`` on a stop signal (received on this rank, or on another: then
        ``received`` is None): say so (collective), and ignore stop signals from now on: another
        one (a second Ctrl-C, the scheduler's next TERM) must not turn the exit 0 that follows into
        a kill the job script takes for a failure, not even while Python exits."""
        if self.rank == 0:
            atomic_write_json(self.marker, {"step": step, "signal": self.received})
            log.warning("%s received: checkpointed at step %d and stopping", self.received or "a stop signal", step)
        dist.barrier()
        ignore_stop_signals()


def _stopped_marker(run_dir: str) -> str:
    return os.path.join(run_dir, "stopped.json")


def clear_stop_record(run_dir: str, rank: int) -> None:
    """A run's start removes the record of its last stop (rank 0), before anything of the start can
    fail: a job script that found it after a failed restart would take the failure for a stop and
    requeue the job again and again."""
    if rank == 0 and os.path.exists(_stopped_marker(run_dir)):
        os.remove(_stopped_marker(run_dir))


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A helper process's (DataLoader worker's) start: schedulers signal every process of a job
    step, and a worker killed by a stop signal would end training before it can checkpoint; only
    the training process acts on them, and the worker ends with it, however it ends.

    The parent-death signal (``lifetime.die_with_parent``) ends the worker at once when the
    training process is SIGKILLed; torch's own check of the parent (every 5 s, while the worker
    waits for work) would leave it running that long, into the next run's start, and a worker
    that is busy longer. The parent's PID is the one multiprocessing recorded when it started the
    worker, not ``os.getppid`` now: a parent that died meanwhile is not seen as alive."""
    import multiprocessing

    from .lifetime import die_with_parent
    parent = multiprocessing.parent_process()
    if parent is not None:
        die_with_parent(parent.pid)
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


# ---------------------------------------------------------------------------------------------
# the learning rate

@dataclass(frozen=True)
class Schedule:
    """Linear warmup from 0 over ``warmup_steps``, then ``constant``, ``cosine`` down to
    ``min_lr_ratio`` x the peak at the last step, or ``plateau``: the peak times the scale the
    ``Plateau`` rule has reached (halved each time the training loss stops improving, not below
    ``min_lr_ratio``). A function of the step (and, for plateau, of the rule's state, which
    checkpoints carry)."""

    kind: str = "constant"  # "constant", "cosine" or "plateau"
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

    def lr_at(self, step: int, total: int, peak: float, plateau_scale: float = 1.0) -> float:
        """Learning rate of step ``step`` (0-based) of ``total``; ``plateau_scale`` is
        ``Plateau.scale`` (plateau only)."""
        if step < self.warmup_steps:
            return peak * (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return peak
        if self.kind == "plateau":
            return peak * plateau_scale
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps - 1)
        floor = peak * self.min_lr_ratio
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def _check_kind(kind: str, where: str) -> None:
    if kind not in ("constant", "cosine", "plateau"):
        raise InputError(f"{where}schedule must be 'constant', 'cosine' or 'plateau', got {kind!r}")


class Plateau:
    """The paper's rule: halve the learning rate when the training loss stops improving.

    The loss is judged at the end of every interval of ``every`` steps: the interval's mean
    training loss over every step and rank improves when it is below ``(1 - threshold)`` x the
    best so far; after ``patience`` intervals in a row without improvement ``scale`` halves (not
    below ``min_scale``) and the count starts again. The first ``warmup`` steps are not judged.

    Exact on resume, wherever the checkpoint falls: each step's loss is added on the device in
    float64 (float32 losses of a few thousand steps sum exactly there, in any order), so no step
    waits for the host; ``state()`` all-reduces the unfinished interval's sum into the checkpoint
    and ``load`` gives it back to rank 0, so the resumed run judges the same sums.
    """

    def __init__(self, every: int, patience: int, threshold: float, min_scale: float, device: torch.device,
                 warmup: int = 0):
        if every < 1 or patience < 1 or not 0 <= threshold < 1:
            raise InputError(f"plateau rule: every ({every}) and patience ({patience}) must be at least 1 and "
                             f"threshold ({threshold}) in [0, 1)")
        self.every, self.patience, self.threshold, self.min_scale = every, patience, threshold, min_scale
        self.warmup = warmup
        self.best, self.bad, self.scale, self.steps = math.inf, 0, 1.0, 0
        self.total = torch.zeros((), dtype=torch.float64, device=device)

    @classmethod
    def of(cls, cfg, every: int, device: torch.device, state: dict | None = None, rank: int = 0) -> Plateau | None:
        """The rule of a run config's ``schedule: plateau`` (its ``patience``, ``plateau_threshold``,
        ``min_lr_ratio`` and ``warmup_steps``), judged every ``every`` steps and continuing from a
        checkpoint's ``state`` when given; None for another schedule."""
        if cfg.schedule != "plateau":
            return None
        rule = cls(every, cfg.patience, cfg.plateau_threshold, cfg.min_lr_ratio, device, cfg.warmup_steps)
        if state is not None:
            rule.load(state, rank)
        return rule

    def add(self, loss: torch.Tensor, step: int, world: int) -> None:
        """Count the loss (this rank's, a 0-d tensor) of step ``step`` (1 for the first step the
        schedule counts); collective at an interval's end."""
        judged = step - self.warmup
        if judged <= 0:
            return
        self.total += loss.detach().to(torch.float64)
        self.steps += 1
        if judged % self.every == 0:
            if world > 1:
                dist.all_reduce(self.total)
            mean = self.total.item() / (self.steps * world)
            if mean < self.best * (1 - self.threshold):
                self.best, self.bad = mean, 0
            else:
                self.bad += 1
                if self.bad >= self.patience:
                    self.scale, self.bad = max(self.scale / 2, self.min_scale), 0
            self.total.zero_()
            self.steps = 0

    def state(self, world: int) -> dict:
        """What a checkpoint keeps (collective: the unfinished interval's sum over the ranks)."""
        total = self.total.clone()
        if world > 1:
            dist.all_reduce(total)
        return {"best": self.best, "bad": self.bad, "scale": self.scale, "total": total.item(), "steps": self.steps}

    def load(self, state: dict, rank: int) -> None:
        self.best, self.bad, self.scale, self.steps = state["best"], state["bad"], state["scale"], state["steps"]
        self.total.fill_(state["total"] if rank == 0 else 0.0)


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
    """What a checkpoint's marker holds, refused unless of ``CHECKPOINT_FORMAT``."""
    with open(os.path.join(folder, MARKER)) as f:
        meta = json.load(f)
    check_format(meta.get("format"), CHECKPOINT_FORMAT, f"checkpoint {folder}", NEW_RUN_DIR)
    return meta


@dataclass(frozen=True)
class Checkpoint:
    step: int
    folder: str
    meta: dict  # what its marker holds (``step`` included)


def latest_checkpoint(run_dir: str, rank: int) -> Checkpoint | None:
    """The newest complete checkpoint, after rank 0 removed the partial ones (collective)."""
    if rank == 0:
        remove_partial_checkpoints(run_dir)
    wait_for_ranks()
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
        wait_for_ranks()  # every rank's files are on disk before the marker says so
    if rank == 0:
        _commit_checkpoint(run_dir, folder, step, meta, keep, derived)
    wait_for_ranks()
    return folder


def _commit_checkpoint(run_dir: str, folder: str, step: int, meta: dict, keep: int, derived: Sequence[str]) -> None:
    """Rank 0, once every rank's files of ``folder`` are on disk: the marker that makes it count,
    then the ``keep`` newest complete checkpoints are kept (``derived``: folders of run_dir holding
    per-checkpoint copies, pruned with them)."""
    atomic_write_json(os.path.join(folder, MARKER), {**meta, "format": CHECKPOINT_FORMAT, "step": step})
    for _, old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        for root in derived:
            shutil.rmtree(os.path.join(run_dir, root, os.path.basename(old)), ignore_errors=True)
    log.info("checkpoint %s written", folder)


class FileWriter:
    """Writes a checkpoint's files durably (a temporary name, fsync, rename): ``save`` writes at
    once, or with ``background`` copies the state off the device into host memory and writes it in
    a thread while training goes on. The copy is the stall training pays (a memory copy instead of
    serialising to disk); its price is host memory for one more copy of this rank's state. One
    thread writes, in order; ``busy`` says whether it still is, ``wait`` joins it and raises what
    it raised (a full disk fails the run as a synchronous write would)."""

    def __init__(self, background: bool):
        self.background = background
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint") if background else None
        self._writes: list[Future] = []
        self.bytes = 0  # written since the last ``wait``
        self.seconds = 0.0  # the thread's (or inline) writing time since the last ``wait``

    def save(self, state, path: str) -> None:
        if self._pool is None:
            self._write(state, path)
        else:
            self._writes.append(self._pool.submit(self._write, _host_copy(state), path))

    def _write(self, state, path: str) -> None:
        start = time.perf_counter()
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            try:
                torch.save(state, f)
            except RuntimeError as e:  # torch's zip writer reports a failed write as "unexpected pos"
                if not isinstance(e.__context__, OSError):
                    raise
                raise e.__context__ from None  # the OSError says what failed (atomic_output: and where)
            f.flush()
            os.fsync(f.fileno())
        self.bytes += os.path.getsize(path)
        self.seconds += time.perf_counter() - start

    def busy(self) -> bool:
        return any(not w.done() for w in self._writes)

    def wait(self) -> None:
        writes, self._writes = self._writes, []
        for w in writes:
            w.result()


def _host_copy(state):
    """``state`` with every tensor copied to host memory (a dict, list or tuple rebuilt around
    them; any other object deep-copied): what the background write reads while training changes
    the originals."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return type(state)((k, _host_copy(v)) for k, v in state.items())
    if isinstance(state, (list, tuple)) and not hasattr(state, "_fields"):
        return type(state)(_host_copy(v) for v in state)
    return copy.deepcopy(state)


class Checkpoints:
    """Checkpoints written without stopping training for the write (``FileWriter``): a checkpoint
    counts once its marker is written, and rank 0 writes it only after every rank's files are
    durable, so a crash at any moment leaves the previous complete checkpoint in use. At most one
    write is in flight: a checkpoint due while the last one is still being written waits for it.

    ``start(step, meta, write)`` has ``write(folder)`` hand the files to ``writer.save`` (on every
    rank: DeepSpeed writes each rank's shards); ``settle(any_writing)`` commits the pending one
    once no rank's writer is busy (the training loop all-reduces ``writing()`` together with the
    stop flag: no extra collective); ``finish()`` waits for it (collective: at a stop and the end).
    ``completed()`` hands out the figures of the checkpoints committed since its last call.
    """

    def __init__(self, run_dir: str, keep: int, rank: int, writer: FileWriter, derived: Sequence[str] = ()):
        self.run_dir, self.keep, self.rank, self.writer, self.derived = run_dir, keep, rank, writer, derived
        self.pending: tuple[int, str, dict, float, float] | None = None  # step, folder, meta, start, stall
        self._completed: list[dict] = []

    def start(self, step: int, meta: dict, write: Callable[[str], None]) -> None:
        began = time.perf_counter()
        self.finish()
        folder = checkpoint_folder(self.run_dir, step)
        write(folder)
        self.pending = (step, folder, meta, began, time.perf_counter() - began)
        if not self.writer.background:
            self.finish()

    def writing(self) -> bool:
        """Whether this rank's files of the pending checkpoint are still being written."""
        return self.pending is not None and self.writer.busy()

    def settle(self, any_writing: bool) -> None:
        """Commit the pending checkpoint once no rank is writing (``any_writing`` is the
        all-reduced ``writing()``, so every rank decides alike)."""
        if self.pending is not None and not any_writing:
            self._commit()

    def finish(self) -> None:
        """Wait until the pending checkpoint is complete (collective)."""
        if self.pending is not None:
            self.writer.wait()
            wait_for_ranks()  # every rank's files are durable before the marker says so
            self._commit()
            wait_for_ranks()  # and the marker is there for every rank (export and resume read it next)

    def completed(self) -> list[dict]:
        found, self._completed = self._completed, []
        return found

    def _commit(self) -> None:
        step, folder, meta, began, stall = self.pending
        self.pending = None
        self.writer.wait()  # done already: raises what the write raised
        written, seconds = self.writer.bytes, self.writer.seconds
        self.writer.bytes, self.writer.seconds = 0, 0.0
        if self.rank == 0:
            _commit_checkpoint(self.run_dir, folder, step, meta, self.keep, self.derived)
        self._completed.append({"checkpoint_step": step, "checkpoint_stall_s": round(stall, 4),
                                "checkpoint_write_s": round(seconds, 4), "checkpoint_mb": round(written / 2**20, 3),
                                "checkpoint_complete_after_s": round(time.perf_counter() - began, 3)})


def check_run_dir(run_dir: str) -> None:
    """A training run folder is a file system's: checkpoints are written (by DeepSpeed and torch)
    into files renamed into place, and the metrics appended, which an object store cannot do. Data
    may come from s3:// all the same."""
    if is_url(run_dir):
        raise InputError(f"run_dir {run_dir}: a training run writes its checkpoints and logs to a file system (shared "
                         "storage on several nodes), not an object store; the data (data.shards) may be on s3://")


def write_run_config(run_dir: str, cfg, rank: int) -> None:
    """The resolved run config as ``run_dir/config.yaml`` (rank 0, atomically): what the run was
    started with, and what ``export`` rebuilds the model from."""
    if rank == 0:
        write_config(os.path.join(run_dir, "config.yaml"), cfg)


def read_run_config(run_dir: str, cls: type):
    """``cls`` from ``run_dir/config.yaml`` as ``write_run_config`` wrote it (refused unless of the
    run config format)."""
    return load_run_config(os.path.join(run_dir, "config.yaml"), cls, NEW_RUN_DIR)


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
