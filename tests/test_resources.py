"""Each worker's share of the CPU (core/resources.py): the split, the user's word, and that the
local pool's workers really run with it."""

from __future__ import annotations

import pytest

from lverse.core.resources import plan_threads
from lverse.runtime.distributed import local_world_size
from lverse.runtime.executors import TaskResult, run_tasks


@pytest.mark.parametrize("cores, workers, threads", [(64, 4, 16), (64, 8, 8), (2, 2, 1), (2, 1, 2), (3, 2, 1),
                                                     (2, 8, 1), (1, 1, 1)])
def test_each_worker_gets_its_share_of_the_cores_and_at_least_one(cores, workers, threads):
    plan = plan_threads(workers, cores=cores, env={})
    assert (plan.threads, plan.source) == (threads, "share")
    assert plan.describe().startswith(f"{workers} workers x {threads} threads on {cores} cores")


def test_the_users_number_wins_and_is_said():
    assert plan_threads(4, cores=64, env={"OMP_NUM_THREADS": "3"}).threads == 3
    assert "OMP_NUM_THREADS as given" in plan_threads(4, cores=64, env={"OMP_NUM_THREADS": "3"}).describe()
    assert plan_threads(4, cores=64, threads=5, env={"OMP_NUM_THREADS": "3"}).threads == 5  # --threads first
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='two'"):
        plan_threads(1, cores=2, env={"OMP_NUM_THREADS": "two"})


def test_ranks_on_a_node_are_counted_from_each_launcher():
    assert local_world_size({"LOCAL_WORLD_SIZE": "8"}) == 8  # torchrun
    assert local_world_size({"LOCAL_SIZE": "4"}) == 4  # the deepspeed launcher
    assert local_world_size({"SLURM_STEP_TASKS_PER_NODE": "4(x2)"}) == 4
    assert local_world_size({}) == 1


def report_threads(item):
    import os

    import torch
    threads = {"torch": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"]}
    return TaskResult(str(item), ok=True, stats=threads)


def test_local_workers_run_with_their_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("lverse.core.resources.available_cores", lambda: 4)  # the driver plans for 4 cores
    results = run_tasks(report_threads, [0, 1], ["a", "b"], workers=2, retries=0)
    assert [r.stats for r in results] == [{"torch": 2, "omp": "2"}] * 2
    results = run_tasks(report_threads, [0, 1], ["a", "b"], workers=2, retries=0, threads=1)
    assert [r.stats for r in results] == [{"torch": 1, "omp": "1"}] * 2
