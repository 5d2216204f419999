"""`ray up` for real: Ray's local node provider with a head and two workers, each a node of
tests/cluster.py (a network namespace with its own address) reached over its own sshd.

The machine's own ssh set-up is left alone: each node's sshd has its own host key and authorized
keys in a temporary folder, and listens on port 22 of its node's address only.
"""

import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet

from .cluster import Nodes, RayNodes, SshNodes
from .procs import command_of

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLUSTERS = os.path.join(REPO, "pipeline", "clusters")
VENV_BIN = os.path.dirname(sys.executable)


def test_shipped_cluster_configs_pass_rays_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config
    for name in ("local.yaml", "aws.yaml"):
        with open(os.path.join(CLUSTERS, name)) as f:
            config = yaml.safe_load(f)
        validate_config(prepare_config(config))
    with open(os.path.join(CLUSTERS, "local.yaml")) as f:
        assert "available_node_types" not in yaml.safe_load(f)


@pytest.mark.slow
def test_ray_up_with_workers_runs_the_pipeline_across_nodes_and_ray_down_ends_it(tmp_path):
    """The shipped config with only addresses, user and key substituted brings up a head and two
    workers (three nodes of tests/cluster.py, each reached over its own sshd); `ray exec` runs the
    data pipeline (download -> tokenizer -> encode, each stage once: run again, nothing runs) and
    caption on it; the work spreads over the nodes, the outputs equal a local run's byte for byte,
    and after `ray down` no Ray process is left on any node."""
    for tool in ("/usr/sbin/sshd", "ssh", "rsync", "ssh-keygen"):
        if not shutil.which(tool):
            message = f"{tool} is not installed (make test installs openssh-server, rsync)"
            pytest.fail(message) if os.environ.get("CI") else pytest.skip(message)
    from lverse.pipeline.caption import run_caption
    from lverse.pipeline.configs import CaptionConfig, EncodeConfig
    from lverse.pipeline.encode import run_encode

    nodes = Nodes(str(tmp_path / "net"), 3).start()
    token = tmp_path / "ray_token"
    token.write_text(os.urandom(16).hex())
    # What a user puts into the nodes' ~/.bashrc (local.yaml says so): the checkout, Ray's token
    # mode with the shared token, and the virtualenv on the PATH for `ray down`'s `ray stop`. And,
    # for the test's time only: a worker's Ray gives up on a lost head after 20 s, not Ray's 60.
    bashrc = (f"export LVERSE={REPO} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={token} "
              f"PATH={VENV_BIN}:$PATH RAY_gcs_rpc_server_reconnect_timeout_s=20\n")
    ssh = SshNodes(nodes, str(tmp_path / "ssh"), bashrc)
    with open(os.path.join(CLUSTERS, "local.yaml")) as f:
        config = yaml.safe_load(f)
    config["cluster_name"] = f"lverse-test-{os.getpid()}"
    config["provider"].update(head_ip=nodes.addr("node1"), worker_ips=[nodes.addr("node2"), nodes.addr("node3")])
    config["auth"] = {"ssh_user": "root", "ssh_private_key": ssh.key}
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(yaml.safe_dump(config))
    run, figures = tmp_path / "run", {}

    def ray_cli(*args, timeout=300):
        out = subprocess.run([os.path.join(VENV_BIN, "ray"), *args], capture_output=True, text=True, timeout=timeout)
        assert out.returncode == 0, f"ray {' '.join(args[:2])} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
        return out.stdout

    def alive():
        code = "import ray; ray.init(address='auto'); print('NODES_ALIVE=%d' % sum(n['Alive'] for n in ray.nodes()))"
        out = subprocess.run([os.path.join(VENV_BIN, "ray"), "exec", str(cluster), f"python -c \"{code}\""],
                             capture_output=True, text=True, timeout=120)
        found = re.findall(r"NODES_ALIVE=(\d+)", out.stdout)
        return int(found[-1]) if found else 0

    try:
        ssh.start()
        began = time.time()
        ray_cli("up", "-y", "--no-config-cache", str(cluster))
        deadline = time.time() + 180
        while alive() < 3:
            assert time.time() < deadline, "the workers did not join"
            time.sleep(2)
        figures["ray_up_seconds"] = time.time() - began
        with SyntheticServer(SyntheticSet(seed=5, train=24, heldout=1, image_size=64), host=nodes.addr("ctl")) as srv:
            tsv = srv.write_tsv(str(tmp_path / "tsv"), bad_urls=False)["train"]
            vae = str(tmp_path / "vae.safetensors")
            save_model(AugVAE(PRESETS["debug-sl"]), vae)
            pipeline = tmp_path / "pipeline.yaml"
            pipeline.write_text(yaml.safe_dump({
                "run_dir": str(run), "tokenizer": {"vocab_size": 60},
                "download": {"input": tsv, "samples_per_shard": 4, "image_size": 64},
                "encode": {"vae": vae, "batch_size": 4}}))
            ray_cli("exec", str(cluster), f"{VENV_BIN}/lverse pipeline run {pipeline} --ray-address auto", timeout=600)
            requests, tokens = sum(srv.requests.values()), {p: p.stat().st_mtime_ns for p in run.glob("tokens/*")}
            ray_cli("exec", str(cluster), f"{VENV_BIN}/lverse pipeline run {pipeline} --ray-address auto", timeout=300)
            rerun = (sum(srv.requests.values()) - requests, {p: p.stat().st_mtime_ns for p in run.glob("tokens/*")})
        biart = debug_biart(str(run / "tokenizer.model"), str(tmp_path / "biart.safetensors"))
        caption = dict(shards=str(run / "tokens"), checkpoint=biart, vae=vae, tokenizer=str(run / "tokenizer.model"),
                       candidates=2, max_tokens=4, clip="lverse-tiny")
        ray_cli("exec", str(cluster), f"{VENV_BIN}/lverse caption " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in caption.items()) +
            f" --output {tmp_path / 'captions'} --executor ray --ray-address auto", timeout=600)
    finally:
        began = time.time()
        down = subprocess.run([os.path.join(VENV_BIN, "ray"), "down", "-y", str(cluster)], capture_output=True,
                              text=True, timeout=300)
        figures["ray_down_seconds"] = time.time() - began
        deadline = time.time() + 150  # the workers' Ray ends once it cannot reach the head
        while time.time() < deadline and any(ray_processes(nodes, node) for node in nodes.names):
            time.sleep(1)
        figures["ray_gone_seconds"] = time.time() - began
        left = {node: ray_processes(nodes, node) for node in nodes.names}
        ssh.stop()
        nodes.stop()
        print(" ".join(f"{k}={v:.1f}" for k, v in figures.items()))
    assert down.returncode == 0, down.stdout[-3000:]
    assert not any(left.values()), left
    assert sorted(os.listdir(run / "_done")) == ["download.json", "encode.json", "tokenizer.json"]
    assert json.loads((run / "_done" / "download.json").read_text())["written"] == 24
    assert (run / "tokenizer.model").is_file() and (run / "config.yaml").is_file()
    assert sorted(p.name for p in run.glob("tokens/*.tar")) == [f"{s:05d}.tar" for s in range(6)]
    assert json.loads((run / "tokens" / "_summary.json").read_text())["samples"] == 24
    assert rerun == (0, tokens), "the second run of the pipeline ran a stage again"
    for stage in ("shards", "tokens"):
        summary = json.loads((run / stage / "_summary.json").read_text())
        assert len(set(summary["shard_nodes"].values())) >= 2, (stage, summary["shard_nodes"])
    summary = json.loads((tmp_path / "captions" / "_summary.json").read_text())
    assert len(set(summary["shard_nodes"].values())) >= 2, summary["shard_nodes"]
    # one process: the same bytes
    run_encode(EncodeConfig(shards=str(run / "shards"), vae=vae, output=str(tmp_path / "tokens1"), batch_size=4,
                            workers=0))
    run_caption(CaptionConfig(**caption, output=str(tmp_path / "captions1"), workers=0))
    for mine, one in (("tokens", "tokens1"), ("captions", "captions1")):
        names = sorted(p.name for p in (tmp_path / one).iterdir() if p.suffix in (".tar", ".parquet"))
        assert names and names == sorted(p.name for p in (run / mine if mine == "tokens" else tmp_path / mine)
                                          .iterdir() if p.suffix in (".tar", ".parquet"))
        for name in names:
            ours = (run / mine if mine == "tokens" else tmp_path / mine) / name
            assert ours.read_bytes() == (tmp_path / one / name).read_bytes(), name


