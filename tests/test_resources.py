"""What a worker runs on (core/resources.py): its share of the CPU (the split, the user's word,
and that the local pool's workers really run with it), and its device under every way a launcher
binds GPUs (tests/test_multinode.py checks the same rule under SLURM's own binding)."""

from __future__ import annotations

import os

import pytest

from lverse.core.errors import InputError
from lverse.core.resources import local_world_size, pick_device, plan_threads, worker_gpus
from lverse.runtime.local_pool import InProcess, LocalPool
from lverse.runtime.ray_cluster import RayPool, ray_pool
from lverse.runtime.stage import Execution, ModelExecution, executor_for
from lverse.runtime.tasks import TaskResult, run_tasks


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
    import torch
    threads = {"torch": torch.get_num_threads(), "omp": os.environ["OMP_NUM_THREADS"]}
    return TaskResult(str(item), ok=True, stats=threads)


def test_local_workers_run_with_their_share(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("lverse.core.resources.available_cores", lambda: 4)  # the driver plans for 4 cores
    results = run_tasks(report_threads, [0, 1], ["a", "b"], LocalPool(2), retries=0)
    assert [r.stats for r in results] == [{"torch": 2, "omp": "2"}] * 2
    results = run_tasks(report_threads, [0, 1], ["a", "b"], LocalPool(2, threads=1), retries=0)
    assert [r.stats for r in results] == [{"torch": 1, "omp": "1"}] * 2


def report_process(item):
    return TaskResult(str(item), ok=True, stats={"pid": os.getpid(), "threads": torch_threads()})


def torch_threads():
    import torch
    return torch.get_num_threads()


def test_zero_workers_run_the_items_in_this_process_with_its_threads_and_retry_there():
    """``workers=0``: no process is started, the driver's threads are left as they are, and a
    failed item is retried in the process too."""
    results = run_tasks(report_process, [0, 1, 2], ["a", "b", "c"], InProcess(), retries=0)
    assert [r.stats for r in results] == [{"pid": os.getpid(), "threads": torch_threads()}] * 3
    tries = []

    def fails_once(item):
        tries.append(item)
        return TaskResult(str(item), ok=len(tries) > 1, reason="first try")
    results = run_tasks(fails_once, [7], ["x"], InProcess(), retries=1)
    assert results[0].ok and tries == [7, 7]


def test_a_stage_runs_on_the_executor_its_config_names(tmp_path):
    """On this machine: 0 workers in this process, else a pool of processes; a model stage on a
    CPU one worker by default (``default_workers``), with no GPU to hand out. An executor that is
    neither local nor Ray is refused with the config, before any work."""
    output = str(tmp_path)
    assert isinstance(executor_for("s", Execution(workers=0), output, 3), InProcess)
    assert executor_for("s", Execution(workers=2, threads=3), output, 3) == LocalPool(2, 3)
    assert executor_for("s", ModelExecution(device="cpu"), output, 3) == LocalPool(1)
    assert isinstance(executor_for("s", ModelExecution(device="cpu", workers=0), output, 3), InProcess)
    with pytest.raises(InputError, match="executor must be 'local' or 'ray', got 'slurm'"):
        Execution(executor="slurm")
    with pytest.raises(InputError, match="0 to run the items in this process"):
        Execution(executor="ray", workers=0)


# What the rule sees: SLURM's or a launcher's variables, and the number of devices CUDA shows.
ONE_EACH = {"CUDA_VISIBLE_DEVICES": "5", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "4"}  # --gpus-per-task=1
CGROUP = {"SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "4"}  # ConstrainDevices: own GPU as device 0, no variable
SHARED = {"CUDA_VISIBLE_DEVICES": "0,1,2,3", "SLURM_LOCALID": "3", "SLURM_STEP_TASKS_PER_NODE": "4"}  # --gres=gpu:4
TORCHRUN = {"LOCAL_RANK": "6", "LOCAL_WORLD_SIZE": "8", "SLURM_LOCALID": "0"}  # torchrun inside one SLURM task


@pytest.mark.parametrize("env, count, device", [(ONE_EACH, 1, "cuda:0"), (CGROUP, 1, "cuda:0"), (SHARED, 4, "cuda:3"),
                                                (TORCHRUN, 8, "cuda:6"), ({}, 2, "cuda:0"), ({}, 0, "cpu")])
def test_each_process_uses_the_device_it_can_see(env, count, device):
    pick = pick_device("auto", env, count)
    assert pick.device == device
    assert f"CUDA_VISIBLE_DEVICES={env.get('CUDA_VISIBLE_DEVICES', 'unset')}" in pick.describe("rank 3")


def test_fewer_devices_than_ranks_on_a_node_is_an_error_naming_both():
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_LOCALID": "2", "SLURM_STEP_TASKS_PER_NODE": "4"}
    with pytest.raises(InputError, match=r"local rank 2 of 4 ranks on this node sees 2 devices "
                       r"\(CUDA_VISIBLE_DEVICES=0,1\)"):
        pick_device("auto", env, 2)
    with pytest.raises(InputError, match="sees no CUDA device"):
        pick_device("cuda", {}, 0)
    with pytest.raises(InputError, match="auto, cpu, cuda or cuda:N"):
        pick_device("gpu", {}, 1)
    assert pick_device("cpu", SHARED, 4).device == "cpu" and pick_device("cuda:2", SHARED, 4).device == "cuda:2"


def test_local_workers_get_a_gpu_each_and_share_only_when_there_are_more_workers():
    assert worker_gpus(2, "auto", {"CUDA_VISIBLE_DEVICES": "4,6"}, 2) == ["4", "6"]
    assert worker_gpus(3, "auto", {"CUDA_VISIBLE_DEVICES": "4,6"}, 2) == ["4", "6", "4"]
    assert worker_gpus(2, "auto", {}, 2) == ["0", "1"]
    assert worker_gpus(2, "auto", {}, 0) == [] and worker_gpus(2, "cpu", {}, 2) == []


def report_gpu(item):
    import os
    import time
    time.sleep(0.3)  # long enough that both workers take items
    return TaskResult(str(item), ok=True, stats={"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES")})


def test_local_workers_run_with_their_own_cuda_visible_devices():
    names = [str(i) for i in range(6)]
    results = run_tasks(report_gpu, list(range(6)), names, LocalPool(2, gpus=("3", "5")), retries=0)
    by_pid = {}
    for r in results:
        by_pid.setdefault(r.stats["pid"], set()).add(r.stats["gpu"])
    assert all(len(gpus) == 1 for gpus in by_pid.values()), by_pid  # a worker keeps its GPU
    gpus = [g for gs in by_pid.values() for g in gs]
    assert set(gpus) <= {"3", "5"} and len(gpus) == len(set(gpus)), by_pid  # and no two share one


def test_ranks_given_the_same_gpu_are_named():
    from lverse.runtime.trainer import shared_devices
    assert shared_devices([("node1", "GPU-a"), ("node1", "GPU-b"), ("node2", "GPU-a")]) == []
    assert shared_devices([("node1", "GPU-a"), ("node1", "GPU-a")]) == ["ranks 0 and 1 on node1 both use GPU GPU-a"]


def test_ray_actors_ask_for_one_gpu_each_and_no_more_than_the_cluster_has():
    gpus = {"CPU": 64.0, "GPU": 8.0, "memory": 5e11}
    assert ray_pool(gpus, "auto") == RayPool(8, 1.0, 1.0)  # one model per GPU, all of them
    assert ray_pool(gpus, "cuda", workers=4) == RayPool(4, 1.0, 1.0)
    assert ray_pool(gpus, "auto", gpus_per_worker=0.5) == RayPool(16, 1.0, 0.5)  # a share only when asked
    assert ray_pool(gpus, "cpu", cpus_per_worker=4) == RayPool(15, 4.0, 0.0)  # one CPU left for the driver's tasks
    with pytest.raises(InputError, match="9 workers x 1 GPU need 9 GPUs; the Ray cluster has 8"):
        ray_pool(gpus, "auto", workers=9)
    cpus = {"CPU": 3.0}
    assert ray_pool(cpus, "auto") == RayPool(2, 1.0, 0.0)
    with pytest.raises(InputError, match="device cuda: the Ray cluster has no GPU"):
        ray_pool(cpus, "cuda")
    with pytest.raises(InputError, match="4 workers x 1 CPU need 4 CPUs; the Ray cluster has 3"):
        ray_pool(cpus, "auto", workers=4)
    with pytest.raises(InputError, match="gpus_per_worker must be in"):
        ray_pool(gpus, "auto", gpus_per_worker=2)
