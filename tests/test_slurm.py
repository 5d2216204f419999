"""SLURM templates against a real one-node SLURM cluster (munged, slurmctld, slurmd; private: one
node of tests/cluster.py; tests/test_multinode.py runs them across several).

Jobs are submitted with ``lverse slurm submit`` exactly as a user would, with ``SLURM_CONF``
pointing at the test cluster.
"""

import dataclasses
import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import pytest
import torch
import yaml

from lverse.cli import main
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.plans import plan
from lverse.runtime.stage import array_block
from lverse.slurm.render import SubmitOptions, check

from .cluster import SlurmCluster
from .test_encode import raw_shards
from .test_train import logged_steps, losses, metrics, run_job, train_config

HOSTILE = "dir with $(touch PWNED) `touch PWNED` and 'quotes'"


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")), nodes=1, cpus=os.cpu_count() or 2, share=4)
    if cluster.missing():
        message = f"SLURM binaries missing: {cluster.missing()} (make test installs them)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    cluster.start()
    yield cluster
    cluster.stop()


def lverse(cluster, *args, cwd=None, env=None):
    return subprocess.run([sys.executable, "-m", "lverse.cli", *args], env={**cluster.env, **(env or {})},
                          capture_output=True, text=True, timeout=120, cwd=cwd)


def render(opts):
    from lverse.slurm.render import render
    check(opts)
    return render(opts, plan(opts.stage, opts.config))


def submit(cluster, *args, env=None):
    out = lverse(cluster, "slurm", "submit", *args, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_array_blocks_cover_every_item_once():
    for count in (1, 4, 7, 100):
        for tasks in range(1, min(count, 9) + 1):
            items = [i for t in range(tasks) for i in array_block(count, t, tasks)]
            assert items == list(range(count))


@pytest.mark.slow
def test_encode_array_writes_each_shard_from_its_own_task(slurm, tmp_path):
    """4 image shards, a 4-task array: every token shard written, each by a different task. The
    run folder's path is hostile shell text; it stays inert."""
    root = tmp_path / HOSTILE
    raw_shards(str(root / "run" / "shards"), count=4, n=6)
    torch.manual_seed(0)
    save_model(AugVAE(PRESETS["debug-sl"]), str(root / "vae.safetensors"))
    config = root / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(root / "run"), "download": {"input": str(root / "none.tsv")},
                                      "encode": {"vae": str(root / "vae.safetensors"), "batch_size": 4}}))
    job = submit(slurm, "encode", "--config", str(config), "--cpus-per-task", "1", "--job-name", "enc")
    states = slurm.wait_job(job)
    logs = "".join(open(p).read() for p in glob.glob(str(root / "run" / "slurm" / "*.out")))
    assert sorted(states.values()) == ["COMPLETED"] * 4, (states, logs[-3000:])
    tokens = root / "run" / "tokens"
    assert sorted(os.path.basename(p) for p in glob.glob(str(tokens / "*.tar"))) == [f"{i:05d}.tar" for i in range(4)]
    by_task = {}
    for i in range(4):
        with open(tokens / f"_summary.task{i:05d}.json") as f:
            by_task[i] = json.load(f)["done_shards"]
    assert by_task == {i: [f"{i:05d}"] for i in range(4)}
    assert not glob.glob(str(tmp_path / "**" / "PWNED"), recursive=True) and not os.path.exists("PWNED")
    scripts = glob.glob(str(root / "run" / "slurm" / "encode-*.sbatch"))
    assert len(scripts) == 1 and "--array=0-3" in open(scripts[0]).read()


