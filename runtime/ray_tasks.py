"""The executors of a Ray cluster: one Ray task per item, or actors that keep a model.

``RayTasks`` runs each item as a Ray task; ``RayActors`` runs them on a pool of actors that each
keep their state (a model) between items, sized by ``ray_cluster.ray_pool``. Ray itself retries
only system failures (a dead worker), which the driver sees as a failed result and retries as any
other (``tasks.run_tasks``).

Stopping: Ray ends the tasks and actors of a driver that has gone, however it went (Ray starts
each of its workers in a process group of its own and a cluster ends a lost driver's tasks). On
Ctrl-C the driver kills its actors and leaves Ray (``ray.shutdown``), which ends its tasks, queued
or running; a second Ctrl-C meanwhile ends the driver at once (``lifetime.stopping``).
"""

from __future__ import annotations

import contextlib
import logging
import socket
from dataclasses import dataclass

from lverse.core.resources import apply_threads, plan_threads

from .lifetime import stopping
from .ray_cluster import RayPool, join, ray_calls
from .tasks import Round, Task, TaskResult, guarded

log = logging.getLogger(__name__)


def _threads_of(cpus: float, threads: int | None) -> int:
    """Compute threads of a task or actor given ``cpus`` Ray CPUs (``threads``: the user's number)."""
    return plan_threads(1, cores=max(1, int(cpus)), threads=threads).threads


@dataclass(frozen=True)
class RayTasks:
    """One Ray task per item, on the cluster at ``address`` (None: RAY_ADDRESS, else a private local Ray)."""

    address: str | None = None
    num_cpus: float = 1  # Ray CPUs each task asks for
    threads: int | None = None  # compute threads of each (None: its Ray CPUs)

    def start(self, fn: Task, count: int, desc: str) -> Round:
        threads = _threads_of(self.num_cpus, self.threads)
        log.info("%s: %s threads in each Ray task (%s CPUs each)", desc, threads, self.num_cpus)
        ray = join(self.address)
        remote = ray.remote(num_cpus=self.num_cpus, max_retries=1)(_threaded)

        def run_round(batch):
            with ray_calls():
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
                with stopping():
                    # Ray's shutdown (seconds), here, where another Ctrl-C ends the driver at once, rather
                    # than at the interpreter's exit, where another Ctrl-C would break off the shutdown
                    # and the interpreter then crash in Ray's threads (SIGSEGV, seen with Ray 2.60).
                    ray.shutdown()
                raise
        return run_round


def _threaded(threads: int, fn: Task, item, name: str) -> TaskResult:
    apply_threads(threads)
    return guarded(fn, item, name)


@dataclass(frozen=True)
class RayActors:
    """Items on the actors of ``pool``, on the cluster at ``address`` (None: RAY_ADDRESS, else a
    private local Ray), each actor handed a whole item at a time.

    The round's actors each get an item at once, so the work spreads over the nodes from the
    start; after that an item goes to whichever actor is free. A lost actor's item is reported
    failed (the driver retries it), and the actor is not replaced while others serve the queue, so
    a cluster that lost a node does not wait for resources it no longer has; a replacement takes
    work only once it has started. The round's actors end with it."""

    address: str | None
    pool: RayPool
    threads: int | None = None  # compute threads of each (None: its Ray CPUs)

    def start(self, fn: Task, count: int, desc: str) -> Round:
        threads = _threads_of(self.pool.num_cpus, self.threads)
        log.info("%s: %s threads in each Ray actor (%s CPUs each)", desc, threads, self.pool.num_cpus)
        ray = join(self.address)
        cls = ray.remote(num_cpus=self.pool.num_cpus, num_gpus=self.pool.num_gpus)(_Actor)
        most = self.pool.actors

        def run_round(batch):
            with ray_calls():
                yield from run(batch)

        def run(batch):
            queue, running, starting, stopped = list(batch), {}, {}, False
            started = [cls.remote(fn, threads) for _ in range(min(most, len(batch)))]
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
                with stopping() if stopped else contextlib.nullcontext():
                    for actor in started:
                        ray.kill(actor)
                    if stopped:
                        ray.shutdown()  # see RayTasks
        return run_round


class _Actor:
    def __init__(self, fn: Task, threads: int):
        apply_threads(threads)
        self.fn = fn

    def ready(self) -> str:
        return socket.gethostname()

    def run(self, item, name: str) -> TaskResult:
        return guarded(self.fn, item, name)
