"""Model stages on an autoscaling Ray cluster: actors sized from the node types, a request no type
can meet refused before work, and, on Ray's fake multi-node provider (tests/cluster.py's
AutoscalingRay), encode started with no GPU node finishing on the GPU nodes the autoscaler adds,
through a node lost mid-stage, with the bytes of a local run."""

import glob
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lverse.core.errors import InputError
from lverse.runtime.ray_cluster import NodeType, NodeTypesSizing, RayPool, node_types, ray_pool

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
    path.write_text(yaml.safe_dump({"provider": {"type": "aws"}}))
    with pytest.raises(InputError, match="has no available_node_types"):
        node_types(str(path))


def test_the_pool_is_sized_again_when_the_node_types_file_changes(tmp_path, caplog):
    """What a running stage sees when the autoscaling config is edited (NodeTypesSizing): max_workers
    raised, more actors; an edit it cannot use (not YAML, or too few nodes for --workers), the size
    it had, logged; no edit, nothing to do."""
    config = {"head_node_type": "head", "available_node_types": {
        "head": {"resources": {"CPU": 2, "GPU": 0}}, "gpu": {"resources": {"CPU": 1, "GPU": 1}, "max_workers": 1}}}
    path = str(tmp_path / "cluster.yaml")
    _write_atomically(path, config)
    sizing = NodeTypesSizing(path, lambda types: ray_pool({}, "auto", None, types=types))
    assert sizing.pool == RayPool(1, 1.0, 1.0) and sizing.changed() is None
    config["available_node_types"]["gpu"]["max_workers"] = 3
    _write_atomically(path, config)
    assert sizing.changed() == RayPool(3, 1.0, 1.0) and sizing.changed() is None
    with open(path + ".new", "w") as f:
        f.write("available_node_types: [")
    os.replace(path + ".new", path)
    assert sizing.changed() is None and sizing.pool.actors == 3
    assert "changed, but the stage keeps its 3 actors" in caplog.text
    _write_atomically(path, config)  # max_workers 3 again, for a stage of --workers 3
    workers = NodeTypesSizing(path, lambda types: ray_pool({}, "auto", 3, types=types))
    config["available_node_types"]["gpu"]["max_workers"] = 1
    _write_atomically(path, config)
    assert workers.changed() is None and workers.pool.actors == 3
    assert "3 workers x 1 GPU and 1 CPU need more than" in caplog.text


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


def _same_files(folder, reference) -> list[str]:
    """The files under ``folder`` (its summary aside), asserted equal byte for byte to ``reference``'s."""
    def files(root):
        return sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                      if os.path.isfile(p) and not os.path.basename(p).startswith("_summary"))
    names = files(folder)
    assert names and names == files(reference), (names, files(reference))
    for name in names:
        with open(os.path.join(folder, name), "rb") as a, open(os.path.join(reference, name), "rb") as b:
            assert a.read() == b.read(), name
    return names


def _write_atomically(path, config) -> None:
    """The autoscaler and the stage each read the file whole, never half of an edit."""
    with open(path + ".new", "w") as f:
        yaml.safe_dump(config, f)
    os.replace(path + ".new", path)


