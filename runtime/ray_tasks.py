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
import time
from dataclasses import dataclass, field

from lverse.core.resources import apply_threads, plan_threads

from .lifetime import stopping
from .ray_cluster import NodeTypesSizing, RayPool, join, private_ray_lost, ray_calls
from .tasks import Round, StageFailed, Task, TaskResult, Workers, guarded

log = logging.getLogger(__name__)


def _threads_of(cpus: float, threads: int | None) -> int:
    """Compute threads of a task or actor given ``cpus`` Ray CPUs (``threads``: the user's number)."""
    return plan_threads(1, cores=max(1, int(cpus)), threads=threads).threads


@dataclass(frozen=True)
class RayTasks:
    """One Ray task per item, on the cluster at ``address`` (None: RAY_ADDRESS, else a private local Ray).

    Each task asks for ``num_cpus``; those no node has room for wait in Ray's queue, which is what
    makes an autoscaling cluster add nodes (a CPU worker type at min_workers 0 included), and run
    as nodes come. ``item_nodes`` records the Ray id of the node that did each item."""

    address: str | None = None
    num_cpus: float = 1  # Ray CPUs each task asks for
    threads: int | None = None  # compute threads of each (None: its Ray CPUs)
    item_nodes: dict[str, str] = field(default_factory=dict, compare=False)

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
                    _fail_if_private_ray_lost()  # no call to the GCS: the driver asks the processes it started
                    done, waiting = ray.wait(waiting, num_returns=1, timeout=5)
                    if not done:
                        continue
                    i, name = refs[done[0]]
                    try:
                        result, node = ray.get(done[0])
                        if result.ok and not result.skipped:
                            self.item_nodes[name] = node
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


def _threaded(threads: int, fn: Task, item, name: str) -> tuple[TaskResult, str]:
    """The item's result, and the Ray id of the node that ran it."""
    import ray
    apply_threads(threads)
    return guarded(fn, item, name), ray.get_runtime_context().get_node_id()


@dataclass
class ActorLog:
    """Where a stage's actors ran: each placed or lost, with its node's Ray id and when (seconds
    from the stage's start), and the node that did each item; for ``_summary.json``."""

    events: list[dict] = field(default_factory=list)
    item_nodes: dict[str, str] = field(default_factory=dict)
    began: float = field(default_factory=time.monotonic)

    def note(self, event: str, node: str) -> None:
        self.events.append({"seconds": round(time.monotonic() - self.began, 1), "event": event, "node": node})


@dataclass(frozen=True)
class RayActors:
    """Items on the actors of ``pool``, on the cluster at ``address`` (None: RAY_ADDRESS, else a
    private local Ray), each actor handed a whole item at a time.

    The round asks for all its actors at once; each takes work as soon as Ray places it, so work
    starts with the first and spreads as nodes join (on an autoscaling cluster the waiting actors
    are what makes the autoscaler add nodes). A lost actor's item is reported failed (the driver
    retries it) and another actor is asked for in its place, which waits for a node while the
    others serve the queue. With no actor placed for ``wait`` seconds the stage gives up
    (``ClusterUnavailable``), naming what the actors ask for. With ``sizing`` (an autoscaling
    cluster's node types) the round asks for more actors when the config file grows the cluster
    mid-stage, up to what the new types hold. The round's actors end with it."""

    address: str | None
    pool: RayPool
    threads: int | None = None  # compute threads of each (None: its Ray CPUs)
    wait: float = 900.0  # seconds with no actor placed before the stage gives up
    actor_log: ActorLog = field(default_factory=ActorLog, compare=False)
    sizing: NodeTypesSizing | None = field(default=None, compare=False)  # re-sizes the pool when its file changes

    def start(self, fn: Task, count: int, desc: str) -> Round:
        threads = _threads_of(self.pool.num_cpus, self.threads)
        log.info("%s: %s threads in each Ray actor (%s CPUs each)", desc, threads, self.pool.num_cpus)
        ray = join(self.address)
        cls = ray.remote(num_cpus=self.pool.num_cpus, num_gpus=self.pool.num_gpus)(_Actor)

        def run_round(batch):
            with ray_calls():
                yield from _Round(ray, lambda: cls.remote(fn, threads), self, len(batch)).run(batch)
        return run_round


class ClusterUnavailable(StageFailed):
    """No actor of a Ray stage could be placed in the time allowed: the cluster has, or made, no
    node for what they ask."""


