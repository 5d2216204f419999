"""Run one picklable task per item on an executor, retrying failures from the driver.

A task is ``fn(item) -> TaskResult``; it reports a failure as a result with a reason rather than
raising, and it is idempotent (it skips work already done), so running it again is always safe.
``run_tasks`` hands the items to an ``Executor`` in rounds: the first round all of them, each
further one (up to ``retries``) those that failed. The executors, one module each, all built by
the stage runner (``stage.py``) from a stage's ``Execution`` config:

    local_pool   InProcess: the items one after another in this process; LocalPool: a pool of
                 spawned processes on this machine (lifetime.py: they die with the driver)
    ray_tasks    RayTasks: one Ray task per item; RayActors: actors that keep their state (a
                 model) between items, sized by ray_cluster.ray_pool

Every worker process or actor runs its share of the CPU's threads (``core/resources.py``): in a
local pool ``cores // workers``, on Ray the CPUs Ray gives it, unless the user set a number.

Stopping: Ctrl-C (or SIGTERM, which the CLI turns into the same) reaches the driver, which cancels
every queued item and ends the workers at once (closing the round's iterator is what tells the
executor): the items in flight are abandoned, and since every output is written under a temporary
name and renamed, nothing half-written is left that a rerun would take for done (the rerun removes
the temporaries). While the driver ends its workers, a second Ctrl-C (or SIGTERM) ends the driver
at once (``lifetime.stopping``), its workers still dying with it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tqdm import tqdm

log = logging.getLogger(__name__)


class StageFailed(Exception):
    """A failure that is no bug, told on one line with what to do (status 1): some items of a stage
    still failed after every retry (the rest are done and kept), a private Ray lost, a training
    run's DataLoader worker died or its DeepSpeed op did not build."""


@dataclass
class TaskResult:
    name: str  # the item, for people: a shard or chunk name
    ok: bool  # done (or found done)
    reason: str = ""  # why not, when not ok
    skipped: bool = False  # already done before this run
    stats: dict[str, Any] = field(default_factory=dict)
    node: str = ""  # the host that ran it (empty when the worker was lost with it)


@dataclass(frozen=True)
class Workers:
    """The workers of an executor whose pool changes with its cluster (Ray actors on an autoscaling
    cluster): placed and serving, waiting for a node, lost with theirs."""

    running: int
    pending: int
    lost: int

    def __str__(self) -> str:
        return f"{self.running} running, {self.pending} pending (waiting for nodes), {self.lost} lost"


Task = Callable[[Any], TaskResult]
Batch = list[tuple[int, Any, str]]  # (position, item, name) of each item of a round
# yields (position, result) as they finish, and (None, Workers) when an executor's workers change
Round = Callable[[Batch], Iterator[tuple[int | None, "TaskResult | Workers"]]]


class Executor(Protocol):
    """Where the items run."""

    def start(self, fn: Task, count: int, desc: str) -> Round:
        """Get ready to run ``fn`` over ``count`` items (logging how, under ``desc``); returns what
        runs one round. Closing a round's iterator before its end (an interrupt) ends the workers
        at once."""
        ...


def guarded(fn: Task, item: Any, name: str) -> TaskResult:
    """``fn(item)``, an exception turned into a failed result, with the host that ran it."""
    try:
        result = fn(item)
    except Exception as e:  # a bug or an unexpected failure in one item must not end the run
        log.exception("task %s failed", name)
        result = TaskResult(name=name, ok=False, reason=f"{type(e).__name__}: {e}")
    result.node = socket.gethostname()
    return result


def run_tasks(fn: Task, items: Sequence[Any], names: Sequence[str], executor: Executor, *, retries: int = 2,
              desc: str = "tasks", rate_of: str | None = None) -> list[TaskResult]:
    """Run ``fn`` over ``items`` on ``executor``; returns the last result of every item, in input order.

    Args:
        names: each item's name, for logs and results.
        retries: rounds after the first, each of the items that failed.
        desc: the progress bar's and the logs' name for the run (the stage).
        rate_of: a count in the results' stats (e.g. "images") whose rate the progress bar shows.
    """
    results: dict[int, TaskResult] = {}
    pending = list(range(len(items)))
    run_round = executor.start(fn, len(items), desc)
    progress = _Progress(len(items), desc, rate_of)
    with progress.bar:
        for attempt in range(retries + 1):
            # closing(): an interrupt that lands here, between results, still ends the workers at once
            with contextlib.closing(run_round([(i, items[i], names[i]) for i in pending])) as running:
                for i, result in running:
                    if i is None:
                        progress.workers(result)
                        continue
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
    """One bar per stage: items done of all, the rate of ``rate_of`` units, failures, how many
    items each node has done (on a cluster), and the workers running, pending and lost where they
    change with the cluster (also logged at each change)."""

    def __init__(self, total: int, desc: str, rate_of: str | None):
        self.bar = tqdm(total=total, desc=desc, unit="shard")
        self.desc, self.rate_of, self.units, self.failed, self.started = desc, rate_of, 0, 0, time.time()
        self.by_node: dict[str, int] = {}
        self.pool: Workers | None = None

    def workers(self, pool: Workers) -> None:
        if pool != self.pool:
            log.info("%s: actors %s", self.desc, pool)
        self.pool = pool
        self.show()

    def add(self, result: TaskResult) -> None:
        if not result.ok:
            self.failed += 1
        else:
            self.bar.update(1)
            if not result.skipped:
                self.by_node[result.node] = self.by_node.get(result.node, 0) + 1
                if self.rate_of:
                    self.units += result.stats.get(self.rate_of, 0)
        self.show()

    def show(self) -> None:
        postfix = {}
        if self.rate_of:
            postfix[f"{self.rate_of}/s"] = f"{self.units / max(time.time() - self.started, 1e-9):.2f}"
        if self.failed:
            postfix["failed"] = self.failed
        if len(self.by_node) > 1:
            postfix["nodes"] = " ".join(f"{node}:{n}" for node, n in sorted(self.by_node.items()))
        if self.pool:
            postfix["actors"] = f"{self.pool.running} running {self.pool.pending} pending {self.pool.lost} lost"
        self.bar.set_postfix(postfix)
