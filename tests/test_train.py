"""BiART training under DeepSpeed (real launcher processes, gloo on the CPU) and AugVAE training.

The data is real: image shards -> ``run_encode`` with a debug AugVAE -> token shards, and a fitted
caption tokenizer. Multi-rank runs go through torchrun, as a user launches them.
"""

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from lverse.core.shards import file_sha256, iter_samples, read_tar, token_shard_counts
from lverse.model import AugVAE, BiART
from lverse.model.biart import BiARTConfig, Direction
from lverse.model.checkpoint import load_model
from lverse.pipeline.configs import TrainConfig
from lverse.pipeline.train import ds_config
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.data import Batches, GlobalBatches, GlobalOrder, Stream, TokenBatch
from lverse.runtime.distributed import world_info_from_env
from lverse.runtime.metrics import read_records, step_records
from lverse.runtime.token_index_build import ensure_index

from .conftest import free_port
from .procs import environ_of, processes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DS_CONFIGS = sorted(glob.glob(os.path.join(REPO, "ds_configs", "*.json")))
SHARDS, PER_SHARD = 4, 16


def train_config(path, dataset, run_dir, **over):
    """A debug BiART run on ``dataset`` (the ``data`` fixture); ``over`` replaces fields (a dict is
    merged into the section: ``data={"workers": 1}``). The peak FLOP/s is given, so that no rank
    spends a second measuring it (two_rank_run does)."""
    cfg = {"run_dir": str(run_dir), "steps": 8, "micro_batch_size": 4, "deepspeed": os.path.join(REPO, "ds_configs",
           "zero2_bf16.json"), "checkpoint_every": 4, "log_every": 1, "model": {"preset": "debug",
           "overrides": {"text_len": 24}}, "data": {"shards": dataset["tokens"], "tokenizer": dataset["tokenizer"],
           "vae": dataset["vae"], "workers": 2}, "optim": {"lr": 3e-3, "warmup_steps": 2}, "peak_flops": 1e12}
    for key, value in over.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def launch(nproc, *args, launcher="torchrun", env=None):
    """``torchrun --nproc_per_node N -m lverse.cli ARGS``, or the same through the ``deepspeed``
    launcher: a real multi-process job, in a session of its own (so a test can kill all of it)."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc)]
    else:
        cmd = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", str(nproc)]
    cmd += ["--master_port", str(free_port()), "--module" if launcher == "deepspeed" else "-m", "lverse.cli", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, **(env or {})})


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a node's death or a job's end does. Not its
    process group: torchrun starts each rank in a session of its own, so a killed torchrun
    would leave its ranks running."""
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += processes(parent=tree[-1])  # its children
    for member in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(member, signal.SIGKILL)


def run_job(nproc, *args, timeout=300, launcher="torchrun"):
    proc = launch(nproc, *args, launcher=launcher)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def metrics(run_dir):
    """step -> every metrics line logged for it (a resumed run logs some steps twice); events
    (re-formations) left out."""
    lines = {}
    for m in step_records(read_records(os.path.join(run_dir, "metrics.jsonl"))):
        lines.setdefault(m["step"], []).append(m)
    return lines


def logged_steps(run_dir) -> int:
    """How many steps' metrics lines a run that is still writing has finished (0 before the file)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    return sum(1 for line in open(path).read().splitlines(keepends=True)
               if line.endswith("\n") and '"event"' not in line)


def losses(entry):
    return {k: v for k, v in entry.items() if k.endswith(("/loss", "/ref", "/gen"))}


# --- data -------------------------------------------------------------------------------------

def _stream(data, **kw):
    """The AugVAE's kind of stream (a slot per rank and worker), here over the token shards."""
    shards = sorted(glob.glob(os.path.join(data["tokens"], "*.tar")))
    return Stream(tuple(shards), tuple(token_shard_counts(shards, file_sha256(data["vae"]))), 0, **kw)


def _batches(data, rank, world, workers, start=0, n=4, resampled=False):
    """BiART's micro-batches: this rank's first ``n`` of the global order from sample ``start`` on."""
    samples = ensure_index(sorted(glob.glob(os.path.join(data["tokens"], "*.tar"))), file_sha256(data["vae"]))
    make = TokenBatch(data["tokenizer"], 512, 24, 64, 512, 0.1)
    ds = GlobalBatches(samples, GlobalOrder(len(samples), 0, resampled), make, 4, rank, world, workers, start)
    it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
    return [next(it) for _ in range(n)]


def test_no_sample_seen_twice_in_an_epoch(data):
    """The AugVAE's image-shard streams (BiART's global order: test_data_order.py): 2 ranks x 2
    workers over 4 shards, one epoch's batches hold every sample exactly once."""
    seen = []
    for rank in range(2):
        ds = Batches(_stream(data, shuffle_shards=2), _keys, 4, rank, 2, 2)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
        for _ in range(SHARDS * PER_SHARD // (2 * 4)):
            seen += next(it)
    assert len(seen) == len(set(seen)) == SHARDS * PER_SHARD


def _keys(samples, rngs):
    return [s["__key__"] for s in samples]


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_resumed_stream_continues_exactly(data, resampled):
    """Micro-batch k onwards of the global order started at k's first sample equals the
    uninterrupted one's, captions (with BPE-dropout) included, across DataLoader worker processes;
    9 micro-steps of 2 x 4 samples cross the epoch boundary (64 samples)."""
    full = _batches(data, rank=1, world=2, workers=2, n=9, resampled=resampled)
    for start in (3, 4):
        resumed = _batches(data, rank=1, world=2, workers=2, start=start * 2 * 4, n=9 - start, resampled=resampled)
        for a, b in zip(full[start:], resumed):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["text"], b["text"])