@pytest.mark.slow
def test_caption_array_captions_each_shard_from_its_own_task(slurm, data, biart, tmp_path):  # noqa: F811
    config = tmp_path / "caption.yaml"
    config.write_text(yaml.safe_dump({"shards": data["tokens"], "checkpoint": biart, "vae": data["vae"],
                                      "tokenizer": data["tokenizer"], "output": str(tmp_path / "captions"),
                                      "candidates": 2, "max_tokens": 4, "clip": "lverse-tiny"}))
    job = submit(slurm, "caption", "--config", str(config), "--cpus-per-task", "1")
    states = slurm.wait_job(job)
    logs = "".join(open(p).read() for p in glob.glob(str(tmp_path / "captions" / "slurm" / "*.out")))
    assert sorted(states.values()) == ["COMPLETED"] * 4, (states, logs[-3000:])
    for i in range(4):
        with open(tmp_path / "captions" / f"_summary.task{i:05d}.json") as f:
            assert json.load(f)["done_shards"] == [f"{i:05d}"]
        assert (tmp_path / "captions" / f"{i:05d}.parquet").is_file()


@pytest.mark.slow
def test_two_task_srun_training_finishes_and_checkpoints(slurm, data, tmp_path):  # noqa: F811
    cfg = train_config(tmp_path / "train.yaml", data, tmp_path / "run", steps=6, checkpoint_every=3)
    job = submit(slurm, "train", "--config", cfg, "--ntasks-per-node", "2", "--cpus-per-task", "1")
    states = slurm.wait_job(job)
    log = "".join(open(p).read() for p in glob.glob(str(tmp_path / "run" / "slurm" / "*.out")))
    assert list(states.values()) == ["COMPLETED"], log[-3000:]
    meta = json.load(open(tmp_path / "run" / "checkpoints" / "step_00000006" / "lverse.json"))
    assert meta["world_size"] == 2 and meta["step"] == 6
    assert os.path.isfile(tmp_path / "run" / "biart.safetensors")


STOP_STEPS, HOLD = 12, 5  # the stopped runs wait at step HOLD for their signal (LVERSE_HOLD_AT_STEP)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory):  # noqa: F811
    """The losses of the stop tests' run without a stop: 2 ranks through torchrun."""
    root = tmp_path_factory.mktemp("uninterrupted")
    cfg = train_config(root / "train.yaml", data, root / "run", steps=STOP_STEPS, checkpoint_every=1000, log_every=1,
                       export=False)
    run_job(2, "train", "--config", cfg)
    return {step: losses(entries[0]) for step, entries in metrics(root / "run").items()}


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["USR1", "TERM", "requeue"])
def test_a_stopped_training_job_checkpoints_requeues_and_continues_exactly(slurm, data, uninterrupted, stop,  # noqa: F811
                                                                           tmp_path):
    """USR1 is the template's warning before the time limit, TERM what `scancel --signal=TERM`
    sends; `scontrol requeue` is preemption's sequence (TERM to every process of the job, the
    batch script included, SIGKILL KillWait = 5 s later, the job requeued by SLURM). Each ends with
    a complete checkpoint at the step every rank agreed on, and the requeued job logs exactly the
    losses of a run that was never stopped."""
    cfg = train_config(tmp_path / "train.yaml", data, tmp_path / "run", steps=STOP_STEPS, checkpoint_every=1000,
                       log_every=1, export=False)
    job = submit(slurm, "train", "--config", cfg, "--ntasks-per-node", "2", "--cpus-per-task", "1",
                 env={"LVERSE_HOLD_AT_STEP": str(HOLD)})  # sbatch passes it on to the job
    metrics_file = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and logged_steps(tmp_path / "run") < HOLD:
        time.sleep(0.2)
    assert metrics_file.exists(), slurm.states(job)
    if stop == "requeue":
        subprocess.run(["scontrol", "requeue", job], env=slurm.env, check=True)
    else:  # what `--signal=USR1@300` does before the time limit: the signal to every task of the job's steps
        subprocess.run(["scancel", f"--signal={stop}", job], env=slurm.env, check=True)
    deadline = time.time() + 240
    while time.time() < deadline and "Restarts=0" in _show(slurm, job):
        time.sleep(0.5)
    assert "Restarts=0" not in _show(slurm, job), _show(slurm, job)
    states = slurm.wait_job(job, timeout=400)
    log = "".join(open(p).read() for p in glob.glob(str(tmp_path / "run" / "slurm" / "*.out")))
    assert list(states.values()) == ["COMPLETED"], log[-3000:]
    checkpoints = sorted(os.path.basename(p) for p in glob.glob(str(tmp_path / "run" / "checkpoints" / "step_*")))
    stopped = int(checkpoints[0].removeprefix("step_"))  # the stop's checkpoint, before SIGKILL could come
    assert stopped == HOLD and checkpoints[-1] == f"step_{STOP_STEPS:08d}", checkpoints
    signal_name = {"USR1": "SIGUSR1", "TERM": "SIGTERM", "requeue": "SIGTERM"}[stop]
    assert f"{signal_name} received: checkpointed at step {stopped} and stopping" in log, log[-3000:]
    logged = metrics(tmp_path / "run")
    assert sorted(logged) == list(range(1, STOP_STEPS + 1))
    for step, entries in logged.items():
        for entry in entries:
            assert losses(entry) == uninterrupted[step], step


