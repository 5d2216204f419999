"""Model stages on an autoscaling Ray cluster: actors sized from the node types, a request no type
can meet refused before work, and, on Ray's fake multi-node provider (tests/cluster.py's
AutoscalingRay), encode started with no GPU node finishing on the GPU nodes the autoscaler adds,
through a node lost mid-stage, with the bytes of a local run."""

import glob
import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from lverse.core.errors import InputError
from lverse.runtime.ray_cluster import NodeType, RayPool, node_types, ray_pool

from .cluster import AutoscalingRay

LVERSE = os.path.join(os.path.dirname(sys.executable), "lverse")
HEAD = NodeType("head", {"CPU": 2.0, "GPU": 0.0}, 1)
GPU = NodeType("gpu_worker", {"CPU": 8.0, "GPU": 2.0}, 3)


def test_actors_are_sized_from_the_node_types_whether_or_not_a_node_is_up():
    assert ray_pool({}, "auto", types=[HEAD, GPU]) == RayPool(6, 1.0, 1.0)  # 3 nodes x 2 GPUs, none up
    assert ray_pool({}, "auto", workers=2, types=[HEAD, GPU]) == RayPool(2, 1.0, 1.0)
    assert ray_pool({}, "auto", gpus_per_worker=0.5, types=[HEAD, GPU]) == RayPool(12, 1.0, 0.5)
    assert ray_pool({}, "cpu", cpus_per_worker=4, types=[HEAD, GPU]) == RayPool(6, 4.0, 0.0)  # none on the head
    assert ray_pool({}, "auto", types=[HEAD]) == RayPool(1, 1.0, 0.0)  # no GPU type: CPUs, one left for the driver
    with pytest.raises(InputError, match=r"7 workers x 1 GPU and 1 CPU need more than the Ray cluster's node types "
                       r"can ever hold \(6 such actors; node types head: CPU 2, GPU 0, up to 1 node; gpu_worker: "
                       r"CPU 8, GPU 2, up to 3 nodes\)"):
        ray_pool({}, "auto", workers=7, types=[HEAD, GPU])
    with pytest.raises(InputError, match="each actor asks for 1 GPU and 16 CPU; no node type of the Ray cluster has "
                       "that"):
        ray_pool({}, "auto", cpus_per_worker=16, types=[HEAD, GPU])
    with pytest.raises(InputError, match="device cuda: no node type of the Ray cluster has a GPU"):
        ray_pool({}, "cuda", types=[HEAD])


def test_node_types_come_from_the_autoscaling_config(tmp_path):
    config = {"max_workers": 2, "head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 4}, "max_workers": 0}, "gpu": {"resources": {"GPU": 1, "CPU": 4},
                                                                     "max_workers": 5}}}
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(config))
    assert node_types(str(path)) == [NodeType("head", {"CPU": 4.0}, 1), NodeType("gpu", {"GPU": 1.0, "CPU": 4.0}, 2)]
    path.write_text(yaml.safe_dump({**config, "available_node_types": {"head": {"resources": {}}}}))
    with pytest.raises(InputError, match="declare no resources"):  # a cloud config before `ray up` filled them in
        node_types(str(path))
    path.write_text(yaml.safe_dump({"provider": {"type": "local"}}))
    with pytest.raises(InputError, match="has no available_node_types"):
        node_types(str(path))


