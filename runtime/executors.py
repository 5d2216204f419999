"""Run one picklable task per shard on a swappable executor, retrying failures from the driver.

A task is ``fn(item) -> TaskResult``; it reports a failure as a result with a reason rather than
raising, and it is idempotent (it skips work already done), so running it again is always safe.
Executors:

- ``local``: a pool of spawned processes on this machine (not daemonic, so a task may start its
  own processes); with ``workers=0``, no pool: the items run one after another in this process
  (``_inline_runner``: what a debugger or a profiler needs, and no process start to pay).
- ``ray``: one Ray task per item on a Ray cluster (``ray_address``; None starts a local one), or,
  with ``actors``, a pool of that many actors that each keep their state (a model) between items.

Every worker process or actor runs its share of the CPU's threads (``resources.py``): on the local
executor ``cores // workers``, on Ray the CPUs Ray gives it, unless the user set a number.

The driver retries failed items up to ``retries`` times. Ray itself retries only system failures
(a dead worker), which the driver sees as an exception and retries the same way.

Stopping: Ctrl-C (or SIGTERM, which the CLI turns into the same) reaches the driver, which cancels
every queued item and ends the workers at once: the items in flight are abandoned, and since every
output is written under a temporary name and renamed, nothing half-written is left that a rerun
would take for done (the rerun removes the temporaries). Local workers ignore SIGINT (the driver
decides) and die with the driver however it dies, also by SIGKILL (Linux's parent-death signal);
whatever a worker starts (a library's processes, a tool) dies with the worker (``_guard_group``). On Ray
the driver kills its actors and leaves Ray (``ray.shutdown``), which ends the tasks of a driver that
has gone. While it does, a second Ctrl-C
(or SIGTERM) ends the driver at once (``_stopping``), its workers still dying with it.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.resources import apply_threads, plan_threads

log = logging.getLogger(__name__)


class StageFailed(Exception):
    """Some items of a stage still failed after every retry (the rest are done and kept)."""


@dataclass
class TaskResult:
    name: str  # the item, for people: a shard or chunk name
    ok: bool  # done (or found done)
    reason: str = ""  # why not, when not ok
    skipped: bool = False  # already done before this run
    stats: dict[str, Any] = field(default_factory=dict)
    node: str = ""  # the host that ran it (empty when the worker was lost with it)


def _guarded(fn: Callable[[Any], TaskResult], item: Any, name: str) -> TaskResult:
    try:
        result = fn(item)
    except Exception as e:  # a bug or an unexpected failure in one item must not end the run
        log.exception("task %s failed", name)
        result = TaskResult(name=name, ok=False, reason=f"{type(e).__name__}: {e}")
    result.node = socket.gethostname()
    return result


def run_tasks(fn: Callable[[Any], TaskResult], items: Sequence[Any], names: Sequence[str], *,
              executor: str = "local", workers: int = 1, retries: int = 2, desc: str = "tasks",
              ray_address: str | None = None, num_cpus: float = 1, num_gpus: float = 0,
              actors: int = 0, rate_of: str | None = None, threads: int | None = None,
              gpus: Sequence[str] = ()) -> list[TaskResult]:
    """Run ``fn`` over ``items``; returns the last result of every item, in input order.

    ``num_cpus``/``num_gpus`` are Ray resources per task or actor; ``actors`` > 0 runs the items
    on that many Ray actors, each handed a whole item at a time. ``rate_of``: a count in the
    results' stats (e.g. "images") whose rate the progress bar shows. ``threads``: compute threads
    per worker (None: its share, see the module doc). ``gpus``: on the local executor, the
    CUDA_VISIBLE_DEVICES of each worker process, one entry per worker (``resources.worker_gpus``).
    """
    if executor not in ("local", "ray"):
        raise InputError(f"executor must be 'local' or 'ray', got {executor!r}")
    results: dict[int, TaskResult] = {}
    pending = list(range(len(items)))
    if executor == "local" and workers == 0:
        log.info("%s: in this process (workers 0), with its threads as they are", desc)
        submit = _inline_runner(fn)
    elif executor == "local":
        plan = plan_threads(min(workers, len(items)), threads=threads)
        log.info("%s: %s", desc, plan.describe())
        if gpus:
            log.info("%s: worker GPUs (CUDA_VISIBLE_DEVICES of each): %s", desc, ", ".join(gpus[:workers]))
        submit = _local_runner(fn, workers, plan.threads, list(gpus[:workers]))
    else:
        per_worker = plan_threads(1, cores=max(1, int(num_cpus)), threads=threads).threads
        log.info("%s: %s threads in each Ray %s (%s CPUs each)", desc, per_worker, "actor" if actors else "task",
                 num_cpus)
        submit = (_ray_actor_runner(fn, ray_address, num_cpus, num_gpus, actors, per_worker) if actors
                  else _ray_runner(fn, ray_address, num_cpus, per_worker))
    progress = _Progress(len(items), desc, rate_of)
    with progress.bar:
        for attempt in range(retries + 1):
            # closing(): an interrupt that lands here, between results, still ends the workers at once
            with contextlib.closing(submit([(i, items[i], names[i]) for i in pending])) as running:
                for i, result in running:
                    results[i] = result
                    progress.add(result)
            pending = [i for i in pending if not results[i].ok]
            if not pending:
                break
            if attempt < retries:
                log.warning("%d of %d %s failed; retrying (%d of %d): %s", len(pending), len(items), desc,
                            attempt + 1, retries, "; ".join(
                                f"{results[i].name}{' on ' + results[i].node if results[i].node else ''}: "
                                f"{results[i].reason}" for i in pending[:5]))
    return [results[i] for i in range(len(items))]


class _Progress:
    """One bar per stage: items done of all, the rate of ``rate_of`` units, failures, and how many
    items each node has done (on a cluster)."""

    def __init__(self, total: int, desc: str, rate_of: str | None):
        self.bar = tqdm(total=total, desc=desc, unit="shard")
        self.rate_of, self.units, self.failed, self.started = rate_of, 0, 0, time.time()
        self.by_node: dict[str, int] = {}

    def add(self, result: TaskResult) -> None:
        if not result.ok:
            self.failed += 1
        else:
            self.bar.update(1)
            if not result.skipped:
                self.by_node[result.node] = self.by_node.get(result.node, 0) + 1
                if self.rate_of:
                    self.units += result.stats.get(self.rate_of, 0)
        postfix = {}
        if self.rate_of:
            postfix[f"{self.rate_of}/s"] = f"{self.units / max(time.time() - self.started, 1e-9):.2f}"
        if self.failed:
            postfix["failed"] = self.failed
        if len(self.by_node) > 1:
            postfix["nodes"] = " ".join(f"{node}:{n}" for node, n in sorted(self.by_node.items()))
        self.bar.set_postfix(postfix)


def _inline_runner(fn):
    """The items one after another in this process. Nothing is started, so nothing is left to end:
    Ctrl-C (a KeyboardInterrupt, which ``_guarded`` lets through) stops the item in flight, whose
    outputs are still under their temporary names. The process keeps its threads and device, and
    what a task caches (a model) stays for the process's life, as in a worker."""
    def submit(batch):
        for i, item, name in batch:
            yield i, _guarded(fn, item, name)
    return submit