@pytest.mark.slow
def test_ray_job_starts_a_cluster_and_runs_the_command(slurm, tmp_path):
    code = "import ray; ray.init(address='auto'); print('CPUS', ray.cluster_resources()['CPU'])"
    job = submit(slurm, "ray", "--cpus-per-task", "2", "--run-dir", str(tmp_path), "--job-name", "ray",
                 "--command", f"{sys.executable} -c \"{code}\"")
    states = slurm.wait_job(job, timeout=180)
    log = "".join(open(p).read() for p in glob.glob(str(tmp_path / "slurm" / "ray-*.out")))
    assert list(states.values()) == ["COMPLETED"], log[-3000:]
    assert "CPUS 2.0" in log and "state-dump" not in log  # Ray's own logs are kept apart
    assert glob.glob(str(tmp_path / "slurm" / "ray-*-*.log"))


def _show(cluster, job):
    return subprocess.run(["scontrol", "show", "job", job], env=cluster.env, capture_output=True, text=True).stdout


def test_hostile_job_names_are_refused_before_anything_is_written(data, tmp_path, monkeypatch, caplog):
    """`lverse slurm submit` in this process, as a user would call it: each name is refused (exit 2,
    naming --job-name) before a script is written, so sbatch, which submits the written script,
    is never reached; a plain name with the same config renders."""
    monkeypatch.chdir(tmp_path)
    cfg = train_config(tmp_path / "train.yaml", data, tmp_path / "run")
    for name in ['x"; touch PWNED; echo "', "a b", "$(touch PWNED)", "x\n#SBATCH --uid=0", "", "x" * 65]:
        caplog.clear()
        assert main(["slurm", "submit", "train", "--config", cfg, "--job-name", name]) == 2, name
        assert f"--job-name {name!r}: use 1-64 of letters" in caplog.text, name
    assert not (tmp_path / "PWNED").exists() and not (tmp_path / "run").exists()
    assert main(["slurm", "submit", "train", "--config", cfg, "--job-name", "biart.500m_2-a", "--dry-run"]) == 0
    (script,) = glob.glob(str(tmp_path / "run" / "slurm" / "train-*.sbatch"))
    assert "#SBATCH --job-name=biart.500m_2-a\n" in open(script).read()