def test_a_request_no_node_type_can_meet_is_refused_before_work(tmp_path, vae_path):
    """No Ray is joined (none runs at the address): the error comes from the node types alone."""
    from lverse.cli import main

    from .test_encode import raw_shards
    config = tmp_path / "cluster.yaml"
    config.write_text(yaml.safe_dump({"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2}}, "cpu": {"resources": {"CPU": 2}, "max_workers": 4}}}))
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    code = main(["encode", "--shards", raw, "--vae", vae_path, "--output", str(tmp_path / "tok"), "--executor", "ray",
                 "--ray-address", "127.0.0.1:9", "--ray-node-types", str(config), "--device", "cuda"])
    assert code == 2 and not os.listdir(tmp_path / "tok")  # the folder made, nothing in it


@pytest.mark.slow
def test_encode_from_no_gpu_node_finishes_on_autoscaled_gpu_nodes_through_a_lost_node(tmp_path, data):
    """A head with 2 CPUs and no GPU, a GPU worker type at min 0 / max 3. (1) encode --executor ray
    with the cluster's node types: GPU nodes are launched, every shard is done by an actor on one,
    the progress log counts the actors pending then running, and the token shards equal a local
    run's byte for byte. (2) A worker node killed mid-stage: the stage ends with the same bytes.
    (3) Actors asking for more CPUs than the autoscaler's types have (lverse told otherwise): no
    actor is placed in --ray-wait seconds, exit status 1 and no shard written."""
    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode

    from .test_encode import raw_shards
    cluster = AutoscalingRay({"gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "min_workers": 0,
                                             "max_workers": 3}})
    encode = [LVERSE, "encode", "--shards", data["raw"], "--vae", data["vae"], "--executor", "ray",
              "--ray-address", cluster.address, "--ray-node-types", cluster.config_path, "--retries", "2"]
    raw = raw_shards(str(tmp_path / "raw"), count=10, n=16)  # for (2): enough work to lose a node in
    run_encode(EncodeConfig(shards=raw, vae=data["vae"], output=str(tmp_path / "reference"), workers=0))
    figures = {}
    try:
        cluster.start()
        began = time.time()
        first = subprocess.run([*encode, "--output", str(tmp_path / "grown")], env=cluster.env, capture_output=True,
                               text=True, timeout=300)
        figures["grown_seconds"] = time.time() - began
        assert first.returncode == 0, first.stderr[-4000:] + cluster.log()[-2000:]
        # (2): a worker node killed once the first shard is done, while others still run
        lost = tmp_path / "lost"
        proc = subprocess.Popen([*encode[:3], raw, *encode[4:], "--output", str(lost)], env=cluster.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        while not glob.glob(str(lost / "*_stats.json")):
            assert proc.poll() is None, proc.stderr.read()[-4000:]
            time.sleep(0.05)
        cluster.kill_node(cluster.worker_nodes()[0])
        _, lost_log = proc.communicate(timeout=300)
        assert proc.returncode == 0, lost_log[-3000:] + cluster.log()[-6000:]
        # (3)
        stale = tmp_path / "stale.yaml"
        config = dict(cluster.config)
        config["available_node_types"] = {**config["available_node_types"],
                                          "gpu_worker": {"resources": {"CPU": 4, "GPU": 1}, "max_workers": 3}}
        stale.write_text(yaml.safe_dump(config))
        stuck = subprocess.run([*encode[:-4], "--ray-node-types", str(stale), "--threads", "4", "--ray-wait", "8",
                                "--output", str(tmp_path / "stuck")], env=cluster.env, capture_output=True, text=True,
                               timeout=300)
    finally:
        cluster.stop()
    print(" ".join(f"{k}={v:.1f}" for k, v in figures.items()))
    summary = json.loads((tmp_path / "grown" / "_summary.json").read_text())
    placed = [e["node"] for e in summary["ray_actors"]["events"] if e["event"] == "placed"]
    assert placed and AutoscalingRay.HEAD not in placed, summary["ray_actors"]
    assert set(summary["ray_actors"]["shard_node_ids"].values()) <= set(placed)
    assert sorted(summary["ray_actors"]["shard_node_ids"]) == sorted(summary["done_shards"]) and summary["done"] == 4
    assert "actors 0 running, 3 pending (waiting for nodes), 0 lost" in first.stderr, first.stderr[-3000:]
    assert "actors 1 running" in first.stderr, first.stderr[-3000:]
    assert "lost" in json.dumps(json.loads((lost / "_summary.json").read_text())["ray_actors"]["events"]), lost_log
    for folder, reference in ((tmp_path / "grown", data["tokens"]), (lost, str(tmp_path / "reference"))):
        names = sorted(p.name for p in folder.glob("*.tar"))
        assert names and names == sorted(os.path.basename(p) for p in glob.glob(os.path.join(reference, "*.tar")))
        for name in names:
            assert (folder / name).read_bytes() == open(os.path.join(reference, name), "rb").read(), name
    assert stuck.returncode == 1, stuck.stderr[-3000:]
    assert "no Ray actor could be placed in 8 s (each actor asks for 1 GPU and 4 CPU" in stuck.stderr, \
        stuck.stderr[-3000:]
    assert not glob.glob(str(tmp_path / "stuck" / "*.tar"))