def _local_runner(fn, workers, threads, gpus):
    def submit(batch):
        # _start_worker runs in each fresh process before the task (and torch) is unpickled there;
        # each takes one GPU from the queue (a pool starts each of its processes once).
        context = mp.get_context("spawn")
        slots = None
        if gpus:
            slots = context.Queue()
            for gpu in gpus:
                slots.put(gpu)
        pool = cf.ProcessPoolExecutor(max_workers=max(1, workers), mp_context=context,
                                      initializer=_start_worker, initargs=(threads, slots))
        try:
            futures = {pool.submit(_guarded, fn, item, name): (i, name) for i, item, name in batch}
            for future in cf.as_completed(futures):
                i, name = futures[future]
                try:
                    yield i, future.result()
                except Exception as e:  # the worker process died
                    yield i, TaskResult(name=name, ok=False, reason=f"worker died: {e}")
        except BaseException:  # interrupted (or closed early): cancel the queue, end the workers now
            with _stopping():
                _end_pool(pool)
            raise
        pool.shutdown()
    return submit


def _start_worker(threads: int, slots=None) -> None:
    """Every local worker process, first: die with the driver, take whatever it starts along when
    it dies, leave Ctrl-C to the driver, take its threads and its GPU (before CUDA starts in it)."""
    _die_with_parent()
    _guard_group()
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get(timeout=60)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_threads(threads)


