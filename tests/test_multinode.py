"""lverse on a real SLURM cluster of several nodes with (fake) GPUs (tests/cluster.py): device
binding, training across nodes, a node that dies mid-run, and job arrays spread over nodes.

The nodes are network namespaces of this machine with their own addresses, hostnames and slurmd;
the GPUs are character devices SLURM hands out through GRES, so every task gets the
CUDA_VISIBLE_DEVICES a GPU cluster would give it. The processes run on the CPU: the tests check
the decisions (which device, which node, which address), the results (losses, token shards) and
the recovery, never speed.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lverse.runtime.metrics import events, read_records, step_records

from .cluster import Nodes, SlurmCluster, missing_slurm
from .conftest import free_port
from .procs import alive, environ_of, processes
from .test_train import launch, logged_steps, losses, metrics, run_job, train_config

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


def submit(cluster, *args, env=None):
    out = subprocess.run([LVERSE, "slurm", "submit", *args], env={**cluster.env, **(env or {})}, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def job_log(folder, tasks=None):
    """The logs of a job's tasks (``tasks``: only these, by "JOB_TASK"), one after another."""
    paths = sorted(glob.glob(os.path.join(folder, "*.out")))
    if tasks is not None:
        paths = [p for p in paths if any(p.endswith(f"-{task}.out") for task in tasks)]
    return "".join(f"== {os.path.basename(p)}\n" + open(p, errors="replace").read() for p in paths)


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


# The node-death test's run holds after step HOLD (LVERSE_HOLD_AT_STEP), its checkpoint of step
# EVERY complete, until the node is killed: the kill lands there however loaded the machine is.
STEPS, EVERY, HOLD = 30, 10, 15


def two_node_config(data, folder):  # noqa: F811
    return train_config(os.path.join(folder, "train.yaml"), data, os.path.join(folder, "run"), steps=STEPS,
                        checkpoint_every=EVERY, log_every=1, export=False,
                        data={"workers": 1})  # 4 ranks, 4 shards: one reader each


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


def test_training_across_two_nodes_gives_each_task_one_gpu_and_matches_one_node(two_node_run, data, tmp_path):  # noqa: F811
    """Each task sees the one GPU SLURM bound it to (CUDA_VISIBLE_DEVICES) and, with no CUDA on
    these nodes, logs the CPU as its device: the GPU binding is what is tested, not a GPU."""
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
    finishes with the uninterrupted run's losses. The timeline is printed (docs/slurm.md)."""
    cfg = two_node_config(data, str(tmp_path))
    run_dir = tmp_path / "run"
    job = submit(cluster, "train", "--config", cfg, "--nodes", "2", "--gpus-per-node", "2", "--cpus-per-task", "1",
                 env={"LVERSE_HOLD_AT_STEP": str(HOLD)})
    first = run_dir / "checkpoints" / f"step_{EVERY:08d}" / "lverse.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (first.exists() and logged_steps(run_dir) >= HOLD):
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
    assert at_step == HOLD and resumed == HOLD // EVERY * EVERY, (resumed, at_step)
    ours, reference = metrics(run_dir), metrics(two_node_run[0])
    assert sorted(ours) == list(range(1, STEPS + 1))
    for step in range(resumed + 1, STEPS + 1):
        ours_, theirs = losses(ours[step][-1]), losses(reference[step][-1])
        assert all(abs(ours_[k] - theirs[k]) <= 1e-5 for k in theirs), step
    cluster._wait_idle([victim], 60)


ELASTIC_STEPS, ELASTIC_EVERY = 16, 4
TWO_LOSSES_STEPS = 24


def elastic_config(data, path, run_dir, steps=ELASTIC_STEPS):  # noqa: F811
    """Global batch 12 on 3 ranks (2 x 2 micro-steps): 2 ranks keep it with 3 micro-steps each."""
    return train_config(path, data, run_dir, steps=steps, checkpoint_every=ELASTIC_EVERY, log_every=1,
                        export=False, micro_batch_size=2, grad_accum=2, keep_checkpoints=steps // ELASTIC_EVERY,
                        data={"workers": 1})  # 3 ranks, 4 shards: one reader each