@pytest.mark.slow
def test_download_caption_and_generate_grow_with_the_cluster_and_use_a_node_that_joined_mid_stage(tmp_path, data,
                                                                                                   biart):
    """One fake autoscaling cluster, a head with 2 CPUs and no GPU, a CPU and a GPU worker type at
    min 0 (the GPU type's max_workers 1). At once: (1) download --executor ray, more chunks than the
    head holds, each slowed by an image that takes seconds: the pending tasks make the autoscaler
    add CPU nodes, which do chunks; (2) caption with the node types, started with no GPU node: a GPU
    node is launched and its actor starts work; once it is placed the GPU type's max_workers is
    raised to 3 in the config file, the stage reads it again and asks for more actors, and a node
    launched after the change does shards; the token shards' captions equal a local run's byte for
    byte. Then (3) generate with the node types: every item done on a GPU node,
    the files equal a local run's."""
    from lverse.core.shards import shard_name
    from lverse.pipeline.caption import run_caption
    from lverse.pipeline.configs import CaptionConfig, GenerateConfig
    from lverse.pipeline.generate import run_generate
    from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet

    from .test_encode import make_shard
    cluster = AutoscalingRay({"cpu_worker": {"resources": {"CPU": 2}, "min_workers": 0, "max_workers": 2},
                              # 2 CPUs: a download task that lands on a GPU node leaves room for its actor
                              "gpu_worker": {"resources": {"CPU": 2, "GPU": 1}, "min_workers": 0, "max_workers": 1}})
    on_ray = ["--executor", "ray", "--ray-address", cluster.address]
    models = ["--checkpoint", biart, "--vae", data["vae"], "--tokenizer", data["tokenizer"]]
    caption = [LVERSE, "caption", *models, "--candidates", "4", "--max-tokens", "8", "--batch-size", "3", "--clip",
               "lverse-tiny", "--threads", "1"]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a blue square number {i}\n" for i in range(5)))
    generate = [LVERSE, "generate", *models, "--prompts", str(prompts), "--candidates", "2", "--clip", "lverse-tiny",
                "--prompts-per-item", "2", "--threads", "1"]
    # (2)'s input: the 4 token shards, and 36 image shards after them (work enough to outlast a node's start)
    shards = tmp_path / "shards"
    shutil.copytree(data["tokens"], shards, ignore=shutil.ignore_patterns("_*"))
    for i in range(4, 40):
        make_shard(str(shards / f"{i:05d}.tar"), i, 16, seed=i)
    # the local references, in this process, with one thread as each actor has
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_caption(CaptionConfig(shards=data["tokens"], checkpoint=biart, vae=data["vae"], tokenizer=data["tokenizer"],
                                  output=str(tmp_path / "caption_local"), candidates=4, max_tokens=8, batch_size=3,
                                  clip="lverse-tiny", workers=0))
        run_generate(GenerateConfig(prompts=str(prompts), checkpoint=biart, vae=data["vae"],
                                    tokenizer=data["tokenizer"], output=str(tmp_path / "generate_local"), candidates=2,
                                    clip="lverse-tiny", prompts_per_item=2, workers=0))
    finally:
        torch.set_num_threads(threads)

    def start(args):  # its log into a file: a pipe read only at the end could fill and stop it
        log = tmp_path / f"{args[1]}.log"
        with open(log, "w") as f:
            return subprocess.Popen(args, env=cluster.env, stdout=subprocess.DEVNULL, stderr=f), log

    def finish(started):
        proc, log = started
        proc.wait(timeout=600)
        assert proc.returncode == 0, log.read_text()[-4000:] + cluster.log()[-3000:]
        return log.read_text()
    figures, out = {}, tmp_path / "caption_ray"
    with SyntheticServer(SyntheticSet(seed=1, train=8, heldout=1, image_size=64), slow_seconds=4) as server:
        (tmp_path / "urls.tsv").write_text("".join(
            f"{server.data.sample('train', i)[1]}\t{server.url}/img/train/{i}.jpg\nslow\t{server.url}/bad/slow.jpg\n"
            for i in range(8)))
        try:
            cluster.start()
            began = time.time()
            download = start([LVERSE, "download", "--input", str(tmp_path / "urls.tsv"), "--samples-per-shard", "2",
                              "--image-size", "64", "--timeout", "20", "--output", str(tmp_path / "download"),
                              *on_ray])
            captioning = start([*caption, "--shards", str(shards), "--output", str(out), *on_ray, "--ray-node-types",
                                cluster.config_path])
            while "actors 1 running" not in captioning[1].read_text():  # the first actor placed: raise the max
                assert captioning[0].poll() is None, captioning[1].read_text()[-4000:]
                time.sleep(0.05)
            figures["first_actor_seconds"] = time.time() - began
            before = set(cluster.worker_nodes())
            config = dict(cluster.config)
            config["available_node_types"] = {**config["available_node_types"], "gpu_worker": {
                **config["available_node_types"]["gpu_worker"], "max_workers": 3}}
            _write_atomically(cluster.config_path, config)
            finish(download)
            figures["download_seconds"] = time.time() - began
            caption_log = finish(captioning)
            figures["caption_seconds"] = time.time() - began
            began = time.time()
            finish(start([*generate, "--output", str(tmp_path / "generate_ray"), *on_ray, "--ray-node-types",
                          cluster.config_path]))
            figures["generate_seconds"] = time.time() - began
        finally:
            cluster.stop()
    print(" ".join(f"{k}={v:.1f}" for k, v in figures.items()))
    print("caption actors:", json.loads((out / "_summary.json").read_text())["ray_actors"]["events"])
    # (1)
    tasks = json.loads((tmp_path / "download" / "_summary.json").read_text())
    assert tasks["written"] == 16 and tasks["failed"] == [], tasks
    chunk_nodes = tasks["ray_tasks"]["shard_node_ids"]
    assert sorted(chunk_nodes) == sorted(tasks["done_shards"]) and len(chunk_nodes) == 8, tasks
    assert set(chunk_nodes.values()) - {AutoscalingRay.HEAD}, f"no chunk on an added CPU node: {chunk_nodes}"
    # (2) and (3)
    for stage, count in (("caption", 40), ("generate", 3)):
        summary = json.loads((tmp_path / f"{stage}_ray" / "_summary.json").read_text())
        placed = [e["node"] for e in summary["ray_actors"]["events"] if e["event"] == "placed"]
        assert placed and AutoscalingRay.HEAD not in placed, summary["ray_actors"]
        assert len(summary["ray_actors"]["shard_node_ids"]) == summary["done"] == count, summary
        assert set(summary["ray_actors"]["shard_node_ids"].values()) <= set(placed)
    assert "actors 0 running, 1 pending (waiting for nodes), 0 lost" in caption_log, caption_log[-3000:]
    assert "the node types changed: 3 actors now" in caption_log, caption_log[-3000:]
    joined = set(json.loads((out / "_summary.json").read_text())["ray_actors"]["shard_node_ids"].values()) - before
    assert joined, f"no shard done on a node launched after the change ({caption_log[-3000:]})"
    reference = tmp_path / "caption_local"
    names = sorted(p.name for p in reference.glob("*.parquet"))
    assert names == [f"{shard_name(p)}.parquet" for p in sorted(glob.glob(os.path.join(data["tokens"], "*.tar")))]
    for name in names:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    _same_files(tmp_path / "generate_ray", tmp_path / "generate_local")