def ray_processes(nodes, node):
    """Ray's processes left on ``node`` (its sshd aside)."""
    found = []
    for command in map(command_of, nodes.pids(node)):
        if "ray" in command.split("/")[-1] or "raylet" in command or "gcs_server" in command or "ray::" in command:
            found.append(command[:120])
    return found


def debug_biart(tokenizer: str, path: str) -> str:
    """A debug BiART (random weights) for the tokenizer at ``tokenizer``."""
    from lverse.model.biart import PRESETS as BIART
    from lverse.model.biart import BiART, BiARTConfig
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer
    tok = CaptionTokenizer(tokenizer, offset=512)
    torch.manual_seed(0)
    save_model(BiART(BiARTConfig(**{**BIART["debug"].__dict__, "text_vocab": tok.vocab_size, "text_len": 24})), path)
    return path


@pytest.mark.slow
def test_a_lost_node_costs_only_its_shards_in_flight_and_a_lost_driver_nothing(tmp_path):
    """encode on a 3-node Ray cluster (tests/cluster.py): every process of one worker node killed
    mid-stage, then the driver killed mid-stage and the same command run again; an output folder
    the other nodes do not see refused before work; then caption with the other worker node
    killed mid-stage, generate with the first one (back by then) killed mid-stage, and download
    (Ray tasks, not actors) with a node killed mid-stage. Token shards, caption parquets and
    generated images equal a local run's byte for byte, downloaded samples a local run's: nothing
    lost, duplicated or half-written."""
    from lverse.pipeline.caption import run_caption
    from lverse.pipeline.configs import CaptionConfig, DownloadConfig, EncodeConfig, GenerateConfig, TokenizerConfig
    from lverse.pipeline.download import run_download
    from lverse.pipeline.encode import run_encode
    from lverse.pipeline.generate import run_generate
    from lverse.run import fit_tokenizer_on_shards

    from .test_encode import raw_shards
    raw = raw_shards(str(tmp_path / "raw"), count=16, n=16)
    vae = str(tmp_path / "vae.safetensors")
    torch.manual_seed(0)
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    run_encode(EncodeConfig(shards=raw, vae=vae, output=str(tmp_path / "reference"), batch_size=4, workers=0))
    tokenizer = fit_tokenizer_on_shards(str(tmp_path / "reference"), str(tmp_path / "tok"),
                                        TokenizerConfig(vocab_size=60))["model"]
    biart = debug_biart(tokenizer, str(tmp_path / "biart.safetensors"))
    run_caption(CaptionConfig(shards=str(tmp_path / "reference"), checkpoint=biart, vae=vae, tokenizer=tokenizer,
                              candidates=2, max_tokens=4, clip="lverse-tiny", output=str(tmp_path / "captions1"),
                              workers=0))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"a {c} {s}\n" for c in ("red", "blue", "green") for s in ("circle", "square")))
    generate = dict(prompts=str(prompts), checkpoint=biart, vae=vae, tokenizer=tokenizer, candidates=2,
                    prompts_per_item=1, clip="lverse-tiny", retries=2)
    run_generate(GenerateConfig(**generate, output=str(tmp_path / "generated1"), workers=0))
    nodes = Nodes(str(tmp_path / "net"), 3).start()
    ray = RayNodes(nodes, str(tmp_path / "ray"))
    encode = [os.path.join(VENV_BIN, "lverse"), "encode", "--shards", raw, "--vae", vae, "--batch-size", "4",
              "--executor", "ray", "--ray-address", "auto", "--retries", "2"]

    def start(output):
        return ray.popen_on("node1", [*encode, "--output", str(output)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)

    def when_done(output, count, proc):
        while len(glob.glob(str(output / "*_stats.json"))) < count:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.1)
    try:
        ray.start()
        lost = tmp_path / "lost_node"
        proc = start(lost)
        victim = None
        while victim is None:  # a worker node that is doing some of the work (Ray places actors as it likes)
            when_done(lost, 1, proc)
            done = [json.loads(open(p).read())["node"] for p in glob.glob(str(lost / "*_stats.json"))]
            victim = next((node for node in done if node != "node1"), None)
            time.sleep(0.05)
        nodes.kill(victim)
        killed_at = time.time()
        log, _ = proc.communicate(timeout=400)
        recovered_in = time.time() - killed_at
        assert proc.returncode == 0, log[-4000:]
        lost_driver = tmp_path / "lost_driver"
        proc = start(lost_driver)
        when_done(lost_driver, 3, proc)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        again = ray.run_on("node1", [*encode, "--output", str(lost_driver)], timeout=400)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        # /tmp/ray is each node's own here: an output folder there is one the other nodes cannot see
        unshared = ray.run_on("node1", [*encode, "--output", "/tmp/ray/lverse-tokens"], timeout=300)
        # caption next, the lost node back and the other worker node killed mid-stage
        ray.start_node(victim)
        ray.wait_nodes(3, 120)
        caption = [os.path.join(VENV_BIN, "lverse"), "caption", "--shards", str(lost), "--checkpoint", biart,
                   "--vae", vae, "--tokenizer", tokenizer, "--candidates", "2", "--max-tokens", "4",
                   "--clip", "lverse-tiny", "--retries", "2"]
        proc = ray.popen_on("node1", [*caption, "--output", str(tmp_path / "captions"), "--executor", "ray",
                                      "--ray-address", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
        while not glob.glob(str(tmp_path / "captions" / "*.parquet")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        other = ({"node2", "node3"} - {victim}).pop()
        nodes.kill(other)  # every node holds actors by now (5 on 3 nodes)
        caption_log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, caption_log[-4000:]
        # generate on node1 and the victim (3 actors on 2 nodes): the victim killed once a prompt is done
        proc = ray.popen_on("node1", [os.path.join(VENV_BIN, "lverse"), "generate", *_flags(generate), "--output",
                                      str(tmp_path / "generated"), "--executor", "ray", "--ray-address", "auto"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        while not glob.glob(str(tmp_path / "generated" / "*" / "result.json")):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        nodes.kill(victim)
        generate_log, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, generate_log[-4000:]
        # download (Ray tasks) on node1 and the other worker node, back: that node killed once a chunk is
        # done; each chunk waits on a slow image, so the node has one in flight then
        ray.start_node(other)
        ray.wait_nodes(2, 120)
        with SyntheticServer(SyntheticSet(seed=5, train=16, heldout=1, image_size=64), host=nodes.addr("ctl"),
                             slow_seconds=2) as srv:
            lines = []
            for i in range(0, 16, 2):
                lines += [f"{srv.data.sample('train', j)[1]}\t{srv.url}/img/train/{j}.jpg" for j in (i, i + 1)]
                lines.append(f"a picture that arrives too late\t{srv.url}/bad/slow.jpg")
            tsv = tmp_path / "in.tsv"
            tsv.write_text("\n".join(lines) + "\n")
            download = dict(input=str(tsv), samples_per_shard=3, image_size=64, timeout=1.0, download_threads=4)
            run_download(DownloadConfig(**download, output=str(tmp_path / "downloaded1"), workers=1))
            proc = ray.popen_on("node1", [os.path.join(VENV_BIN, "lverse"), "download", *_flags(download),
                                          "--output", str(tmp_path / "downloaded"), "--executor", "ray",
                                          "--ray-address", "auto"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
            while not glob.glob(str(tmp_path / "downloaded" / "*_stats.json")):
                assert proc.poll() is None, proc.stdout.read()[-3000:]
                time.sleep(0.05)
            nodes.kill(other)
            download_log, _ = proc.communicate(timeout=400)
            assert proc.returncode == 0, download_log[-4000:]
    finally:
        ray.stop()
        nodes.stop()
    print(f"lost_node_stage_end_seconds={recovered_in:.1f}")
    assert unshared.returncode == 2, unshared.stderr[-3000:]
    assert f"/tmp/ray/lverse-tokens is not visible from node(s) {other}:" in unshared.stderr, unshared.stderr[-3000:]
    assert "Ray actor lost" in log and "retrying" in log, log[-3000:]  # which shards, and why
    summary = json.loads((lost / "_summary.json").read_text())
    assert not summary["failed"] and summary["done"] == 16, summary
    summary = json.loads((lost_driver / "_summary.json").read_text())
    assert summary["skipped"] >= 3 and summary["done"] == 16 - summary["skipped"], summary  # only what was missing
    assert "Ray actor lost" in caption_log and "retrying" in caption_log, caption_log[-3000:]
    names = sorted(p.name for p in (tmp_path / "captions1").glob("*.parquet"))
    assert len(names) == 16 and names == sorted(p.name for p in (tmp_path / "captions").glob("*.parquet"))
    for name in names:
        assert (tmp_path / "captions" / name).read_bytes() == (tmp_path / "captions1" / name).read_bytes(), name
    assert "Ray actor lost" in generate_log, generate_log[-3000:]
    names = sorted(p.relative_to(tmp_path / "generated1") for p in (tmp_path / "generated1").rglob("*")
                   if p.is_file() and not p.name.startswith("_"))
    assert len(names) >= 12 and names == sorted(p.relative_to(tmp_path / "generated") for p in
                                               (tmp_path / "generated").rglob("*")
                                               if p.is_file() and not p.name.startswith("_"))
    for name in names:
        assert (tmp_path / "generated" / name).read_bytes() == (tmp_path / "generated1" / name).read_bytes(), name
    summary = json.loads((tmp_path / "downloaded" / "_summary.json").read_text())
    assert not summary["failed"], summary
    assert _samples(tmp_path / "downloaded") == _samples(tmp_path / "downloaded1")
    assert len(_samples(tmp_path / "downloaded1")) == 16
    for folder in (lost, lost_driver):
        names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("_"))
        assert names == sorted(p.name for p in (tmp_path / "reference").iterdir() if not p.name.startswith("_"))
        for name in names:
            if name.endswith(".tar"):
                assert (folder / name).read_bytes() == (tmp_path / "reference" / name).read_bytes(), name


def _flags(options: dict) -> list[str]:
    return [arg for k, v in options.items() for arg in (f"--{k.replace('_', '-')}", str(v))]


def _samples(folder) -> dict[str, tuple[bytes, bytes]]:
    """Each downloaded sample's caption and image, by key, over the folder's shards."""
    from .test_download import read_shards
    return {key: (members["txt"], members["jpg"]) for key, members in read_shards(folder).items()}