def test_dry_run_keeps_the_script_and_quotes_every_value(data, tmp_path):  # noqa: F811
    folder = tmp_path / HOSTILE
    folder.mkdir()
    cfg = train_config(folder / "train.yaml", data, folder / "run")
    script, run_dir = render(SubmitOptions("train", config=cfg, nodes=2, gpus_per_node=8, partition="gpu",
                                           time="2-00:00:00", job_name="biart.500m"))
    assert run_dir == str(folder / "run")
    assert "#SBATCH --nodes=2" in script and "#SBATCH --ntasks-per-node=8" in script
    assert "#SBATCH --gpus-per-task=1" in script and "#SBATCH --partition=gpu" in script
    assert "--gpus-per-node" not in script  # with --gpus-per-task, it would only restate it
    config_word = script.split("train --config ", 1)[1].splitlines()[0]
    assert config_word.startswith("'") and "$(touch PWNED)" in config_word  # single-quoted: inert
    ray, _ = render(SubmitOptions("ray", nodes=3, command=["lverse", "pipeline", "run", "x.yaml", "--ray-address",
                                                           "auto", ";", "rm", "-rf", "/"]))
    assert "lverse pipeline run x.yaml --ray-address auto ';' rm -rf /" in ray
    lverse_bin = shlex.quote(os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "lverse"))
    assert f"\nsrun --kill-on-bad-exit=1 {lverse_bin} train --config {shlex.quote(cfg)}\n" in script
    assert f'[ -f {shlex.quote(str(folder / "run" / "stopped.json"))} ]; then\n' in script  # the requeue marker
    for bad in (dict(time="1h"), dict(partition="gpu;rm"), dict(array="0-3;x")):
        with pytest.raises(ValueError):
            render(SubmitOptions("train", config=cfg, **bad))
    with pytest.raises(ValueError, match="one task per GPU: --ntasks-per-node 4 with --gpus-per-node 8"):
        render(SubmitOptions("train", config=cfg, gpus_per_node=8, ntasks_per_node=4))
    cpu, _ = render(SubmitOptions("train", config=cfg, nodes=2, ntasks_per_node=4))  # CPU nodes: no GPU line
    assert "#SBATCH --ntasks-per-node=4" in cpu and "#SBATCH --gpu" not in cpu and "--gres" not in cpu