@pytest.mark.slow  # moto's EC2 pages through every instance type: 15-25 s on a loaded machine
def test_the_shipped_configs_give_the_node_types_their_comments_promise(tmp_path):
    """aws.yaml as `ray up` leaves it on the head (~/ray_bootstrap_config.yaml: Ray's own AWS code
    fills each type's CPUs and GPUs in from EC2's instance types, here moto's EC2 over HTTP): a head
    with no GPU, and the encode command its comment gives sizes one actor per GPU of the gpu_encode
    nodes it may launch; aws.yaml itself, before Ray filled it in, and local.yaml, whose machines
    are all up from the start, are refused saying what to give instead."""
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider
    from ray.autoscaler._private.util import prepare_config

    from lverse.cli import build_parser

    from .s3 import s3_server
    clusters = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pipeline", "clusters")
    aws = os.path.join(clusters, "aws.yaml")
    with open(aws) as f:
        text = f.read()
    with s3_server():  # moto serves EC2's API as well
        bootstrap = AWSNodeProvider.fillout_available_node_types_resources(prepare_config(yaml.safe_load(text)))
    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    types = {t.name: t for t in node_types(str(path))}
    assert list(types)[0] == "head" and not types["head"].resources.get("GPU") and types["head"].max_nodes == 1
    assert (types["gpu_encode"].resources["GPU"], types["gpu_encode"].max_nodes) == (4.0, 4)  # g5.12xlarge
    assert not types["cpu_download"].resources.get("GPU") and types["cpu_download"].max_nodes == 16
    command = next(line.split("# ", 1)[1] for line in text.splitlines()
                   if line.lstrip().startswith("# lverse ") and "--ray-node-types" in line)
    words = command.replace("~/ray_bootstrap_config.yaml", str(path)).split()
    assert words[:2] == ["lverse", "encode"], command
    args = build_parser("encode").parse_args([*words[1:], "--shards", "s3://b/raw", "--vae", __file__,
                                              "--output", "s3://b/tokens"])
    cfg = args.lverse_command.config(args)
    pool = ray_pool({}, cfg.device, cfg.workers, cfg.gpus_per_worker, types=node_types(cfg.ray_node_types))
    assert (pool.actors, pool.num_gpus, pool.num_cpus) == (16, 1.0, 1.0)  # 4 nodes x 4 GPUs, none up yet
    with pytest.raises(InputError, match=r"declare no resources .*~/ray_bootstrap_config.yaml"):
        node_types(aws)
    with pytest.raises(InputError, match="local provider.*leave ray_node_types out"):
        node_types(os.path.join(clusters, "local.yaml"))