def _die_with_parent() -> None:
    """Have Linux SIGKILL this process when its parent dies, however the parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def _guard_group() -> None:
    """Lead a process group of its own, and fork a guard that SIGKILLs that group as soon as this
    worker ends, however it ends.

    Why: the parent-death signal is set by the worker for itself and is not inherited, and a
    library's processes do not set theirs: a worker SIGKILLed (its parent-death signal after the
    driver was SIGKILLed) or SIGTERMed (``_end_pool`` on Ctrl-C) would leave what its task started
    running, writing into an output a rerun writes too. No stage's task starts processes today
    (download runs img2dataset's downloader in the worker); the guard costs one fork per worker and
    covers the one that will. Every process the worker starts, and every one those start, inherits
    its process group (unless it leaves on purpose with setsid or setpgid; torch and
    multiprocessing do not), so one kill of the group ends them all, however deep. Someone has to
    outlive the worker to send it: the guard, a forked child that only waits for its own
    parent-death signal. The simpler-looking ways fall short: a child subreaper keeps its orphans
    but does not end them when it dies itself; a library's pool takes no initializer through which
    its processes could set a parent-death signal; a PID namespace needs privileges. (Ray already
    starts each of its workers in a process group of its own, and the Ray tests see nothing of a
    cancelled task left.) tests/test_stop.py has a task start a process and SIGKILLs the driver.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        os.setpgid(0, 0)
    except OSError:  # a session leader (not started by our pool) cannot: nothing to guard
        return
    # In a group of its own the worker is a background job of a terminal the driver runs in; with
    # `stty tostop` a background job that writes to the terminal (logs, progress bars) is stopped,
    # unless it ignores SIGTTOU (an ignored signal stays ignored in the processes it starts).
    signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    worker, wake = os.getpid(), {signal.SIGUSR1}
    signal.pthread_sigmask(signal.SIG_BLOCK, wake)  # before the fork: the guard cannot miss it
    if os.fork() == 0:  # the guard; the worker is still single-threaded here, the fork is safe
        try:
            libc.prctl(1, signal.SIGUSR1)  # 1: PR_SET_PDEATHSIG
            os.closerange(0, os.sysconf("SC_OPEN_MAX"))  # holds no pipe the driver waits on
            if os.getppid() == worker:  # else the worker is gone already
                signal.sigwait(wake)
            os.killpg(0, signal.SIGKILL)  # the worker's group, the guard included
        finally:  # never back into the worker's code (a failing guard leaves the worker be)
            os._exit(1)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, wake)


