"""The shard-stage runner: download, encode and caption are each one of these.

A shard stage turns items (chunks of an input list, or shards) into outputs, one task per item.
The task is idempotent (it returns ``skipped`` for an item whose done marker exists), so the
runner's part is the same for every stage:

1. as SLURM array task ``task_index`` of ``num_tasks``, keep only the task's block of items
   (``array_block``); the task then writes its own ``_summary.taskNNNNN.json``;
2. run the tasks on the executor the stage's ``Execution`` config names (``executor_for``: in this
   process, a local pool, Ray tasks or Ray actors), retrying failures;
3. write the summary, one schema for every stage (``summarize``), atomically; on Ray actors also
   where they ran (``ray_actors``: each placed or lost with its node's Ray id and time, and the
   node of each shard), on Ray tasks the node of each shard (``ray_tasks``);
4. raise StageFailed after writing it when items still fail: the rest stays done, a rerun
   retries only what failed.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lverse.core.errors import InputError
from lverse.core.files import atomic_write_json
from lverse.core.resources import default_workers, pick_device, worker_gpus
from lverse.core.shards import SUMMARY

from .local_pool import InProcess, LocalPool
from .ray_cluster import NodeTypesSizing, check_shared, cluster_resources, ray_pool
from .ray_tasks import RayActors, RayTasks
from .tasks import Executor, StageFailed, Task, TaskResult, run_tasks

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Execution:
    """Where and how a stage runs its tasks (the fields every shard stage's config has)."""

    executor: Literal["local", "ray"] = "local"  # local processes, or Ray (tasks; actors where a model is kept)
    workers: int = 1  # tasks in flight: local processes or Ray actors; 0: in this process, one at a time (local)
    threads: int | None = None  # compute threads per worker (None: its share; core/resources.py)
    retries: int = 1  # times a failed item is tried again
    ray_address: str | None = None  # Ray cluster to join (None: start a local one)
    task_index: int | None = None  # as SLURM array task i of num_tasks: only its block of items
    num_tasks: int = 1  # the number of array tasks

    def __post_init__(self):
        if self.executor not in ("local", "ray"):
            raise InputError(f"executor must be 'local' or 'ray', got {self.executor!r}")
        if self.ray_address and self.executor != "ray":
            raise InputError(f"ray_address {self.ray_address} is the Ray cluster of executor ray: add --executor ray "
                             "(executor: ray in a YAML file)")
        if self.workers is not None and (self.workers < 0 or self.workers == 0 and self.executor != "local"):
            raise InputError(f"workers {self.workers}: give at least 1, or 0 to run the items in this process (on "
                             f"the local executor only)")


@dataclass(frozen=True, kw_only=True)
class ModelExecution(Execution):
    """A stage that keeps a model in each worker (encode, caption, generate): one per GPU."""

    workers: int | None = None  # model replicas, processes or Ray actors (None: one per GPU, else 1; Ray: all it
    # holds); 0: one replica in this process (local)
    device: str = "auto"  # cuda when available, else cpu
    gpus_per_worker: float = 1.0  # Ray: GPUs per replica; below 1 shares a GPU (only when asked)
    # Ray: the cluster's autoscaling config (`ray up`'s YAML, or ~/ray_bootstrap_config.yaml on its head): actors
    # then ask for what its node types offer and wait for the nodes the autoscaler adds (None: size to the nodes up)
    ray_node_types: str | None = None
    ray_wait: float = 900.0  # Ray: seconds the stage waits with no actor placed (nodes starting) before it gives up

    def __post_init__(self):
        super().__post_init__()
        if self.ray_node_types and self.executor != "ray":
            raise InputError(f"ray_node_types {self.ray_node_types} describes a Ray cluster: add --executor ray")
        if self.ray_wait <= 0:
            raise InputError(f"ray_wait must be positive (seconds), got {self.ray_wait}")


def array_block(count: int, task_index: int, num_tasks: int) -> range:
    """Items of array task ``task_index`` of ``num_tasks`` over ``count`` items: a contiguous block,
    the first ``count % num_tasks`` blocks one longer."""
    if not 0 <= task_index < num_tasks:
        raise InputError(f"task index {task_index} is not in 0..{num_tasks - 1}")
    size, extra = divmod(count, num_tasks)
    start = task_index * size + min(task_index, extra)
    return range(start, start + size + (task_index < extra))


def run_shard_stage(stage: str, task: Task, items: Sequence[Any], names: Sequence[str], output: str,
                    run: Execution, *, totals: Callable[[list[TaskResult], float], dict],
                    rate_of: str | None = None) -> dict:
    """Run ``task`` over ``items`` (or the array task's block of them) on the executor ``run``
    names (``executor_for``) and write the summary.

    ``totals(results, seconds)`` adds the stage's own figures to the summary.
    """
    summary_path = os.path.join(output, SUMMARY)
    if run.task_index is not None:
        block = array_block(len(items), run.task_index, run.num_tasks)
        items, names = [items[i] for i in block], [names[i] for i in block]
        summary_path = os.path.join(output, f"_summary.task{run.task_index:05d}.json")
        log.info("array task %d of %d: %s", run.task_index, run.num_tasks, list(names))
    executor = executor_for(stage, run, output, len(items))
    start = time.time()
    results = run_tasks(task, items, names, executor, retries=run.retries, desc=stage, rate_of=rate_of)
    seconds = time.time() - start
    summary = summarize(stage, results, seconds) | totals(results, seconds)
    if isinstance(executor, RayActors):  # where the actors ran, as the cluster grew and shrank
        summary["ray_actors"] = {"events": executor.actor_log.events, "shard_node_ids": executor.actor_log.item_nodes}
    elif isinstance(executor, RayTasks):  # which node did each item
        summary["ray_tasks"] = {"shard_node_ids": executor.item_nodes}
    atomic_write_json(summary_path, summary)
    log.info("%s summary: %s", stage, json.dumps(summary))
    if summary["failed"]:
        raise StageFailed(f"{stage}: {len(summary['failed'])} of {len(results)} shards failed after retries (see "
                          f"{summary_path}; a rerun retries them): " +
                          "; ".join(f"{f['shard']}: {f['reason']}" for f in summary["failed"][:5]))
    return summary


def executor_for(stage: str, run: Execution, output: str, count: int) -> Executor:
    """The executor of ``run``, for ``count`` items writing into ``output``.

    On Ray the output folder must be one every node sees (``check_shared``); a stage that keeps a
    model (its config a ``ModelExecution``) runs on actors that each load their model once
    (``ray_pool`` sizes them and their resources: from the nodes that are up, or from the node
    types of an autoscaling cluster's config), any other on one Ray task per item. On this
    machine: with 0 workers in this process, else on a pool of processes, a model stage's each
    with its own GPU (``worker_gpus``, one per GPU by default: ``default_workers``); the device
    this process would pick is logged.
    """
    if run.executor == "ray":
        if not isinstance(run, ModelExecution):
            check_shared(run.ray_address, output)
            return RayTasks(run.ray_address, threads=run.threads)
        sizing = None
        if run.ray_node_types:  # checked against the node types before joining the cluster
            sizing = NodeTypesSizing(run.ray_node_types, lambda types: ray_pool(
                {}, run.device, run.workers, run.gpus_per_worker, cpus_per_worker=run.threads or 1, types=types))
            pool = sizing.pool
            check_shared(run.ray_address, output)
        else:
            check_shared(run.ray_address, output)
            pool = ray_pool(cluster_resources(run.ray_address), run.device, run.workers, run.gpus_per_worker,
                            cpus_per_worker=run.threads or 1)
        log.info("%s: %s", stage, pool.describe())
        return RayActors(run.ray_address, pool, run.threads, wait=run.ray_wait, sizing=sizing)
    workers, gpus = run.workers, []
    if isinstance(run, ModelExecution):
        log.info(pick_device(run.device).describe(stage))
        workers = default_workers(run.device) if run.workers is None else run.workers
        gpus = worker_gpus(min(workers, count), run.device) if workers else []
    return LocalPool(workers, run.threads, tuple(gpus)) if workers else InProcess()


def summarize(stage: str, results: list[TaskResult], seconds: float) -> dict:
    """The part of ``_summary.json`` every shard stage writes."""
    return {"stage": stage, "shards": len(results),
            "done": sum(r.ok and not r.skipped for r in results),
            "done_shards": [r.name for r in results if r.ok and not r.skipped],
            "skipped": sum(r.skipped for r in results),
            "failed": [{"shard": r.name, "reason": r.reason} for r in results if not r.ok],
            "seconds": round(seconds, 1),
            "nodes": dict(collections.Counter(r.node for r in results if r.ok and not r.skipped)),
            "shard_nodes": {r.name: r.node for r in results if r.ok and not r.skipped}}


def rate(count: float, seconds: float) -> float:
    return round(count / max(seconds, 1e-9), 2)