def start_elastic_job(cluster, data, tmp_path, steps=ELASTIC_STEPS):  # noqa: F811
    """An elastic job of 3 nodes x 1 rank (`--elastic 2`) past its first checkpoint and two more
    steps: (job id, run folder)."""
    run_dir = tmp_path / "run"
    cfg = elastic_config(data, tmp_path / "train.yaml", run_dir, steps)
    job = submit(cluster, "train", "--config", cfg, "--nodes", "3", "--elastic", "2", "--gpus-per-node", "1",
                 "--cpus-per-task", "1")
    first = run_dir / "checkpoints" / f"step_{ELASTIC_EVERY:08d}" / "lverse.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (first.exists() and logged_steps(run_dir) >= ELASTIC_EVERY + 2):
        time.sleep(0.1)
    assert first.exists(), job_log(run_dir / "slurm")[-3000:]
    return job, run_dir


def assert_resumed_exactly(data, tmp_path, run_dir, log, resumed, ranks, steps=ELASTIC_STEPS):  # noqa: F811
    """Every step of the job from ``resumed`` on has the losses of the same checkpoint resumed by
    ``ranks`` ranks on one machine (1e-5)."""
    ref = tmp_path / "ref"
    shutil.copytree(run_dir / "checkpoints" / f"step_{resumed:08d}", ref / "checkpoints" / f"step_{resumed:08d}")
    # as many threads per rank as the job's ranks had (their log says; it differs under pytest-xdist),
    # so that every sum is taken in the same order
    threads = re.findall(r"rank \d+: (\d+) threads", log)[-1]
    proc = launch(ranks, "train", "--config", elastic_config(data, tmp_path / "ref.yaml", ref, steps),
                  env={"OMP_NUM_THREADS": threads})
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and f"rank {ranks - 1}: {threads} threads" in out, out[-4000:]
    ours, reference = metrics(run_dir), metrics(ref)
    assert sorted(ours) == list(range(1, steps + 1)), sorted(ours)
    assert sorted(reference) == list(range(resumed + 1, steps + 1))
    for step in reference:
        ours_, theirs = losses(ours[step][-1]), losses(reference[step][-1])
        assert ours_.keys() == theirs.keys() and all(abs(ours_[k] - theirs[k]) <= 1e-5 for k in theirs), step


def test_an_elastic_job_that_loses_a_node_goes_on_with_the_nodes_left_without_a_requeue(cluster, data,  # noqa: F811
                                                                                         tmp_path):
    """3 nodes x 1 rank, `--elastic 2`: every process of node 3 killed mid-run. The agents left
    re-form the group on 2 nodes in the same job (Restarts=0), resume from the last complete
    checkpoint with the global batch kept (3 x 2 x 2 = 12: 2 ranks x 2 x 3 micro-steps), finish
    every step, record the re-formation in metrics.jsonl, and log from the resume on the losses of
    a 2-rank run resumed from the same checkpoint on one machine (1e-5). The time from the kill to
    the first step after it is printed (docs/slurm.md)."""
    job, run_dir = start_elastic_job(cluster, data, tmp_path)
    victim = "node3"
    lines, killed_at, at_step = logged_steps(run_dir), time.time(), max(metrics(run_dir))
    cluster.nodes.kill(victim)
    next_step = None
    while time.time() < killed_at + 300 and next_step is None:
        if logged_steps(run_dir) > lines:
            next_step = time.time() - killed_at
        time.sleep(0.1)
    states = cluster.wait_job(job, timeout=400)
    log = job_log(run_dir / "slurm")
    fields = cluster.jobs(job)[job]
    cluster.start_node(victim)  # the node comes back (ReturnToService=2) for the tests after this one
    assert list(states.values()) == ["COMPLETED"] and fields["Restarts"] == "0", log[-4000:]
    resumed = int(re.findall(r"resumed from \S+ at step (\d+)", log)[-1])
    (event,) = events(read_records(run_dir / "metrics.jsonl"), "reformed")
    print(f"elastic_kill_to_next_step_seconds={next_step:.1f} killed_at_step={at_step} resumed_at_step={resumed} "
          f"elastic_seconds_lost={event['seconds_lost']:.1f}")
    assert next_step is not None and ELASTIC_EVERY <= resumed <= at_step, (resumed, at_step)
    assert "kept on 2 ranks: micro_batch_size 2 x grad_accum 3" in log, log[-4000:]
    # the re-formation is recorded: the first step after it, from the last step logged before the
    # kill (the wall time between them is the kill's delay after that step plus kill -> next step)
    last_before = metrics(run_dir)[event["last_step_before"]][0]
    assert (event["step"], event["world_size_before"], event["world_size"]) == (resumed + 1, 3, 2), event
    assert event["last_step_before"] >= at_step and last_before["world_size"] == 3, event
    assert abs(event["seconds_lost"] - (killed_at - last_before["time"] + next_step)) < 2, (event, next_step)
    assert "the run's previous start trained on 3 ranks" in log and "re-formed on 2 ranks (from 3)" in log
    assert_resumed_exactly(data, tmp_path, run_dir, log, resumed, 2)
    cluster._wait_idle([victim], 60)