def test_an_elastic_train_script_starts_one_agent_per_node_and_quotes_every_value(data, tmp_path):  # noqa: F811
    """`--elastic MIN`: one task per node (a torchrun elastic agent starting a rank per GPU), the
    job and its step kept on a node failure (--no-kill), the rendezvous on the first node with
    MIN:NODES nodes; every value quoted as in the other templates; wrong values refused."""
    folder = tmp_path / HOSTILE
    folder.mkdir()
    cfg = train_config(folder / "train.yaml", data, folder / "run", grad_accum=3)  # 384 samples: 16 ranks keep them
    script, _ = render(SubmitOptions("train", config=cfg, nodes=4, gpus_per_node=8, cpus_per_task=2, elastic=2,
                                     max_restarts=5))
    header = [line for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == ["#SBATCH --job-name=lverse-train", "#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1",
                      "#SBATCH --cpus-per-task=16", "#SBATCH --time=24:00:00",
                      f"#SBATCH --output={shlex.quote(str(folder / 'run' / 'slurm'))}/%x-%j.out",
                      "#SBATCH --requeue", "#SBATCH --no-kill", "#SBATCH --open-mode=append",
                      "#SBATCH --signal=USR1@300", "#SBATCH --gpus-per-node=8"]
    bin_dir = os.path.dirname(os.path.abspath(sys.executable))
    launch = script[script.index("srun "):script.index("\nrc=$?")]
    words = shlex.split(launch.replace("\\\n", " "))
    assert words[:7] == ["srun", "--no-kill", "--kill-on-bad-exit=0", "bash", "-c", 'node_task "$@"', "node_task"]
    assert words[7] == os.path.join(bin_dir, "torchrun")
    assert {"--nnodes=2:4", "--nproc-per-node=8", "--rdzv-backend=c10d", "--max-restarts=5",
            '--rdzv-endpoint=$RDZV_HOST:$RDZV_PORT', "--rdzv-id=$SLURM_JOB_ID"} <= set(words), words
    assert words[-5:] == ["--no-python", os.path.join(bin_dir, "lverse"), "train", "--config", cfg]
    assert f"--config {shlex.quote(cfg)}\n" in launch + "\n"  # the hostile folder single-quoted: inert
    assert f"[ -f {shlex.quote(str(folder / 'run' / 'finished.json'))} ]" in script
    assert f"[ -f {shlex.quote(str(folder / 'run' / 'stopped.json'))} ]" in script
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1\n" in script
    cpu, _ = render(SubmitOptions("train", config=cfg, nodes=3, elastic=3))
    assert "--nnodes=3:3" in cpu and "--nproc-per-node=1" in cpu and "#SBATCH --gpu" not in cpu
    for bad, message in ((dict(elastic=5), "--elastic 5: the fewest nodes to go on with, 1 to --nodes (4)"),
                         (dict(elastic=0), "--elastic 0"), (dict(elastic=2, max_restarts=-1), "--max-restarts")):
        with pytest.raises(ValueError, match=re.escape(message)):
            render(SubmitOptions("train", config=cfg, nodes=4, **bad))
    with pytest.raises(ValueError, match="--elastic is for the train stage"):
        check(SubmitOptions("ray", command=["true"], nodes=2, elastic=1))


@pytest.mark.parametrize("nodes, elastic, gpus, batch, message", [
    (3, 2, 0, (1, 1), "--elastic 2 of --nodes 3: the global batch 3 (micro_batch_size 1 x grad_accum 1 x 3 ranks) "
                      "cannot be shared evenly by the ranks of 2 nodes, so training could not go on there; make it a "
                      "multiple of 2 (e.g. grad_accum 2), or give --elastic 3"),
    (4, 2, 2, (4, 1), "the global batch 32 (micro_batch_size 4 x grad_accum 1 x 8 ranks) cannot be shared evenly by "
                      "the ranks of 3 nodes, so training could not go on there; make it a multiple of 12 (e.g. "
                      "grad_accum 3), or give --elastic 4"),
    (3, 2, 0, (2, 2), None),  # 12 samples: 6 a rank on 2 nodes (the node-loss test's)
    (4, 2, 2, (4, 3), None),  # the first case's fix: 96 samples, 16 a rank on 3 nodes, 24 on 2
])
def test_an_elastic_job_whose_global_batch_the_nodes_left_cannot_keep_is_refused_at_submit(
        data, tmp_path, nodes, elastic, gpus, batch, message):  # noqa: F811
    """Training could not go on in place with a node count the job may be left with (the ranks
    there cannot share the global batch evenly, ``plan_batch``): refused before the job is
    submitted, saying what to change, rather than found out after a node is lost."""
    cfg = train_config(tmp_path / "train.yaml", data, tmp_path / "run", micro_batch_size=batch[0], grad_accum=batch[1])
    opts = SubmitOptions("train", config=cfg, nodes=nodes, gpus_per_node=gpus, elastic=elastic)
    if message is None:
        assert "--nnodes=2:" in render(opts)[0]
    else:
        with pytest.raises(ValueError, match=re.escape(message)):
            render(opts)
        assert f"--nnodes={nodes}:{nodes}" in render(dataclasses.replace(opts, elastic=nodes))[0]  # its fix


def test_download_array_has_one_task_per_chunk(tmp_path):
    tsv = tmp_path / "cc3m.tsv"
    tsv.write_text("".join(f"caption {i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in range(5)) + "no tab here\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                      "download": {"input": str(tsv), "samples_per_shard": 2},
                                      "encode": {"vae": "unused.safetensors"}}))
    script, _ = render(SubmitOptions("download", config=str(config)))
    assert "#SBATCH --array=0-2" in script and "--num-tasks 3" in script  # 5 valid lines in chunks of 2
    script, _ = render(SubmitOptions("download", config=str(config), array="1%1"))
    assert "#SBATCH --array=1%1" in script and "--num-tasks 3" in script
    with pytest.raises(ValueError, match="has 3 tasks"):
        render(SubmitOptions("download", config=str(config), array="0-5"))


