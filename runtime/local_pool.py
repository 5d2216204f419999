"""The executors of one machine: the items in this process, or on a pool of spawned processes.

``InProcess`` (``workers 0``) runs the items one after another in the driver: what a debugger or a
profiler needs, and no process start to pay. ``LocalPool`` runs them on spawned processes, not
daemonic, so a task may start its own processes. Each worker first makes sure it dies with the
driver, and takes along what it starts (``lifetime.py``), leaves Ctrl-C to the driver, and takes
its threads and its GPU. On Ctrl-C the driver cancels the queue and ends the workers at once
(``end_pool``), in flight or not (``tasks.py`` on stopping).
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass

from lverse.core.resources import apply_threads, plan_threads

from .lifetime import die_with_parent, guard_group, stopping
from .tasks import Round, Task, TaskResult, guarded

log = logging.getLogger(__name__)


class InProcess:
    """The items one after another in this process. Nothing is started, so nothing is left to end:
    Ctrl-C (a KeyboardInterrupt, which ``guarded`` lets through) stops the item in flight, whose
    outputs are still under their temporary names. The process keeps its threads and device, and
    what a task caches (a model) stays for the process's life, as in a worker."""

    def start(self, fn: Task, count: int, desc: str) -> Round:
        log.info("%s: in this process (workers 0), with its threads as they are", desc)

        def run_round(batch):
            for i, item, name in batch:
                yield i, guarded(fn, item, name)
        return run_round


@dataclass(frozen=True)
class LocalPool:
    """A pool of ``workers`` spawned processes on this machine, started afresh each round."""

    workers: int  # processes
    threads: int | None = None  # compute threads of each (None: its share of the cores, core/resources.py)
    gpus: tuple[str, ...] = ()  # the CUDA_VISIBLE_DEVICES of each worker, one entry a worker (worker_gpus)

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"a local pool of {self.workers} workers: give at least 1 (InProcess runs the items "
                             "in this process)")

    def start(self, fn: Task, count: int, desc: str) -> Round:
        plan = plan_threads(min(self.workers, count), threads=self.threads)
        log.info("%s: %s", desc, plan.describe())
        gpus = list(self.gpus[:self.workers])
        if gpus:
            log.info("%s: worker GPUs (CUDA_VISIBLE_DEVICES of each): %s", desc, ", ".join(gpus))

        def run_round(batch):
            # _start_worker runs in each fresh process before the task (and torch) is unpickled there;
            # each takes one GPU from the queue (a pool starts each of its processes once).
            context = mp.get_context("spawn")
            # A pool that cannot start, or a worker that dies while the pool still starts the others
            # (the pool is then broken), fails this round's items that it did not take, on one line
            # each; a retry gets a new pool. Seen in chaos hunts: multiprocessing's resource tracker
            # killed as the pool's queues register with it (BrokenPipeError), a worker killed while
            # it was spawned (BrokenProcessPool, or OSError for the spawn's closed pipe).
            try:
                slots = None
                if gpus:
                    slots = context.Queue()
                    for gpu in gpus:
                        slots.put(gpu)
                pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=context,
                                              initializer=_start_worker, initargs=(os.getpid(), plan.threads, slots))
            except OSError as e:
                for i, _, name in batch:
                    yield i, TaskResult(name=name, ok=False, reason=f"no worker pool: {type(e).__name__}: {e}")
                return
            try:
                futures, unsent = {}, []
                for i, item, name in batch:
                    try:
                        futures[pool.submit(guarded, fn, item, name)] = (i, name)
                    except (cf.BrokenExecutor, OSError) as e:
                        unsent.append((i, name, e))
                for future in cf.as_completed(futures):
                    i, name = futures[future]
                    try:
                        yield i, future.result()
                    except Exception as e:  # the worker process died
                        yield i, TaskResult(name=name, ok=False, reason=f"worker died: {e}")
                for i, name, e in unsent:
                    yield i, TaskResult(name=name, ok=False, reason=f"no worker to run it: {type(e).__name__}: {e}")
            except BaseException:  # interrupted (or closed early): cancel the queue, end the workers now
                with stopping():
                    end_pool(pool)
                raise
            pool.shutdown()
        return run_round


def _start_worker(driver: int, threads: int, slots=None) -> None:
    """Every local worker process, first: die with the driver (PID ``driver``), take whatever it
    starts along when it dies, leave Ctrl-C to the driver, take its threads and its GPU (before
    CUDA starts in it)."""
    die_with_parent(driver)
    guard_group()
    if slots is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slots.get(timeout=60)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    apply_threads(threads)


def end_pool(pool: cf.ProcessPoolExecutor, grace: float = 3.0) -> None:
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