def test_an_elastic_job_that_loses_a_node_then_its_first_node_requeues_and_resumes_exactly(cluster, data,  # noqa: F811
                                                                                          tmp_path):
    """Two nodes lost one after the other: node 3 (the job goes on with 2, its MIN), then node 1,
    which holds the rendezvous and runs the job script, leaving fewer than MIN. That cannot be
    survived in place: the task of the node left requeues the job (Restarts=1) once SLURM marks
    node 1 down; the requeued job waits for its 3 nodes (both come back), resumes from the last
    complete checkpoint on 3 ranks, records both re-formations (3 -> 2 -> 3), and logs the losses
    of the same checkpoint resumed by 3 ranks on one machine. The time from the second kill to the
    requeue and to the first step after it is printed."""
    # more steps: the run on 2 nodes must not end before the second kill lands
    job, run_dir = start_elastic_job(cluster, data, tmp_path, steps=TWO_LOSSES_STEPS)
    lines = logged_steps(run_dir)
    cluster.nodes.kill("node3")
    deadline, on_two = time.time() + 300, 2 * ELASTIC_EVERY  # past a checkpoint the 2 nodes wrote
    while time.time() < deadline and not any(r["world_size"] == 2 and r["step"] > on_two
                                             for r in step_records(read_records(run_dir / "metrics.jsonl"))):
        time.sleep(0.1)
    assert logged_steps(run_dir) > lines, job_log(run_dir / "slurm")[-3000:]
    cluster.start_node("node3")  # back, idle (ReturnToService=2): the requeued job will want it
    lines, killed_at, at_step = logged_steps(run_dir), time.time(), max(metrics(run_dir))
    cluster.nodes.kill("node1")
    timeline = {}
    while time.time() < killed_at + 300 and "next_step" not in timeline:
        if "requeued" not in timeline and cluster.jobs(job)[job].get("Restarts") == "1":
            timeline["requeued"] = time.time() - killed_at
            cluster.start_node("node1")  # the job gets its 3 nodes again
            lines = logged_steps(run_dir)  # a step in flight at the kill may have been logged after it
        elif "requeued" in timeline and logged_steps(run_dir) > lines:
            timeline["next_step"] = time.time() - killed_at
        time.sleep(0.2)
    if "requeued" not in timeline:
        cluster.start_node("node1")
    states = cluster.wait_job(job, timeout=400)
    log = job_log(run_dir / "slurm")
    fields = cluster.jobs(job)[job]
    print("elastic_first_node_" + " elastic_first_node_".join(f"{k}_seconds={v:.1f}" for k, v in timeline.items()),
          f"killed_at_step={at_step}")
    assert list(states.values()) == ["COMPLETED"] and fields["Restarts"] == "1", (timeline, log[-4000:])
    assert timeline.keys() == {"requeued", "next_step"}, timeline
    assert "node node2: the first node node1 (the rendezvous, the job script) is lost: requeueing job" in log, \
        log[-4000:]
    resumed = int(re.findall(r"resumed from \S+ at step (\d+)", log)[-1])
    assert on_two <= resumed <= at_step, (resumed, at_step)  # a checkpoint of 2 ranks, resumed on 3
    reformed = events(read_records(run_dir / "metrics.jsonl"), "reformed")
    assert [(e["world_size_before"], e["world_size"]) for e in reformed] == [(3, 2), (2, 3)], reformed
    assert reformed[1]["step"] == resumed + 1 and reformed[1]["last_step_before"] >= at_step, reformed
    assert_resumed_exactly(data, tmp_path, run_dir, log, resumed, 3, TWO_LOSSES_STEPS)
    cluster._wait_idle(["node1", "node3"], 60)