def test_array_templates_render_their_values_into_the_header_and_the_launch_line(tmp_path):
    """Every value of the four job-array templates, rendered: the whole #SBATCH header and the
    whole script body, exactly (the SLURM tests here and in test_multinode.py run each of them)."""
    from lverse.slurm.render import render as render_script
    root = tmp_path / HOSTILE
    raw_shards(str(root / "run" / "shards"), count=3, n=1)
    (root / "in.tsv").write_text("".join(f"caption {i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in range(5)))
    (root / "prompts.txt").write_text("".join(f"prompt {i}\n" for i in range(5)))
    models = {"checkpoint": "biart.safetensors", "vae": "vae.safetensors", "tokenizer": "tok.model"}
    configs = {"pipeline": {"run_dir": str(root / "run"), "download": {"input": str(root / "in.tsv"),
                                                                       "samples_per_shard": 2},
                            "encode": {"vae": "vae.safetensors"}},
               "caption": {"shards": str(root / "run" / "shards"), "output": str(root / "captions"), **models},
               "generate": {"prompts": str(root / "prompts.txt"), "output": str(root / "images"),
                            "prompts_per_item": 2, **models}}
    for name, config in configs.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(config))
    lverse_bin = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "lverse")
    q = shlex.quote
    task = '--task-index "$SLURM_ARRAY_TASK_ID" --num-tasks 3'  # 5 lines in chunks of 2; 3 shards; 5 prompts by 2
    expected = {
        "download": ("pipeline", "run", [f"{q(lverse_bin)} pipeline run {q(str(root / 'pipeline.yaml'))} "
                                         f"--stage download {task} &"]),
        "encode": ("pipeline", "run", [f"{q(lverse_bin)} pipeline run {q(str(root / 'pipeline.yaml'))} "
                                       f"--stage encode {task} \\", "--workers 2 &"]),
        "caption": ("caption", "captions", [f"{q(lverse_bin)} caption --config {q(str(root / 'caption.yaml'))} "
                                            f"{task} \\", "--workers 2 &"]),
        "generate": ("generate", "images", [f"{q(lverse_bin)} generate --config {q(str(root / 'generate.yaml'))} "
                                            f"{task} \\", "--workers 2 &"])}
    for stage, (config, run_dir, launch) in expected.items():
        script, folder = render_script(SubmitOptions(stage, config=str(root / f"{config}.yaml"), gpus_per_node=2,
                                                     cpus_per_task=3, partition="cpu", time="1-02:00:00",
                                                     array="0-2%2", job_name=f"{stage}.1"),
                                       plan(stage, str(root / f"{config}.yaml")))
        assert folder == str(root / run_dir)
        lines = script.splitlines()
        header = [line for line in lines if line.startswith("#SBATCH")]
        assert header == [f"#SBATCH --job-name={stage}.1", "#SBATCH --array=0-2%2", "#SBATCH --nodes=1",
                          "#SBATCH --ntasks=1", "#SBATCH --cpus-per-task=3", "#SBATCH --time=1-02:00:00",
                          f"#SBATCH --output={q(str(root / run_dir / 'slurm'))}/%x-%A_%a.out", "#SBATCH --requeue",
                          "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@120", "#SBATCH --partition=cpu",
                          *(["#SBATCH --gpus-per-node=2"] if stage != "download" else [])], stage
        body = [line.strip() for line in lines if not line.startswith("#")]
        export = ["export NO_ALBUMENTATIONS_UPDATE=1"] if stage == "download" else []
        assert body == ["set -euo pipefail", "trap 'scontrol requeue \"$SLURM_JOB_ID\"; exit 0' USR1", *export,
                        *launch, "wait $!"], stage