def test_too_few_shards_for_the_readers_is_a_clear_error(data):
    """Only the AugVAE's image-shard streams have this limit; BiART's global order has none."""
    with pytest.raises(ValueError, match="4 shards for 6 readers"):
        Batches(_stream(data), lambda s, r: s, 4, 0, 3, 2)


def test_token_shards_of_another_vae_are_refused(data, tmp_path):
    shards = sorted(glob.glob(os.path.join(data["tokens"], "*.tar")))
    with pytest.raises(ValueError, match="encoded by another AugVAE"):
        token_shard_counts(shards, "0" * 64)
    with pytest.raises(ValueError, match="not a token shard"):
        token_shard_counts(sorted(glob.glob(os.path.join(data["raw"], "*.tar"))), None)


def test_ds_config_may_not_set_batch_or_optimizer(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 64}))
    with pytest.raises(ValueError, match="come from the run config"):
        ds_config(TrainConfig(deepspeed=str(bad)), 1)


def test_slurm_variables_give_rank_and_world():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "8", "SLURM_JOB_NODELIST": "n[1-2]"}
    info = world_info_from_env(env)
    assert (info.rank, info.local_rank, info.world_size, info.source) == (5, 1, 8, "slurm")
    assert world_info_from_env({**env, "RANK": "2", "WORLD_SIZE": "4"}).source == "torchrun"
    assert world_info_from_env({}).world_size == 1