class _Round:
    """One round of ``RayActors``: its actors, placed or waiting, and the items they run."""

    def __init__(self, ray, new_actor, owner: RayActors, count: int):
        self.ray, self.new_actor, self.owner = ray, new_actor, owner
        self.count = count
        self.size = min((owner.sizing.pool if owner.sizing else owner.pool).actors, count)
        self.started, self.waiting, self.idle, self.running = [], {}, [], {}
        self.node: dict = {}  # actor -> its node's Ray id
        self.lost = 0  # actors lost in all, placed or not
        self.since = time.monotonic()  # when the last actor was placed or lost, or the round began

    def resize(self) -> None:
        """Take a changed node types file's actor count (more nodes: more actors; fewer: no more
        asked for, none ended)."""
        pool = self.owner.sizing.changed() if self.owner.sizing else None
        if pool is None or min(pool.actors, self.count) == self.size:
            return
        log.info("the node types changed: %d actors now (%s)", min(pool.actors, self.count), pool.describe())
        self.size = min(pool.actors, self.count)

    def ask(self) -> None:
        """Ask for actors until the round has ``size``, placed or waiting (replacing lost ones)."""
        while len(self.waiting) + len(self.node) < self.size:
            actor = self.new_actor()
            self.started.append(actor)
            self.waiting[actor.ready.remote()] = actor

    def state(self) -> Workers:
        return Workers(len(self.node), len(self.waiting), self.lost)

    def run(self, batch):
        queue, stopped = list(batch), False
        try:
            while queue or self.running:
                if queue:
                    self.resize()
                    self.ask()
                    yield None, self.state()
                while queue and self.idle:
                    actor = self.idle.pop()
                    i, item, name = queue.pop(0)
                    self.running[actor.run.remote(item, name)] = (i, name, actor)
                self.give_up_if_stuck()
                done, _ = self.ray.wait(list(self.running) + list(self.waiting), num_returns=1, timeout=5)
                if not done:
                    continue
                if done[0] in self.waiting:
                    self.placed(done[0])
                    yield None, self.state()
                    continue
                i, name, actor = self.running.pop(done[0])
                try:
                    result = self.ray.get(done[0])
                    self.idle.append(actor)
                    self.owner.actor_log.item_nodes[name] = self.node[actor]
                except Exception as e:  # the actor died, or its node: the driver retries the item
                    result = TaskResult(name=name, ok=False, reason=f"Ray actor lost: {type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''}")
                    self.gone(actor)
                    yield None, self.state()
                yield i, result
        except BaseException:  # interrupted: the items in flight are abandoned with their actors
            stopped = True
            raise
        finally:  # done, or interrupted
            with stopping() if stopped else contextlib.nullcontext():
                for actor in self.started:
                    self.ray.kill(actor)
                if stopped:
                    self.ray.shutdown()  # see RayTasks

    def placed(self, ref) -> None:
        actor = self.waiting.pop(ref)
        try:
            node = self.ray.get(ref)
        except Exception as e:  # it never started
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if getattr(e, "actor_init_failed", False):  # its own start raised: another would too
                raise StageFailed(f"a Ray actor could not start: {reason}") from e
            # Its node died or was taken back (a spot node, the autoscaler removing one it found idle,
            # which happens in bursts): another is asked for, and the stage gives up only when none
            # has been placed for `wait` seconds (give_up_if_stuck).
            log.warning("a Ray actor did not start: %s", reason)
            self.lost += 1
            return
        self.node[actor] = node
        self.idle.append(actor)
        self.since = time.monotonic()
        self.owner.actor_log.note("placed", node)

    def gone(self, actor) -> None:
        self.lost += 1
        self.since = time.monotonic()
        self.owner.actor_log.note("lost", self.node.pop(actor))

    def give_up_if_stuck(self) -> None:
        if not self.node:
            _fail_if_private_ray_lost()
        if self.node or time.monotonic() - self.since < self.owner.wait:
            return
        raise ClusterUnavailable(
            f"no Ray actor could be placed in {self.owner.wait:g} s ({self.owner.pool.wants()}): no node of the "
            "cluster has that free, and none was added; check the autoscaler (`ray status`), the node types' "
            "max_workers, or give more time (--ray-wait)")


def _fail_if_private_ray_lost() -> None:
    """End the stage at once when its private local Ray can run nothing more; the same command
    starts a new one and goes on from the finished items."""
    lost = private_ray_lost()
    if lost:
        raise StageFailed(f"{lost}: nothing more can run on it; run the same command again, which starts a new "
                          "one and goes on from the finished items")


class _Actor:
    def __init__(self, fn: Task, threads: int):
        apply_threads(threads)
        self.fn = fn

    def ready(self) -> str:
        """The Ray id of the node it was placed on."""
        import ray
        return ray.get_runtime_context().get_node_id()

    def run(self, item, name: str) -> TaskResult:
        return guarded(self.fn, item, name)