@contextlib.contextmanager
def _stopping():
    """While the driver ends its workers after a Ctrl-C or SIGTERM, another Ctrl-C or SIGTERM ends
    the driver at once: the signal's default action, the kernel's, which no busy Python code can
    delay. Its workers die with it all the same (parent-death signal and ``_guard_group``; Ray's
    processes share the fate of the driver that started them, and a cluster ends a lost driver's
    tasks). Without this, a second Ctrl-C landing in ``_end_pool`` before the workers were ended
    would leave them running their shards, and the interpreter's exit would wait for them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, signal.SIG_DFL)
    try:
        yield
    finally:  # the stop goes on (the caller's own handlers again)
        for s, handler in previous.items():
            if handler is not None:
                signal.signal(s, handler)


def _end_pool(pool: cf.ProcessPoolExecutor, grace: float = 3.0) -> None:
    """Cancel what is queued and end the workers, in flight or not, within ``grace`` seconds."""
    processes = list(getattr(pool, "_processes", {}).values())  # the executor offers no public handle
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.terminate()
    deadline = time.time() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.time()))
        if p.is_alive():
            p.kill()


def _init_ray(address):
    """Join ``address`` ("auto": the running cluster), else RAY_ADDRESS, else a private local Ray.

    ``ray.init()`` with no address would attach to whatever `ray start` left on this machine;
    "local" always starts a fresh one.
    """
    import ray
    if not ray.is_initialized():
        _check_answers(address or os.environ.get("RAY_ADDRESS"))
        # ray.init installs its own SIGTERM handler, which ends the driver without ending its
        # workers; the driver's own (the CLI takes SIGTERM as Ctrl-C) is put back, kept (_kept).
        main = threading.current_thread() is threading.main_thread()
        previous = signal.getsignal(signal.SIGTERM) if main else None
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False,
                 log_to_driver=False)
        if main and previous is not None:
            signal.signal(signal.SIGTERM, _keeping(previous) if callable(previous) else previous)
    return ray


_kept: list[BaseException] = []  # what the driver's SIGTERM handler raised last, while Ray is in use


def _keeping(handler):
    """``handler``, keeping what it raises in ``_kept`` (see ``_ray_calls``)."""
    if hasattr(handler, "keeps"):  # kept already (Ray started again in this process)
        return handler

    def on_signal(signum, frame):
        try:
            handler(signum, frame)
        except BaseException as e:
            _kept[:] = [e]
            raise
    on_signal.keeps = handler
    return on_signal


@contextlib.contextmanager
def _ray_calls():
    """Around the driver's waits on Ray: put back the exception the driver's SIGTERM handler raised.

    Ray checks for signals while it waits (ray.wait, ray.get) and turns any KeyboardInterrupt a
    handler raises there, the CLI's ``Terminated`` (its SIGTERM) included, into a plain
    KeyboardInterrupt: the CLI would take a SIGTERM that landed there for a Ctrl-C (exit status
    130, not 143)."""
    _kept.clear()
    try:
        yield
    except KeyboardInterrupt as e:
        if type(e) is KeyboardInterrupt and _kept and _kept[0] is not e:
            raise _kept.pop() from None
        raise


def cluster_resources(address: str | None) -> dict[str, float]:
    """The Ray cluster's resources ({"CPU": 48.0, "GPU": 8.0, ...}) at ``address`` (joined, or
    started, as ``run_tasks`` would)."""
    return dict(_init_ray(address).cluster_resources())


@dataclass(frozen=True)
class RayPool:
    actors: int  # model replicas
    num_cpus: float  # Ray resources each asks for
    num_gpus: float

    def describe(self) -> str:
        return (f"{self.actors} Ray actors, each {self.num_gpus:g} GPU and {self.num_cpus:g} CPU" if self.num_gpus
                else f"{self.actors} Ray actors, each {self.num_cpus:g} CPU")


def ray_pool(resources: dict[str, float], device: str, workers: int | None = None, gpus_per_worker: float = 1.0,
             cpus_per_worker: float = 1.0) -> RayPool:
    """The actors a model stage starts on a Ray cluster with ``resources``, and what each asks for.

    On CUDA (``device`` auto or cuda on a cluster with GPUs) each actor asks for
    ``gpus_per_worker`` GPUs: 1, one model per GPU (Ray then gives it its own CUDA_VISIBLE_DEVICES),
    or a share below 1 when the user asks to put several models on one GPU; by default as many
    actors as the GPUs hold. On CPUs each asks for ``cpus_per_worker`` CPUs, and by default as many
    as fit with one CPU left for the driver's and Ray's own tasks. Asking for more than the cluster
    has is an error naming the resource, not a queue that never moves.
    """
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if device == "cuda" and not gpus:
        raise InputError(f"device cuda: the Ray cluster has no GPU (its resources: {_resources_text(resources)}); "
                         "add GPU nodes or use device auto or cpu")
    if not 0 < gpus_per_worker <= 1:
        raise InputError(f"gpus_per_worker must be in (0, 1] (one model per GPU, or a share of one), "
                         f"got {gpus_per_worker}")
    if device in ("auto", "cuda") and gpus:
        most = int(gpus / gpus_per_worker + 1e-9)
        actors = workers or most
        if actors > most:
            raise InputError(f"{actors} workers x {gpus_per_worker:g} GPU need {actors * gpus_per_worker:g} GPUs; "
                             f"the Ray cluster has {gpus:g}: use --workers {most} or a smaller gpus_per_worker")
        return RayPool(actors, cpus_per_worker, gpus_per_worker)
    most = int((cpus - 1) // cpus_per_worker) if cpus > cpus_per_worker else int(cpus // cpus_per_worker)
    if most < 1:
        raise InputError(f"each worker asks for {cpus_per_worker:g} CPU; the Ray cluster has {cpus:g}")
    actors = workers or most
    if actors * cpus_per_worker > cpus:
        raise InputError(f"{actors} workers x {cpus_per_worker:g} CPU need {actors * cpus_per_worker:g} CPUs; "
                         f"the Ray cluster has {cpus:g}: use --workers {most}")
    return RayPool(actors, cpus_per_worker, 0.0)


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:g}" for k, v in sorted(resources.items()) if k in ("CPU", "GPU", "memory")) or "none"


def check_shared(address: str | None, folder: str) -> None:
    """Every node of the Ray cluster sees ``folder``: a marker written here must be visible from a
    task on each node, else outputs written there by one node would be lost to the rest (and to
    this driver). Raises InputError naming the nodes that do not see it. An object store's URL
    passes: every node reaches the same store (core/storage.py)."""
    import uuid
    if storage.is_url(folder):
        return
    ray = _init_ray(address)
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    os.makedirs(folder, exist_ok=True)
    marker = os.path.join(folder, f".lverse-shared-{uuid.uuid4().hex}")
    with open(marker, "w"):
        pass
    try:
        look = ray.remote(num_cpus=0)(_sees)
        refs = [look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker) for n in ray.nodes() if n.get("Alive")]
        seen = []
        with _ray_calls():
            for ref in refs:
                try:
                    seen.append(ray.get(ref, timeout=120))
                except ray.exceptions.TaskUnschedulableError:  # a node that has just died: it will get no work
                    pass
    finally:
        os.remove(marker)
    blind = [host for host, sees in seen if not sees]
    if blind:
        raise InputError(f"{os.path.abspath(folder)} is not visible from node(s) {', '.join(sorted(blind))}: on a "
                         "Ray cluster the output folder must be on storage every node shares (NFS, Lustre, ...)")


def _sees(path: str) -> tuple[str, bool]:
    return socket.gethostname(), os.path.exists(path)


def _check_answers(address: str | None, timeout: float = 10.0) -> None:
    """A ``host:port`` Ray address answers within ``timeout`` seconds (ray.init would wait far
    longer and then name no address); "auto", "local" and ray:// addresses are left to Ray."""
    if not address or address in ("auto", "local") or "://" in address or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise InputError(f"the Ray cluster at {address} does not answer ({e}): check --ray-address (the head's "
                         "GCS address, host:port) and that the head is running") from None