def test_the_collective_timeout_is_read_in_seconds_and_a_bad_value_is_named(monkeypatch):
    import datetime

    from lverse.core.errors import InputError
    from lverse.runtime.distributed import collective_timeout
    monkeypatch.delenv("LVERSE_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() is None  # torch's own
    monkeypatch.setenv("LVERSE_COLLECTIVE_TIMEOUT", "60")
    assert collective_timeout() == datetime.timedelta(seconds=60)
    for bad in ("soon", "0", "-5"):
        monkeypatch.setenv("LVERSE_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(InputError, match=re.escape(f"LVERSE_COLLECTIVE_TIMEOUT={bad!r}: give the seconds")):
            collective_timeout()


# --- BiART under DeepSpeed --------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    """2 ranks, ZeRO-2, bf16, gloo, through the ``deepspeed`` launcher: 40 steps with checkpoints
    at 20 and 40."""
    root = tmp_path_factory.mktemp("two_rank")
    cfg = train_config(root / "run.yaml", data, root / "run", steps=40, checkpoint_every=20, sample_every=20,
                       peak_flops=None)
    out = run_job(2, "train", "--config", cfg, launcher="deepspeed")
    return {"run_dir": str(root / "run"), "config": cfg, "log": out}


@pytest.mark.slow
def test_two_rank_zero2_bf16_training_learns_both_directions(two_rank_run):
    run, m = two_rank_run["run_dir"], metrics(two_rank_run["run_dir"])
    assert sorted(m) == list(range(1, 41))
    for d in ("t2i", "i2t"):
        values = [m[s][0][f"{d}/gen"] for s in sorted(m) if f"{d}/gen" in m[s][0]]
        assert len(values) == 20  # alternating: one direction per step
        assert np.mean(values[-4:]) < np.mean(values[:2]) - 0.5, (d, values)
    last = m[40][0]
    assert last["tokens_per_s"] > 0 and 0 < last["mfu"] < 1 and last["grad_norm"] > 0
    assert "kernels: " in two_rank_run["log"] and "optimizer: torch AdamW" in two_rank_run["log"]
    assert re.search(r"MFU against \S+ FLOP/s per device \(measured\)", two_rank_run["log"]), two_rank_run["log"]
    assert [os.path.basename(p) for p in sorted(glob.glob(os.path.join(run, "checkpoints", "step_*")))] == \
        ["step_00000020", "step_00000040"]
    assert glob.glob(os.path.join(run, "tensorboard", "events.*"))
    assert os.path.isfile(os.path.join(run, "samples", "step_00000040.png"))
    model = load_model(os.path.join(run, "biart.safetensors"), BiART, BiARTConfig)
    assert model.cfg.text_len == 24 and model.cfg.image_vocab == 512


@pytest.mark.slow
def test_two_rank_checkpoint_resumes_on_one_rank(two_rank_run, tmp_path):
    """The 2-rank ZeRO-2 checkpoint of step 40 continues on 1 rank through a universal checkpoint:
    one more step at lr 0 leaves exactly the weights the 2-rank run exported."""
    run = tmp_path / "run"
    shutil.copytree(two_rank_run["run_dir"], run)
    with open(two_rank_run["config"]) as f:
        cfg = yaml.safe_load(f)
    cfg.update(run_dir=str(run), steps=41, export=True, sample_every=0)
    cfg["optim"].update(lr=0.0, warmup_steps=0, schedule="constant")
    with open(tmp_path / "run.yaml", "w") as f:
        yaml.safe_dump(cfg, f)
    out = run_job(1, "train", "--config", str(tmp_path / "run.yaml"))
    assert "converting to a universal checkpoint" in out and "resumed from" in out
    before = load_model(os.path.join(two_rank_run["run_dir"], "biart.safetensors"), BiART, BiARTConfig)
    after = load_model(os.path.join(run, "biart.safetensors"), BiART, BiARTConfig)
    for (name, a), b in zip(before.state_dict().items(), after.state_dict().values()):
        assert torch.equal(a, b), name
    assert json.load(open(run / "checkpoints" / "step_00000041" / "lverse.json"))["world_size"] == 1


@pytest.mark.slow
def test_sigkilled_run_resumes_with_the_same_losses(data, tmp_path):
    """A 2-rank run killed with SIGKILL after its step-4 checkpoint and started again logs exactly
    the losses of an uninterrupted run (model, optimizer, lr, data position and RNG restored)."""
    full = tmp_path / "full"
    run_job(2, "train", "--config", train_config(tmp_path / "full.yaml", data, full, export=False))
    killed = tmp_path / "killed"
    cfg = train_config(tmp_path / "killed.yaml", data, killed, export=False, keep_checkpoints=1)
    proc = launch(2, "train", "--config", cfg, env={"LVERSE_HOLD_AT_STEP": "5"})  # waits after step 5
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.isfile(killed / "checkpoints" / "step_00000004" / "lverse.json")
                                          and logged_steps(killed) >= 5):
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait()
    assert os.path.isfile(killed / "checkpoints" / "step_00000004" / "lverse.json")
    assert not os.path.isfile(killed / "checkpoints" / "step_00000008" / "lverse.json")
    partial = killed / "checkpoints" / "step_00000008"  # as if killed while writing step 8
    partial.mkdir(exist_ok=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"half a file")
    run_job(2, "train", "--config", cfg)
    kept = sorted(p.name for p in (killed / "checkpoints").glob("step_*"))
    assert kept == ["step_00000008"]  # keep_checkpoints: 1
    assert os.path.isfile(partial / "lverse.json")
    a, b = metrics(full), metrics(killed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert len(b[5]) == 2  # logged before the kill, and again after it
    for step in a:
        for entry in b[step]:  # steps logged before the kill and again after it: all equal
            assert losses(entry) == losses(a[step][0]), step


@pytest.mark.slow
def test_activation_checkpointing_gives_the_same_step(data, tmp_path):
    """Recomputing each block in the backward pass changes memory, not the numbers."""
    results = {}
    for flag in (False, True):
        cfg = train_config(tmp_path / f"{flag}.yaml", data, tmp_path / f"run{flag}", steps=2, export=False,
                           activation_checkpointing=flag)
        proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert f"activation_checkpointing: {'on' if flag else 'off'}" in proc.stderr
        results[flag] = metrics(tmp_path / f"run{flag}")
    for step in (1, 2):
        a, b = results[False][step][0], results[True][step][0]
        assert losses(a) == losses(b) and a["grad_norm"] == b["grad_norm"]


# --- AugVAE -----------------------------------------------------------------------------------

def vae_config(path, data, run_dir, **over):
    cfg = {"run_dir": str(run_dir), "shards": data["raw"], "preset": "tiny-ml", "ml_steps": 3, "sl_steps": 3,
           "batch_size": 4, "lr": 1e-3, "log_every": 1, "checkpoint_every": 2, "workers": 1, **over}
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.mark.slow
def test_two_rank_vae_training_keeps_the_codebooks_identical(data, tmp_path):
    # no LPIPS term (it does not touch the codebooks; test_vae_training_resumes has it)
    run_job(2, "train-vae", "--config", vae_config(tmp_path / "vae.yaml", data, tmp_path / "run",
                                                   perceptual_weight=0.0))
    m = metrics(tmp_path / "run")
    assert sorted(m) == list(range(1, 7))
    assert [m[s][0]["phase"] for s in sorted(m)] == ["ml"] * 3 + ["sl"] * 3
    assert all(m[s][0]["codebook_max_diff"] == 0.0 for s in m)  # all-reduced across the 2 ranks
    assert all(m[s][0]["perplexity"] > 1 for s in m)
    ml = AugVAE.from_pretrained(str(tmp_path / "run" / "augvae-ml.safetensors"))
    sl = AugVAE.from_pretrained(str(tmp_path / "run" / "augvae-sl.safetensors"))
    assert (ml.cfg.variant, sl.cfg.variant, sl.cfg.num_tokens) == ("ml", "sl", 64)


@pytest.mark.slow
def test_vae_training_resumes_with_the_same_losses(data, tmp_path):
    """Across the ML -> SL switch: the checkpoint of step 3 (the last ML step) resumes into SL; a
    marker of another checkpoint format is refused, saying to train into a new run_dir."""
    cfg = vae_config(tmp_path / "vae.yaml", data, tmp_path / "run", checkpoint_every=3)
    run_job(1, "train-vae", "--config", cfg)
    full = metrics(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step_00000006")
    os.remove(tmp_path / "run" / "metrics.jsonl")
    marker = tmp_path / "run" / "checkpoints" / "step_00000003" / "lverse.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "format": 0}))
    proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train-vae", "--config", cfg], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and (f"checkpoint {marker.parent} is of format 0; this lverse reads format 2 only: "
                                     "train into a new run_dir with this lverse") in proc.stderr, proc.stderr[-3000:]
    marker.write_text(json.dumps(meta))
    run_job(1, "train-vae", "--config", cfg)
    resumed = metrics(tmp_path / "run")
    assert sorted(resumed) == [4, 5, 6]
    for step in resumed:
        for key in ("loss", "mse", "lpips", "commit", "perplexity"):
            assert resumed[step][0][key] == full[step][0][key], (step, key)


@pytest.mark.slow
def test_vae_sl_ends_at_its_target_psnr_and_a_rerun_does_not_train_on(data, tmp_path):
    """target_psnr makes sl_steps a ceiling; a target no model misses ends SL at its first evaluation."""
    evaluated = dict(eval_shards=data["raw"], eval_every=1, eval_images=6, perceptual_weight=0.0)  # PSNR alone
    run_job(1, "train-vae", "--config", vae_config(tmp_path / "vae.yaml", data, tmp_path / "run", target_psnr=-1.0,
                                                   **evaluated))
    m = metrics(tmp_path / "run")
    assert max(m) == 4, "SL (steps 4-6) ends at step 4, its first evaluation"
    assert all(any("eval_psnr" in line for line in m[s]) for s in range(1, 5))
    with open(tmp_path / "run" / "checkpoints" / "step_00000004" / "lverse.json") as f:
        assert json.load(f)["reached_target"] is True
    assert AugVAE.from_pretrained(str(tmp_path / "run" / "augvae-sl.safetensors")).cfg.variant == "sl"
    lines = (tmp_path / "run" / "metrics.jsonl").read_text()
    run_job(1, "train-vae", "--config", str(tmp_path / "vae.yaml"))
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == lines, "a rerun trains no further"

    run_job(1, "train-vae", "--config", vae_config(tmp_path / "vae2.yaml", data, tmp_path / "run2", target_psnr=999.0,
                                                   **evaluated))
    assert max(metrics(tmp_path / "run2")) == 6, "an unreached target: sl_steps is the ceiling"


def test_read_tar_reads_every_sample(data):
    samples = read_tar(os.path.join(data["tokens"], "00000.tar"))
    assert len(samples) == PER_SHARD and all("codes.npy" in s and "txt" in s for s in samples)


def test_deepspeed_configs_are_found_by_name_from_any_folder(tmp_path, monkeypatch):
    from lverse.runtime.deepspeed import ds_config_path
    monkeypatch.chdir(tmp_path)
    for path in DS_CONFIGS:
        name = os.path.basename(path).removesuffix(".json")
        with open(ds_config_path(name)) as a, open(ds_config_path(f"{name}.json")) as b, open(path) as c:
            assert json.load(a) == json.load(b) == json.load(c)
    with pytest.raises(FileNotFoundError, match="neither a file nor a shipped name .*zero2_bf16"):
        ds_config_path("zero9_bf16")


def test_shipped_run_configs_parse():
    from lverse.core.config import load_config
    from lverse.pipeline.configs import VAETrainConfig
    for name in ("train_debug.yaml", "train_cc3m.yaml"):
        assert load_config(os.path.join(REPO, "configs", name), TrainConfig).steps > 0
    assert load_config(os.path.join(REPO, "configs", "train_vae_debug.yaml"), VAETrainConfig).ml_steps > 0


@pytest.mark.parametrize("text, message", [
    ("steps: -5", "steps must be at least 1, got -5"),
    ("steps: true", "steps: expected int, got True"),
    ("micro_batch_size: 2.5", "micro_batch_size: expected int, got 2.5"),
    ("micro_batch_size: 0", "micro_batch_size must be at least 1, got 0"),
    ("checkpoint_every: 0", "checkpoint_every must be at least 1, got 0"),
    ("optim: {schedule: 3}", "optim.schedule: expected str, got 3"),
    ("steps: [1", "is not valid YAML"),
    ("- steps: 1", "expected a mapping of config keys, got list"),
])
def test_config_mistakes_are_refused_before_any_work_with_the_field_named(tmp_path, text, message):
    from lverse.core.config import load_config
    from lverse.core.errors import InputError
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(InputError, match=re.escape(message)):
        load_config(str(path), TrainConfig)


@pytest.mark.parametrize("text, message", [("{not json", "is not JSON"), ("[1, 2]", "holds a list, not a JSON object")])
def test_a_deepspeed_config_that_is_no_json_object_is_named(tmp_path, text, message):
    from lverse.core.errors import InputError
    path = tmp_path / "ds.json"
    path.write_text(text)
    with pytest.raises(InputError, match=f"{re.escape(str(path))} {message}"):
        ds_config(TrainConfig(deepspeed=str(path)), 1)


@pytest.mark.parametrize("change, message", [
    ({"zero_optimisation": {"stage": 2}}, "unknown keys zero_optimisation (did you mean zero_optimization?)"),
    ({"zero_optimization": {"stage": 2, "overlap_com": True}}, "overlap_com: Extra inputs are not permitted"),
    ({"bf16": {"enabled": "maybe"}}, "enabled: Input should be a valid boolean"),
    ({"zero_optimization": {}}, "zero_optimization.stage is not set"),
])
def test_deepspeed_config_mistakes_are_refused_before_any_work(tmp_path, change, message):
    """DeepSpeed's own parser checks the file up front; a key it never reads is a typo it would
    ignore (``zero_optimisation`` would train at stage 0 unasked), and the stage is said, not implied."""
    from lverse.core.errors import InputError
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}, **change}))
    with pytest.raises(InputError, match=f"{re.escape(str(path))}: .*{re.escape(message)}"):
        ds_config(TrainConfig(deepspeed=str(path)), 1)
    path.write_text(json.dumps({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}))
    assert ds_config(TrainConfig(deepspeed=str(path)), 1)["zero_optimization"] == {"stage": 2}


@pytest.mark.parametrize("asked, trained, world, planned", [
    ((4, 1), None, 1, (4, 1)),  # a new run: the config's
    ((4, 1), ((4, 1), 2, 8), 1, (4, 2)),  # 2 ranks x 4 resumed on 1: two micro-steps of 4
    ((4, 1), ((4, 1), 2, 8), 4, (2, 1)),  # on 4: the micro-batch halves
    ((1, 2), ((1, 2), 3, 6), 2, (1, 3)),  # an elastic job that lost one of 3 nodes
    ((4, 1), ((4, 1), 3, 12), 2, (3, 2)),  # a share of 6: the largest micro-batch up to 4 that divides it
    ((1, 2), ((1, 2), 2, 6), 3, (1, 2)),  # resumed again with the nodes back: the config's
    ((8, 1), ((4, 1), 2, 8), 1, (8, 1)),  # another micro-batch in the config: the global batch it asks for
    ((4, 3), ((4, 1), 2, 8), 1, (4, 3)),
])
def test_a_resume_on_another_number_of_ranks_keeps_the_global_batch(asked, trained, world, planned):
    from lverse.pipeline.train import plan_batch
    from lverse.runtime.trainer import Checkpoint
    resume = None
    if trained:
        batch, ranks, global_batch = trained
        resume = Checkpoint(4, "ckpt", {"batch": list(batch), "world_size": ranks,
                                        "data": {"global_batch": global_batch}})
    cfg = TrainConfig(micro_batch_size=asked[0], grad_accum=asked[1])
    assert plan_batch(cfg, world, resume) == planned


def test_a_global_batch_the_ranks_cannot_share_is_refused_saying_what_to_change():
    from lverse.core.errors import InputError
    from lverse.pipeline.train import plan_batch
    from lverse.runtime.trainer import Checkpoint
    resume = Checkpoint(4, "ckpt", {"batch": [4, 1], "world_size": 2, "data": {"global_batch": 8}})
    with pytest.raises(InputError, match=re.escape(
            "checkpoint ckpt was trained with global batch 8, which 3 ranks cannot share evenly: run on a number of "
            "ranks that divides it (1, 2, 4, 8), or set micro_batch_size and grad_accum in the config")):
        plan_batch(TrainConfig(micro_batch_size=4), 3, resume)


class _Payload:
    """Unpickling this creates a file: the stand-in for code a tampered run folder would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


@pytest.fixture(scope="module")
def one_step_run(data, tmp_path_factory):
    """A 1-step run of ``train_config`` (its checkpoint and exported model), which tests copy to
    their own folder (``copy_of``) before they resume, tamper with or export it."""
    root = tmp_path_factory.mktemp("one_step")
    cfg = train_config(root / "run.yaml", data, root / "run", steps=1)
    subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], check=True, capture_output=True,
                   timeout=300)
    return root / "run"


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
@pytest.mark.parametrize("member", ["mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_tampered_run_folder_runs_no_code_on_resume_or_export(member, data, one_step_run, tmp_path):
    """DeepSpeed loads its files with full pickle; lverse makes those loads weights-only (with
    DeepSpeed's few classes allowed), so a pickled call in a run folder is refused, not run."""
    cfg = train_config(tmp_path / "run.yaml", data, copy_of(one_step_run, tmp_path), steps=1)
    lverse = [sys.executable, "-m", "lverse.cli"]
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    # the untampered folder exports: DeepSpeed's own classes in it are allowed
    subprocess.run([*lverse, "export", str(tmp_path / "run"), "--output", str(tmp_path / "good.safetensors")],
                   check=True, capture_output=True, timeout=300)
    marker = tmp_path / "code-ran"
    state = torch.load(step / member, weights_only=False)
    state["payload"] = _Payload(str(marker))
    torch.save(state, step / member)
    for command in (["export", str(tmp_path / "run"), "--output", str(tmp_path / "bad.safetensors")],
                    ["train", "--config", cfg, "--steps", "2"]):
        proc = subprocess.run([*lverse, *command], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert not marker.exists(), command
        last = proc.stderr.strip().splitlines()[-1]
        assert f"DeepSpeed checkpoint {step}" in last and "weights_only=True" in last and "refused" in last, last
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.slow
def test_a_run_records_its_augvae_and_tokenizer_and_resumes_only_with_them(data, one_step_run, tmp_path):
    """Checkpoints and the exported model record both files' sha256; resuming with a tokenizer of
    the same size but another file is refused (ignore_provenance: true goes on), as is resuming
    with another model config, the field named."""
    from lverse.model.checkpoint import provenance_of, read_provenance
    copy_of(one_step_run, tmp_path)
    lverse = [sys.executable, "-m", "lverse.cli"]
    recorded = provenance_of(data["vae"], data["tokenizer"])
    assert read_provenance(str(tmp_path / "run" / "biart.safetensors")) == recorded
    wider = {"preset": "debug", "overrides": {"text_len": 24, "n_layer": 3}}
    proc = subprocess.run([*lverse, "train", "--config", train_config(tmp_path / "wide.yaml", data, tmp_path / "run",
                                                                      steps=2, model=wider)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "is of another model (n_layer 2 there, 3 here)" in proc.stderr, proc.stderr[-3000:]
    captions = [" ".join(reversed(s["txt"].decode().split())) for s in iter_samples(os.path.join(data["raw"],
                                                                                                 "00000.tar"))]
    CaptionTokenizer.fit(captions * 4, str(tmp_path / "other"), vocab_size=64, offset=512)
    other = str(tmp_path / "other.model")
    cfg = train_config(tmp_path / "run.yaml", {**data, "tokenizer": other}, tmp_path / "run", steps=2)
    proc = subprocess.run([*lverse, "train", "--config", cfg], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"tokenizer {other} has sha256 {provenance_of(data['vae'], other)['tokenizer_sha256'][:16]}, checkpoint "
            f"{tmp_path / 'run' / 'checkpoints' / 'step_00000001'} was trained with "
            f"{recorded['tokenizer_sha256'][:16]}") in proc.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "step_00000002")
    cfg = train_config(tmp_path / "run.yaml", {**data, "tokenizer": other}, tmp_path / "run", steps=2,
                       ignore_provenance=True)
    subprocess.run([*lverse, "train", "--config", cfg], check=True, capture_output=True, timeout=300)
    assert read_provenance(str(tmp_path / "run" / "biart.safetensors"))["tokenizer_sha256"] == \
        provenance_of(data["vae"], other)["tokenizer_sha256"]


@pytest.mark.slow
def test_a_checkpoint_or_run_config_of_another_format_is_refused_naming_a_new_run_dir(data, one_step_run, tmp_path):
    """The checkpoint's marker and the run folder's config.yaml record their formats, as the run
    wrote them. Export refuses either of another format or of none, resume such a marker, each
    saying to train into a new run_dir; config.yaml given back as a config loads, its format checked."""
    from lverse.core.config import load_config
    from lverse.core.errors import InputError
    from lverse.core.formats import CHECKPOINT_FORMAT, RUN_CONFIG_FORMAT
    from lverse.pipeline.train import export_checkpoint
    run = copy_of(one_step_run, tmp_path)
    marker, config = run / "checkpoints" / "step_00000001" / "lverse.json", run / "config.yaml"
    meta, written = json.loads(marker.read_text()), yaml.safe_load(config.read_text())
    assert meta["format"] == CHECKPOINT_FORMAT and written["format"] == RUN_CONFIG_FORMAT
    assert load_config(str(config), TrainConfig).steps == 1
    files = ((marker, meta, json.dumps, f"checkpoint {marker.parent}"),
             (config, written, yaml.safe_dump, f"run config {config}"))
    for file, values, dump, what in files:
        for found, said in ((None, "records no format version"), (0, "is of format 0")):
            edited = {k: v for k, v in values.items() if k != "format"} | ({} if found is None else {"format": found})
            file.write_text(dump(edited))
            expected = CHECKPOINT_FORMAT if file == marker else RUN_CONFIG_FORMAT
            with pytest.raises(InputError, match=re.escape(f"{what} {said}; this lverse reads format {expected} "
                                                           "only: train into a new run_dir with this lverse")):
                export_checkpoint(str(run), str(tmp_path / "biart.safetensors"))
        if file == marker:  # resume (of format 0)
            proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config",
                                   train_config(tmp_path / "run.yaml", data, run, steps=2)],
                                  capture_output=True, text=True, timeout=300)
            assert proc.returncode == 2, proc.stderr[-3000:]
            assert f"{what} is of format 0;" in proc.stderr.strip().splitlines()[-1] and "Traceback" not in proc.stderr
        file.write_text(dump(values))
    assert not (tmp_path / "biart.safetensors").exists()
    config.write_text(yaml.safe_dump({**written, "format": 0}))
    with pytest.raises(InputError, match=re.escape(f"run config {config} is of format 0; this lverse reads format 1 "
                                                   "only: write the config anew")):
        load_config(str(config), TrainConfig)


@pytest.mark.slow
def test_ctrl_c_twice_checkpoints_once_and_exits_0(data, tmp_path):
    """Ctrl-C reaches the whole process group (DataLoader workers included, which leave it to the
    training process); the second one, while the checkpoint is written, does not interrupt it."""
    cfg = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=6, checkpoint_every=1000, log_every=1,
                       export=False)
    proc = subprocess.Popen([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "LVERSE_HOLD_AT_STEP": "3"})
    deadline = time.time() + 120
    while time.time() < deadline and logged_steps(tmp_path / "run") < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = json.loads((tmp_path / "run" / "stopped.json").read_text())
    assert stopped["signal"] == "SIGINT" and stopped["step"] == 3  # where it held
    assert f"SIGINT received: checkpointed at step {stopped['step']} and stopping" in err
    folder = tmp_path / "run" / "checkpoints" / f"step_{stopped['step']:08d}"
    assert json.loads((folder / "lverse.json").read_text())["step"] == stopped["step"]
    assert max(metrics(tmp_path / "run")) == stopped["step"]


@pytest.mark.slow
def test_a_sigkill_during_a_background_write_leaves_the_previous_checkpoint_in_use(data, tmp_path):
    """Checkpoints are copied off and written while training goes on; killed mid-write, the run
    leaves a folder without its marker, which the restart removes, resuming from the last
    complete one: the steps logged before the kill and again after it have equal losses."""
    wide = {"preset": "debug", "overrides": {"text_len": 24, "n_embd": 256, "n_layer": 4}}  # ~50 MB a checkpoint
    cfg = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=12, checkpoint_every=1,
                       keep_checkpoints=2, log_every=1, export=False, model=wide)
    lverse = [sys.executable, "-m", "lverse.cli", "train", "--config", cfg]
    proc = subprocess.Popen(lverse, stderr=subprocess.PIPE, text=True, start_new_session=True)
    checkpoints = tmp_path / "run" / "checkpoints"
    in_flight = None
    deadline = time.time() + 240
    while in_flight is None and proc.poll() is None and time.time() < deadline:
        complete = {p.parent for p in checkpoints.glob("step_*/lverse.json")}
        for tmp in checkpoints.glob("step_*/*.tmp"):
            if complete and tmp.parent not in complete:
                os.killpg(proc.pid, signal.SIGKILL)
                in_flight = tmp.parent
                break
    proc.wait()
    assert in_flight is not None, "no write in flight was caught: " + proc.stderr.read()[-2000:]
    assert not (in_flight / "lverse.json").exists()
    last = max(int(p.parent.name.removeprefix("step_")) for p in checkpoints.glob("step_*/lverse.json"))
    before = metrics(tmp_path / "run")
    out = subprocess.run(lverse, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"removing {in_flight}: a partial checkpoint" in out.stderr
    assert f"resumed from {checkpoints / f'step_{last:08d}'} at step {last}" in out.stderr
    after = metrics(tmp_path / "run")
    assert sorted(after) == list(range(1, 13))
    again = [s for s in before if s > last]
    assert again  # steps the killed run had logged past its last complete checkpoint, logged again
    for step in again:
        assert losses(after[step][0]) == losses(after[step][-1]), step
    figures = [json.loads(line) for line in (tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()]
    assert figures[-1]["checkpoint_step"] == 12 and figures[-1]["checkpoint_mb"] > 10


@pytest.mark.slow
def test_checkpoints_by_minutes(data, tmp_path):
    cfg = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=60, checkpoint_every=1000,
                       checkpoint_every_minutes=0.005, keep_checkpoints=100, export=False)
    subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], check=True, capture_output=True,
                   timeout=300)
    steps = [json.loads(line)["checkpoint_step"]
             for line in (tmp_path / "run" / "checkpoints.jsonl").read_text().splitlines()]
    assert len(steps) >= 3 and steps[-1] == 60 and steps == sorted(set(steps))  # every 0.3 s, and the last
    assert sorted(int(p.parent.name.removeprefix("step_")) for p in
                  (tmp_path / "run" / "checkpoints").glob("step_*/lverse.json")) == steps