SILENT_RANK = """
import time
import torch
import torch.distributed as dist
from lverse.runtime.trainer import start_process
proc = start_process()
dist.all_reduce(torch.ones(1))
print(f"rank {proc.rank} ready", flush=True)
open(f"ready{proc.rank}", "w").close()
while True:
    dist.all_reduce(torch.ones(1))
    time.sleep(0.05)
"""


def test_a_rank_that_goes_silent_is_seen_within_the_collective_timeout(tmp_path):
    """A node that dies without closing its connections (power, kernel, network; here one rank
    frozen by SIGSTOP, its sockets open) is seen by the other ranks only when a collective times
    out: with LVERSE_COLLECTIVE_TIMEOUT=5 (the elastic template sets 60) rank 0 fails within
    seconds, not after torch's 30 minutes, and its agent can re-form the group."""
    script = tmp_path / "ranks.py"
    script.write_text(SILENT_RANK)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(script)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path, env={**os.environ, "LVERSE_COLLECTIVE_TIMEOUT": "5"})
    ranks = {}
    try:
        deadline = time.time() + 120
        while len(ranks) < 2 and time.time() < deadline:
            for pid in processes(parent=proc.pid):
                rank = environ_of(pid).get("RANK")
                if rank is not None:  # not a child between its fork and its exec (the agent's environment)
                    ranks[int(rank)] = pid
            time.sleep(0.2)
        assert len(ranks) == 2, ranks
        while not (tmp_path / "ready1").exists() and time.time() < deadline:  # both in their loop of collectives
            time.sleep(0.1)
        os.kill(ranks[1], signal.SIGSTOP)
        stopped_at = time.time()
        while alive(ranks[0]) and time.time() < stopped_at + 120:
            time.sleep(0.2)
        seen_in = time.time() - stopped_at
    finally:  # torchrun starts each rank in a session of its own
        for pid in [*processes(session=proc.pid), *ranks.values()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    print(f"silent_rank_seen_seconds={seen_in:.1f}")
    assert "rank 0 ready" in out and 5 <= seen_in < 30, (seen_in, out[-3000:])
    assert re.search(r"[Tt]imed out", out), out[-3000:]


def test_download_and_encode_arrays_spread_over_nodes_and_write_what_one_node_writes(cluster, tmp_path):
    """Job arrays on the cluster, one task per node at a time (each asks for a whole node's CPUs),
    writing into the shared run folder; the images come from a server on the bridge. The token
    shards equal those one local run writes from the same image shards, byte for byte."""
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS
    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet

    torch.manual_seed(0)
    save_model(AugVAE(PRESETS["debug-sl"]), str(tmp_path / "vae.safetensors"))
    with SyntheticServer(SyntheticSet(seed=3, train=24, heldout=1, image_size=64),
                         host=cluster.nodes.addr("ctl")) as server:
        tsv = server.write_tsv(str(tmp_path / "tsv"), bad_urls=False)["train"]
        config = tmp_path / "pipeline.yaml"
        config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                          "download": {"input": tsv, "samples_per_shard": 4, "image_size": 64},
                                          "encode": {"vae": str(tmp_path / "vae.safetensors"), "batch_size": 4}}))
        hosts = {}
        for stage, extra in (("download", []), ("encode", ["--gpus-per-node", "2"])):
            job = submit(cluster, stage, "--config", str(config), "--cpus-per-task", "2", *extra)
            states = cluster.wait_job(job, timeout=300)
            log = job_log(tmp_path / "run" / "slurm")
            failed = [task for task, state in states.items() if state != "COMPLETED"]
            if failed or len(states) != 6:  # the failed tasks' own logs, whole (an assert's message is cut short)
                codes = {task: fields.get("ExitCode") for task, fields in cluster.jobs(job).items() if task in failed}
                logs = job_log(tmp_path / "run" / "slurm", failed)[-6000:]
                pytest.fail(f"{stage}: {states}, exit codes {codes}\n{logs}", pytrace=False)
            hosts[stage] = {fields["BatchHost"] for fields in cluster.jobs(job).values()}
    assert len(hosts["download"]) >= 2 and len(hosts["encode"]) >= 2, hosts
    # every encode task saw its two GPUs, and its workers would take one each
    assert re.findall(r"encode on (node\d): \S+ of CUDA_VISIBLE_DEVICES=0,1", log), log[-3000:]
    images = sorted(glob.glob(str(tmp_path / "run" / "shards" / "*.tar")))
    tokens = sorted(glob.glob(str(tmp_path / "run" / "tokens" / "*.tar")))
    assert len(images) == len(tokens) == 6
    run_encode(EncodeConfig(shards=str(tmp_path / "run" / "shards"), vae=str(tmp_path / "vae.safetensors"),
                            output=str(tmp_path / "one_node"), batch_size=4, workers=0))
    for path in tokens:
        with open(path, "rb") as a, open(tmp_path / "one_node" / os.path.basename(path), "rb") as b:
            assert a.read() == b.read(), path


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "no-such-node.invalid", "MASTER_PORT": "29555"},
     "the rendezvous host MASTER_ADDR=no-such-node.invalid does not resolve"),
    ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "LVERSE_RENDEZVOUS_TIMEOUT": "2"},
     "rank 1 on {host} cannot reach the rendezvous 127.0.0.1:{port} (127.0.0.1) within 2 s")])