class _Actor:
    def __init__(self, fn, threads):
        apply_threads(threads)
        self.fn = fn

    def ready(self) -> str:
        return socket.gethostname()

    def run(self, item, name):
        return _guarded(self.fn, item, name)


def _ray_actor_runner(fn, address, num_cpus, num_gpus, count, threads):
    """Items on up to ``count`` actors. The round's actors (sized from the cluster's resources)
    each get an item at once, so the work spreads over the nodes from the start; after that an
    item goes to whichever actor is free. A lost actor's item is reported failed (the driver
    retries it), and the actor is not replaced while others serve the queue, so a cluster that
    lost a node does not wait for resources it no longer has; a replacement takes work only once
    it has started. The round's actors end with it."""
    ray = _init_ray(address)
    cls = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_Actor)

    def submit(batch):
        with _ray_calls():
            yield from run(batch)

    def run(batch):
        queue, running, starting, stopped = list(batch), {}, {}, False
        started = [cls.remote(fn, threads) for _ in range(min(count, len(batch)))]
        idle = list(started)
        try:
            while queue or running:
                while queue and idle:
                    actor = idle.pop()
                    i, item, name = queue.pop(0)
                    running[actor.run.remote(item, name)] = (i, name, actor)
                if queue and not (idle or running or starting):  # every actor lost: start one more
                    started.append(cls.remote(fn, threads))
                    starting[started[-1].ready.remote()] = started[-1]
                done, _ = ray.wait(list(running) + list(starting), num_returns=1)
                if done[0] in starting:
                    actor = starting.pop(done[0])
                    try:
                        ray.get(done[0])
                        idle.append(actor)
                    except Exception as e:  # it never started (its node died): leave it
                        log.warning("a Ray actor did not start: %s: %s", type(e).__name__, e)
                    continue
                i, name, actor = running.pop(done[0])
                try:
                    result = ray.get(done[0])
                    idle.append(actor)
                except Exception as e:  # the actor died, or its node: the driver retries the item
                    result = TaskResult(name=name, ok=False, reason=f"Ray actor lost: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}")
                yield i, result
        except BaseException:  # interrupted: the items in flight are abandoned with their actors
            stopped = True
            raise
        finally:  # done, or interrupted
            with _stopping() if stopped else contextlib.nullcontext():
                for actor in started:
                    ray.kill(actor)
                if stopped:
                    ray.shutdown()  # see _ray_runner
    return submit


