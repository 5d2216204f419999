"""lverse on a real SLURM cluster of several nodes with (fake) GPUs (tests/cluster.py): device
binding, training across nodes, a node that dies mid-run, and job arrays spread over nodes.

The nodes are network namespaces of this machine with their own addresses, hostnames and slurmd;
the GPUs are character devices SLURM hands out through GRES, so every task gets the
CUDA_VISIBLE_DEVICES a GPU cluster would give it. The processes run on the CPU: the tests check
the decisions (which device, which node, which address), the results (losses, token shards) and
the recovery, never speed.
"""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from .cluster import Nodes, SlurmCluster, missing_slurm
from .test_train import data, losses, metrics, run_job, train_config  # noqa: F401  (the token-shard fixture)

pytestmark = pytest.mark.slow
LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")
PICK = re.compile(r"rank (\d+) on (\S+): (\S+) of CUDA_VISIBLE_DEVICES=(\S+)")


def need_slurm():
    if missing_slurm():
        message = f"SLURM binaries missing: {missing_slurm()} (make test installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three nodes of 2 CPUs and 4 GPUs each."""
    need_slurm()
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("nodes")), nodes=3, cpus=2, gpus=4)
    cluster.start()
    yield cluster
    cluster.stop()


def submit(cluster, *args):
    out = subprocess.run([LVERSE, "slurm", "submit", *args], env=cluster.env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def job_log(folder):
    return "".join(open(p, errors="replace").read() for p in sorted(glob.glob(os.path.join(folder, "*.out"))))


def picks(text):
    """{rank: (host, device, CUDA_VISIBLE_DEVICES)} from the device rule's log lines."""
    return {int(m[0]): m[1:] for m in PICK.findall(text)}


def test_a_cluster_of_nodes_comes_up_in_seconds_and_leaves_nothing(tmp_path):
    need_slurm()
    cluster = SlurmCluster(str(tmp_path), nodes=2)
    cluster.start()
    try:
        out = cluster.srun("-N2", "hostname")
        assert sorted(out.stdout.split()) == ["node1", "node2"], out.stderr
        out = cluster.srun("-N1", "-w", "node2", "getent", "hosts", "node1")  # the nodes' own /etc/hosts
        assert out.stdout.split()[:2] == [cluster.nodes.addr("node1"), "node1"], out.stderr
        with open("/etc/hosts") as f:
            assert "node1" not in f.read().split()  # the machine's own is untouched
        daemons = [p.pid for p in cluster.procs]
    finally:
        began = time.time()
        cluster.stop()
        stopped_in = time.time() - began
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert not any(ns in listed for ns in cluster.nodes.namespaces) and cluster.nodes.bridge not in links
    assert cluster.nodes.veth not in links
    assert not [pid for pid in daemons if os.path.exists(f"/proc/{pid}")]
    print(f"cluster_start_seconds={cluster.started_in:.2f} cluster_stop_seconds={stopped_in:.2f}")


def test_a_killed_test_run_leaves_nothing_for_the_next(tmp_path):
    """A test process killed before its clean-up leaves namespaces named after its dead PID: the
    next cluster removes them."""
    code = ("import sys, os; sys.path.insert(0, {root!r}); from tests.cluster import Nodes; "
            "n = Nodes({tmp!r}, 2).start(); print(n.namespaces[0], n.bridge, flush=True); os._exit(9)")
    out = subprocess.run([sys.executable, "-c", code.format(root=os.path.dirname(os.path.dirname(__file__)),
                                                             tmp=str(tmp_path))], capture_output=True, text=True)
    namespace, bridge = out.stdout.split()
    assert namespace in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    nodes = Nodes(str(tmp_path), 1).start()
    nodes.stop()
    assert namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert bridge not in subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout


# srun's binding options (MULTINODE-style table) -> {rank: (node, device, CUDA_VISIBLE_DEVICES)}
BINDINGS = [
    (["-N1", "--ntasks-per-node=2", "--gpus-per-task=1"],
     {0: ("node1", "cuda:0", "0"), 1: ("node1", "cuda:0", "1")}),
    (["-N1", "--ntasks-per-node=2", "--gres=gpu:2"],
     {0: ("node1", "cuda:0", "0,1"), 1: ("node1", "cuda:1", "0,1")}),
    (["-n2", "--gpus-per-task=1"], {0: ("node1", "cuda:0", "0"), 1: ("node1", "cuda:0", "1")}),
    (["-N1", "-n2", "--gres=gpu:2", "--gpu-bind=single:1"],
     {0: ("node1", "cuda:0", "0"), 1: ("node1", "cuda:0", "1")}),
    (["-N1", "-n2", "--gres=gpu:2", "--gpu-bind=map_gpu:1,0"],
     {0: ("node1", "cuda:0", "1"), 1: ("node1", "cuda:0", "0")}),
    (["-N2", "--ntasks-per-node=2", "--gpus-per-task=1"],
     {0: ("node1", "cuda:0", "0"), 1: ("node1", "cuda:0", "1"), 2: ("node2", "cuda:0", "0"),
      3: ("node2", "cuda:0", "1")}),
]


@pytest.mark.parametrize("options, expected", BINDINGS, ids=[" ".join(b[0]) for b in BINDINGS])
def test_every_task_picks_the_gpu_slurm_bound_it_to(cluster, options, expected):
    out = cluster.srun("-w", "node1,node2" if "-N2" in options else "node1", "--cpus-per-task=1", *options,
                       LVERSE, "devices", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert picks(out.stdout) == expected, out.stdout


def test_more_ranks_than_visible_gpus_is_an_error_that_names_the_fix(cluster):
    out = cluster.srun("-w", "node1", "-N1", "-n3", "--gres=gpu:2", "--overcommit", LVERSE, "devices", timeout=120)
    assert out.returncode != 0
    assert "of 3 ranks on this node sees 2 devices (CUDA_VISIBLE_DEVICES=0,1)" in out.stderr, out.stderr[-2000:]
    assert "--ntasks-per-node=2" in out.stderr


STEPS, EVERY = 120, 20


def two_node_config(data, folder):  # noqa: F811
    path = train_config(os.path.join(folder, "train.yaml"), data, os.path.join(folder, "run"), steps=STEPS,
                        checkpoint_every=EVERY, log_every=1, export=False)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    cfg["data"]["workers"] = 1  # 4 ranks, 4 shards: one reader each
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return path


@pytest.fixture(scope="module")
def two_node_run(cluster, data, tmp_path_factory):  # noqa: F811
    """The debug preset trained by 2 nodes x 2 tasks, each task bound to one GPU: its run folder."""
    folder = str(tmp_path_factory.mktemp("two_nodes"))
    cfg = two_node_config(data, folder)
    began = time.time()
    job = submit(cluster, "train", "--config", cfg, "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "1")
    states = cluster.wait_job(job, timeout=600)
    log = job_log(os.path.join(folder, "run", "slurm"))
    assert list(states.values()) == ["COMPLETED"], log[-4000:]
    print(f"two_node_training_seconds={time.time() - began:.1f}")
    return os.path.join(folder, "run"), log


def test_training_across_two_nodes_binds_a_gpu_per_task_and_matches_one_node(two_node_run, data, tmp_path):  # noqa: F811
    run_dir, log = two_node_run
    assert picks(log) == {0: ("node1", "cpu", "0"), 1: ("node1", "cpu", "1"), 2: ("node2", "cpu", "0"),
                          3: ("node2", "cpu", "1")}, log[-3000:]
    # The same 4 ranks on one node, launched by torchrun: the same losses.
    cfg = two_node_config(data, str(tmp_path))
    run_job(4, "train", "--config", cfg, timeout=600)
    ours, reference = metrics(run_dir), metrics(str(tmp_path / "run"))
    assert sorted(ours) == sorted(reference) == list(range(1, STEPS + 1))
    for step in reference:
        ours_, theirs = losses(ours[step][-1]), losses(reference[step][-1])
        assert ours_.keys() == theirs.keys() and all(abs(ours_[k] - theirs[k]) <= 1e-5 for k in theirs), step


def test_a_node_that_dies_mid_run_costs_only_the_steps_since_the_last_checkpoint(cluster, two_node_run, data,  # noqa: F811
                                                                                 tmp_path):
    """Every process of one node killed (its slurmd included) in the middle of a 2-node job: SLURM
    requeues the job, which resumes on the nodes left from the last complete checkpoint and
    finishes with the uninterrupted run's losses. The timeline is printed (README, "SLURM")."""
    cfg = two_node_config(data, str(tmp_path))
    run_dir = tmp_path / "run"
    job = submit(cluster, "train", "--config", cfg, "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "1")
    first = run_dir / "checkpoints" / f"step_{EVERY:08d}" / "lverse.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (first.exists() and max(metrics(run_dir)) >= EVERY + 5):
        time.sleep(0.2)
    assert first.exists(), job_log(run_dir / "slurm")[-3000:]
    nodes = subprocess.run(["scontrol", "show", "hostnames", cluster.jobs(job)[job]["NodeList"]], env=cluster.env,
                           capture_output=True, text=True).stdout.split()
    victim, killed_at, at_step = nodes[1], time.time(), max(metrics(run_dir))
    cluster.nodes.kill(victim)
    timeline = {}
    while time.time() < killed_at + 400 and "resumed" not in timeline:
        fields = cluster.jobs(job)[job]
        if "detected" not in timeline and cluster.node_states().get(victim, "").endswith(("*", "down")):
            timeline["detected"] = time.time() - killed_at
        if "requeued" not in timeline and fields.get("Restarts") == "1":
            timeline["requeued"] = time.time() - killed_at
        if "restarted" in timeline or (fields.get("Restarts") == "1" and fields["JobState"] == "RUNNING"):
            timeline.setdefault("restarted", time.time() - killed_at)
            if "resumed from" in job_log(run_dir / "slurm"):  # the first run resumed from nothing
                timeline["resumed"] = time.time() - killed_at
        time.sleep(0.2)
    states = cluster.wait_job(job, timeout=400)
    log = job_log(run_dir / "slurm")
    cluster.start_node(victim)  # the node comes back (ReturnToService=2) for the tests after this one
    assert list(states.values()) == ["COMPLETED"], (timeline, log[-4000:])
    print("node_failure_" + " node_failure_".join(f"{k}_seconds={v:.1f}" for k, v in timeline.items()),
          f"killed_at_step={at_step}")
    assert timeline.keys() == {"detected", "requeued", "restarted", "resumed"}, timeline
    after = subprocess.run(["scontrol", "show", "hostnames", cluster.jobs(job)[job]["NodeList"]], env=cluster.env,
                           capture_output=True, text=True).stdout.split()
    assert victim not in after and len(after) == 2, after
    resumed = int(re.findall(r"resumed from \S+ at step (\d+)", log)[-1])
    assert resumed % EVERY == 0 and EVERY <= resumed <= at_step, (resumed, at_step)
    ours, reference = metrics(run_dir), metrics(two_node_run[0])
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(resumed + 1, STEPS + 1):
        ours_, theirs = losses(ours[step][-1]), losses(reference[step][-1])
        assert all(abs(ours_[k] - theirs[k]) <= 1e-5 for k in theirs), step
    cluster._wait_idle([victim], 60)
