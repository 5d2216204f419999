"""BiART at ZeRO stage 0 (plain data parallel through DeepSpeed: ``ds_configs/ddp_bf16.json``,
``ddp_fp32.json``): training, resuming on the same and on another number of ranks (one file holds
the whole state, no universal checkpoint), export of the fp32 masters, and resumes across stage 0
and ZeRO refused with the field named. The token shards are tests/test_train.py's ``data``
fixture; multi-rank runs go through torchrun.
"""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml

from lverse.core.errors import InputError
from lverse.model import BiART
from lverse.model.biart import BiARTConfig
from lverse.model.checkpoint import load_model
from lverse.pipeline.configs import TrainConfig
from lverse.pipeline.train import ds_config
from lverse.runtime.deepspeed import deepspeed_loads, layout_difference

from .test_train import losses, metrics, run_job, train_config


def test_stage_0_and_zero_checkpoints_do_not_resume_into_each_other():
    """Stage 0 keeps the optimizer in ``mp_rank_00_model_states.pt``, ZeRO in ``*_optim_states.pt``:
    a resume across them, or across precisions at stage 0, is refused naming the field; ZeRO-1 and
    ZeRO-2 (the same files) pass."""
    ddp, ddp32, zero1, zero2 = (ds_config(TrainConfig(deepspeed=name), 2)
                                for name in ("ddp_bf16", "ddp_fp32", "zero1_bf16", "zero2_bf16"))
    stage0 = {"zero_stage": 0, "precision": "bf16"}
    assert "zero_optimization.stage is 2" in layout_difference(stage0, zero2)
    assert "trained at ZeRO stage 1, this run's zero_optimization.stage is 0" in \
        layout_difference({"zero_stage": 1, "precision": "bf16"}, ddp)
    assert "bf16.enabled" in layout_difference(stage0, ddp32)
    assert layout_difference(stage0, ddp) is None
    assert layout_difference({"zero_stage": 1, "precision": "bf16"}, zero2) is None


def test_the_stage_must_be_said(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text('{"bf16": {"enabled": true}}')
    with pytest.raises(InputError, match="zero_optimization.stage is not set .*0 for plain data parallel"):
        ds_config(TrainConfig(deepspeed=str(path)), 1)


def _module_and_masters(folder):
    with deepspeed_loads(str(folder)):
        return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_two_rank_ddp_bf16_trains_resumes_and_exports_its_fp32_masters(data, tmp_path):  # noqa: F811
    """2 ranks at stage 0, bf16: one file a checkpoint; a restart from the step-2 checkpoint logs
    the losses of steps 3-4 again exactly and exports the same bytes; the export holds the fp32
    masters (the trained bf16 weights are their rounding, and they are finer than bf16); a ZeRO-2
    ds_config on this run is refused before any work."""
    run = tmp_path / "run"
    cfg = train_config(tmp_path / "run.yaml", data, run, steps=4, checkpoint_every=2, deepspeed="ddp_bf16")
    out = run_job(2, "train", "--config", cfg)
    assert "zero_stage: 0 (plain data parallel" in out
    step = run / "checkpoints" / "step_00000004"
    assert sorted(os.listdir(step)) == ["lverse.json", "mp_rank_00_model_states.pt"]
    exported = load_model(str(run / "biart.safetensors"), BiART, BiARTConfig).state_dict()
    module = _module_and_masters(step)["module"]
    finer = 0
    for name, w in exported.items():
        assert w.dtype == torch.float32 and torch.equal(w.to(torch.bfloat16), module[name]), name
        finer += int(not torch.equal(w, module[name].float()))
    assert finer > len(exported) // 2, "the export holds the bf16 weights, not the fp32 masters"

    again = tmp_path / "again"
    shutil.copytree(run, again, ignore=shutil.ignore_patterns("step_00000004", "biart.safetensors"))
    with open(cfg) as f:
        config = yaml.safe_load(f)
    config["run_dir"] = str(again)
    with open(tmp_path / "again.yaml", "w") as f:
        yaml.safe_dump(config, f)
    out = run_job(2, "train", "--config", str(tmp_path / "again.yaml"))
    assert "resumed from" in out and "universal" not in out
    first, second = metrics(run), metrics(again)
    for s in (3, 4):
        assert losses(second[s][-1]) == losses(first[s][0]), s
    assert (again / "biart.safetensors").read_bytes() == (run / "biart.safetensors").read_bytes()

    proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg, "--deepspeed", "zero2_bf16",
                           "--steps", "6"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "was trained at ZeRO stage 0, this run's zero_optimization.stage is 2" in proc.stderr


@pytest.mark.slow
def test_a_two_rank_ddp_run_resumed_on_one_rank_logs_the_same_losses(data, tmp_path):  # noqa: F811
    """Stage 0, fp32: a 2-rank run checkpointed at step 4 and resumed on 1 rank with the
    micro-batch doubled (the same samples per step) logs the losses of the 2-rank run that went
    on, within 1e-4, loading its one file directly (no universal checkpoint). What would differ for
    other reasons is held equal as in test_data_order.py's ZeRO-2 twin: fp32, no dropout, captions
    longer than text_len."""
    over = dict(steps=8, checkpoint_every=4, export=False, deepspeed="ddp_fp32",
                model={"preset": "debug", "overrides": {"text_len": 12, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
                                                         "attn_pdrop": 0.0}},
                optim={"schedule": "constant"})
    run_job(2, "train", "--config", train_config(tmp_path / "full.yaml", data, tmp_path / "full", **over))
    run_job(2, "train", "--config", train_config(tmp_path / "a.yaml", data, tmp_path / "part", **{**over, "steps": 4}))
    out = run_job(1, "train", "--config", train_config(tmp_path / "b.yaml", data, tmp_path / "part", **over,
                                                       micro_batch_size=8))
    assert "stage 0 holds the whole state in one file" in out and "converting" not in out
    assert not (tmp_path / "part" / "universal").exists()
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert sorted(full) == sorted(part) == list(range(1, 9))
    worst = max(abs(losses(full[s][0])[k] - v) for s in range(5, 9) for k, v in losses(part[s][-1]).items())
    print(f"largest loss difference after the resume: {worst:.2e}")
    assert worst <= 1e-4