def _threaded(threads, fn, item, name):
    apply_threads(threads)
    return _guarded(fn, item, name)


def _ray_runner(fn, address, num_cpus, threads):
    ray = _init_ray(address)
    remote = ray.remote(num_cpus=num_cpus, max_retries=1)(_threaded)

    def submit(batch):
        with _ray_calls():
            yield from run(batch)

    def run(batch):
        refs = {remote.remote(threads, fn, item, name): (i, name) for i, item, name in batch}
        waiting = list(refs)
        try:
            while waiting:
                done, waiting = ray.wait(waiting, num_returns=1)
                i, name = refs[done[0]]
                try:
                    result = ray.get(done[0])
                except Exception as e:  # worker or node lost after Ray's own retry
                    result = TaskResult(name=name, ok=False, reason=f"Ray task lost: {type(e).__name__}: {e}")
                yield i, result
        except BaseException:  # interrupted: the driver leaves, and Ray ends its tasks, queued or running
            # No ray.cancel first: Ray ends a job's tasks when its driver goes (as when the driver is
            # SIGKILLed), and a forced cancel racing a task's finish crashed the driver inside Ray
            # (a failed check in its TaskManager, exit 1 instead of 143; Ray 2.60, once in six suite runs).
            with _stopping():
                # Ray's shutdown (seconds), here, where another Ctrl-C ends the driver at once, rather
                # than at the interpreter's exit, where another Ctrl-C would break off the shutdown
                # and the interpreter then crash in Ray's threads (SIGSEGV, seen with Ray 2.60).
                ray.shutdown()
            raise
    return submit