def test_a_rendezvous_no_rank_can_reach_is_an_error_before_any_work(data, tmp_path, env, message):  # noqa: F811
    """What a wrong node list or a closed port gives: exit 2 and the address, not a half-hour hang."""
    cfg = two_node_config(data, str(tmp_path))
    port = str(free_port())
    env = {**os.environ, "MASTER_PORT": port, "LOCAL_RANK": env["RANK"], **env}
    out = subprocess.run([LVERSE, "train", "--config", cfg], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert message.format(host=socket.gethostname(), port=env["MASTER_PORT"]) in out.stderr, out.stderr[-3000:]
    assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_caption_and_generate_arrays_see_the_gpus_they_ask_for(cluster, data, biart, tmp_path):  # noqa: F811
    """caption: one task per shard block with 2 GPUs, one worker per GPU; generate: one task per
    item of prompts with its own GPU. Every task logs the CUDA_VISIBLE_DEVICES SLURM gave it."""
    (tmp_path / "caption.yaml").write_text(yaml.safe_dump({
        "shards": data["tokens"], "checkpoint": biart, "vae": data["vae"], "tokenizer": data["tokenizer"],
        "output": str(tmp_path / "captions"), "candidates": 2, "max_tokens": 4, "clip": "lverse-tiny"}))
    (tmp_path / "prompts.txt").write_text("".join(f"a red circle number {i}\n" for i in range(4)))
    (tmp_path / "generate.yaml").write_text(yaml.safe_dump({
        "prompts": str(tmp_path / "prompts.txt"), "checkpoint": biart, "vae": data["vae"],
        "tokenizer": data["tokenizer"], "output": str(tmp_path / "images"), "candidates": 2, "clip": "lverse-tiny",
        "prompts_per_item": 1}))
    for stage, gpus, visible, folder in (("caption", "2", "0,1", "captions"), ("generate", "1", "0", "images")):
        job = submit(cluster, stage, "--config", str(tmp_path / f"{stage}.yaml"), "--gpus-per-node", gpus,
                     "--cpus-per-task", "2", "--array", "0-1")
        states = cluster.wait_job(job, timeout=300)
        log = job_log(tmp_path / folder / "slurm")
        assert set(states.values()) == {"COMPLETED"} and len(states) == 2, (states, log[-4000:])
        seen = re.findall(rf"{stage} on (node\d): \S+ of CUDA_VISIBLE_DEVICES=(\S+)", log)
        assert len(seen) == 2 and {v for _, v in seen} == {visible}, log[-3000:]
    assert len(glob.glob(str(tmp_path / "captions" / "*.parquet"))) == 2  # tasks 0-1 of 4: two shards
    assert sorted(p for p in os.listdir(tmp_path / "images") if p.isdigit()) == ["00000", "00001"]  # 2 tasks of 4