# --- output head, compiled blocks --------------------------------------------------------------

def test_a_checkpoint_of_another_head_or_padding_is_refused_and_how_it_computed_is_not_compared():
    """A checkpoint recording another head or another padding (other optimizer shapes) is refused;
    activation checkpointing and the loss chunk (how the numbers are computed) are not recorded."""
    import dataclasses

    from lverse.model.biart import PRESETS
    from lverse.pipeline.train import _model_differences, _model_fields
    bcfg = PRESETS["debug"]
    recorded = _model_fields(bcfg)
    assert "loss_chunk" not in recorded and "activation_checkpointing" not in recorded
    assert _model_differences(recorded, bcfg) == []
    assert _model_differences(recorded, dataclasses.replace(bcfg, loss_chunk=7, activation_checkpointing=True)) == []
    assert _model_differences(recorded, dataclasses.replace(bcfg, pad_vocab_to=64)) == ["pad_vocab_to 1 there, 64 here"]
    assert _model_differences(recorded, dataclasses.replace(bcfg, head="full")) == \
        ["head 'restricted' there, 'full' here"]


@pytest.mark.slow  # 17 s with a warm inductor cache, 2 min cold on 2 busy cores
def test_compiled_blocks_give_the_eager_numbers():
    """``train.compile`` (torch.compile of each block's training forward): the same loss and
    gradients as eager on the CPU within fp32 rounding; generation (KV cache) stays eager."""
    import dataclasses

    from lverse.model.biart import PRESETS, build_sequence, prompt_for
    from lverse.runtime.deepspeed import compile_blocks
    cfg = dataclasses.replace(PRESETS["debug"], n_layer=2, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    eager, compiled = BiART(cfg).train(), BiART(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(compiled)
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(cfg.text_offset, cfg.pad_id + 1, (2, cfg.text_len), generator=g)
    image = torch.randint(cfg.image_vocab, (2, cfg.image_len), generator=g)
    seq = build_sequence(text, image, Direction.T2I, cfg)
    out = []
    for model in (eager, compiled):
        _, losses = model(seq[:, :-1], Direction.T2I, targets=seq[:, 1:])
        losses["loss"].backward()
        out.append((losses["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in out[0][1].items():
        torch.testing.assert_close(out[1][1][name], grad, rtol=0, atol=1e-4 * grad.abs().max().item(), msg=name)
    prompt = prompt_for(text, Direction.T2I, cfg)
    assert torch.equal(compiled.eval().generate(prompt, Direction.T2I, 4, temperature=0),
                       eager.eval().generate(prompt, Direction.T2I, 4, temperature=0))


@pytest.mark.slow
def test_a_deepspeed_op_that_does_not_build_fails_the_run_on_one_line(tmp_path, data):
    """DeepSpeed builds its communication op for CPU ranks on a run's first start: a build that
    fails (here the compiler answers for its version and compiles nothing; in a chaos hunt, it was
    killed midway) ends the run with status 1 and one line saying what to do, not DeepSpeed's
    traceback."""
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\ncase "$1" in --version|-v|-dumpversion|-dumpfullversion) exec c++ "$@";; esac\n'
                        'exit 1\n')
    compiler.chmod(0o755)
    config = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=2)
    env = dict(os.environ, CXX=str(compiler), TORCH_EXTENSIONS_DIR=str(tmp_path / "extensions"))
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lverse"), "train", "--config", config],
                         capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "Error building extension 'deepspeed_shm_comm'" in last and "run the same command again" in last, last


def test_a_training_run_that_fails_ends_at_once_with_one_line(tmp_path, data):
    """A full disk during a checkpoint, with the DataLoader workers (which ignore SIGTERM) running:
    status 1 within seconds, one line naming the file and what to do, nothing of the run left."""
    room = tmp_path / "room"
    room.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(room)], check=True)
    try:  # a checkpoint of the debug model takes 2.4 MB: the one of step 2 fits, the one of step 4 does not
        config = train_config(tmp_path / "run.yaml", data, room / "run", checkpoint_every=2)
        start = time.time()
        lverse = os.path.join(os.path.dirname(sys.executable), "lverse")
        run = subprocess.Popen([lverse, "train", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
        try:
            out, _ = run.communicate(timeout=180)
        finally:
            if run.poll() is None:  # hung: a failure of the test, and nothing left behind
                kill_tree(run.pid)
        seconds = time.time() - start
    finally:
        subprocess.run(["umount", "-l", str(room)], check=True)
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert run.returncode == 1 and len(errors) == 1, out[-3000:]
    assert "No space left on device writing" in errors[0] and "step_00000004" in errors[0], errors
    assert "run the same command again" in errors[0] and "Traceback" not in out
    print(f"failed run ended {seconds:.1f} s after its start")
    deadline = time.time() + 10
    while processes(session=run.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes(session=run.pid), "a process of the failed run outlived it"


def test_a_rank_that_dies_ends_the_job_within_seconds(data, tmp_path):
    """SIGKILL one of two ranks mid-run: the other fails out of its collective, the launcher ends
    the job with a non-zero status, and no process of the job is left."""
    run = tmp_path / "run"
    job = launch(2, "train", "--config", train_config(tmp_path / "run.yaml", data, run, steps=40, export=False),
                 env={"LVERSE_HOLD_AT_STEP": "3"})
    try:
        deadline = time.time() + 240
        while time.time() < deadline and logged_steps(run) < 3:
            time.sleep(0.05)
        ranks = {int(environ_of(pid)["RANK"]): pid for pid in processes(parent=job.pid)}  # torchrun's children
        os.kill(ranks[1], signal.SIGKILL)
        killed = time.time()
        job.communicate(timeout=120)
        seconds = time.time() - killed
    finally:
        kill_tree(job.pid)
    assert job.returncode != 0
    assert seconds < 30, f"the job ended {seconds:.1f} s after a rank died"
    print(f"job ended {seconds:.1f} s after rank 1 was killed")
    deadline = time.time() + 10
    while processes(session=job.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes(session=job.pid), "a process of the job outlived it"


# --- a failure ends the run at once ---------------------------------------------------------------

def _train_until_it_ends(config, env=None, while_running=None, timeout=120):
    """``lverse train`` in a session of its own, ``while_running(proc)`` once it runs; its status,
    output and the seconds from the end of ``while_running`` (or the start) to its exit. Nothing of
    it may outlive it by more than a few seconds."""
    lverse = os.path.join(os.path.dirname(sys.executable), "lverse")
    run = subprocess.Popen([lverse, "train", "--config", config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True, env={**os.environ, **(env or {})})
    try:
        if while_running is not None:
            while_running(run)
        start = time.time()
        out, _ = run.communicate(timeout=timeout)
        seconds = time.time() - start
    finally:
        if run.poll() is None:  # hung: a failure of the test, and nothing left behind
            kill_tree(run.pid)
    deadline = time.time() + 10
    while processes(session=run.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert not processes(session=run.pid), "a process of the failed run outlived it"
    return run.returncode, out, seconds


def _errors(out: str) -> list[str]:
    return [line for line in out.splitlines() if " ERROR " in line]


@pytest.mark.slow  # a training process and its DataLoader workers
def test_bad_data_a_loader_worker_finds_ends_the_run_with_one_line(tmp_path, data):
    """A token index damaged in place (codes out of range; its sizes are right, so the run starts):
    a DataLoader worker finds it, and the run ends with status 2 and the worker's one line, not its
    traceback."""
    tokens = tmp_path / "tokens"
    shutil.copytree(data["tokens"], tokens)
    subprocess.run([sys.executable, "-m", "lverse.cli", "index", "--tokens", str(tokens)], check=True,
                   capture_output=True, timeout=120)
    codes = np.memmap(tokens / "_index" / "codes.u16", dtype="<u2", mode="r+")
    codes[5] = 65535
    codes.flush()
    del codes
    config = train_config(tmp_path / "run.yaml", {**data, "tokens": str(tokens)}, tmp_path / "run")
    code, out, _ = _train_until_it_ends(config)
    assert code == 2 and len(_errors(out)) == 1, out[-3000:]
    assert "64 codes from 0 up to 65535, but the model takes 64 codes from 0 below 512" in _errors(out)[0]
    assert "Traceback" not in out


def _kill_a_loader_worker(run, run_dir):
    deadline = time.time() + 120
    while logged_steps(run_dir) < 3:
        assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
        time.sleep(0.05)
    workers = processes(parent=run.pid)  # the training process's children: its DataLoader workers
    assert len(workers) == 2, workers
    os.kill(workers[0], signal.SIGKILL)


@pytest.mark.slow  # a training process and its DataLoader workers
def test_a_loader_worker_that_dies_ends_the_run_with_one_line(tmp_path, data):
    """A DataLoader worker SIGKILLed (as the OOM killer kills) while the run waits at step 3:
    status 1 within seconds, one line naming the worker and what to do."""
    config = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=20, export=False)
    code, out, seconds = _train_until_it_ends(config, {"LVERSE_HOLD_AT_STEP": "3"},
                                              lambda run: _kill_a_loader_worker(run, tmp_path / "run"))
    assert code == 1 and len(_errors(out)) == 1, out[-3000:]
    assert "is killed by signal: Killed: a data loading process died" in _errors(out)[0]
    assert "run the same command again" in _errors(out)[0] and "Traceback" not in out
    assert seconds < 10, f"the run ended {seconds:.1f} s after its DataLoader worker died"


@pytest.mark.slow  # a training process and its DataLoader workers
def test_a_step_that_raises_ends_the_run_at_once(tmp_path, data):
    """A micro-step that raises (LVERSE_TEST_RAISE_AT_MICRO_STEP) with the DataLoader workers
    running: status 1 within seconds of the start, the error's traceback (a bug's), its line last."""
    config = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=20, export=False)
    code, out, seconds = _train_until_it_ends(config, {"LVERSE_TEST_RAISE_AT_MICRO_STEP": "3"})
    assert code == 1, out[-3000:]
    assert out.rstrip().splitlines()[-1] == \
        "RuntimeError: micro-step 3 failed: raised by LVERSE_TEST_RAISE_AT_MICRO_STEP", out[-3000:]
    assert "step 2 |" in out and "step 3 |" not in out
    print(f"failed run ended {seconds:.1f} s after its start")
