"""The learning-rate rules of the training core (runtime/trainer.py): the paper's plateau rule, and
that a run resumed from a checkpoint in the middle of a judged interval halves where an
uninterrupted one does."""

import shutil

import pytest
import torch

from lverse.core.errors import InputError
from lverse.pipeline.configs import OptimConfig, TrainConfig
from lverse.runtime.trainer import Plateau, Schedule

from .test_train import metrics, run_job, train_config, vae_config

# Interval means 3.5, 2, 2, 2, 1, 1, 1, 1, 1: with patience 2 and a 10% threshold the rule halves
# after the fourth and the seventh interval, then stays at its floor of a quarter.
LOSSES = [4, 3] + [2, 2] * 3 + [1, 1] * 5
SCALES = [1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25]


def judged(losses, cut=None):
    """The rule's scale after each interval of 2 steps; with ``cut``, rebuilt from its checkpoint
    state before the ``cut``-th step (1-based)."""
    rule, scales = Plateau(2, 2, 0.1, 0.25, torch.device("cpu")), []
    for j, loss in enumerate(losses, 1):
        if j == cut:
            state = rule.state(1)
            rule = Plateau(2, 2, 0.1, 0.25, torch.device("cpu"))
            rule.load(state, rank=0)
        rule.add(torch.tensor(loss, dtype=torch.float32), j, 1)
        if j % 2 == 0:
            scales.append(rule.scale)
    return scales


def test_the_plateau_rule_halves_after_patience_intervals_without_improvement_down_to_its_floor():
    assert judged(LOSSES[:18]) == SCALES
    for cut in (2, 3, 7, 8, 13):  # inside an interval (odd) and at its start
        assert judged(LOSSES[:18], cut) == SCALES, cut


def test_the_schedule_follows_the_rule_after_warmup():
    schedule = Schedule("plateau", warmup_steps=4, min_lr_ratio=0.25)
    assert schedule.lr_at(1, 100, 1.0, plateau_scale=0.5) == 0.5  # warmup: (1 + 1) / 4 of the peak
    assert schedule.lr_at(10, 100, 2.0, plateau_scale=0.5) == 1.0
    with pytest.raises(InputError, match="'constant', 'cosine' or 'plateau'"):
        Schedule("step")
    with pytest.raises(InputError, match="patience"):
        Plateau(2, 0, 0.1, 0.25, torch.device("cpu"))
    with pytest.raises(InputError, match="log_every must be even"):  # BiART's directions alternate
        TrainConfig(log_every=5, optim=OptimConfig(schedule="plateau"))


@pytest.mark.slow
def test_an_augvae_run_resumed_inside_an_interval_halves_where_an_uninterrupted_one_does(data, tmp_path):  # noqa: F811
    """8 ML steps judged every 2 (patience 1, threshold 0.5: every interval whose mean loss is not
    below half the best halves the lr), checkpoints every 3: the run resumed from step 3, inside the
    second interval, logs the uninterrupted run's learning rates and losses."""
    cfg = vae_config(tmp_path / "vae.yaml", data, tmp_path / "run", ml_steps=8, sl_steps=0, log_every=2,
                     checkpoint_every=3, schedule="plateau", patience=1, plateau_threshold=0.5, min_lr_ratio=0.01,
                     perceptual_weight=0.0)  # the rule reads the loss, whatever its terms
    run_job(1, "train-vae", "--config", cfg)
    full = metrics(tmp_path / "run")
    lrs = [full[step][0]["lr"] for step in sorted(full)]
    assert lrs[0] == 1e-3 and min(lrs) < 1e-3, lrs  # the rule acted
    for step in (6, 8):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    (tmp_path / "run" / "augvae-ml.safetensors").unlink()
    run_job(1, "train-vae", "--config", cfg)
    resumed = metrics(tmp_path / "run")
    assert sorted(resumed) == [4, 6, 8]  # step 4's logged loss is the mean of step 4 alone here
    assert [resumed[step][0]["lr"] for step in (4, 6, 8)] == [full[step][0]["lr"] for step in (4, 6, 8)]
    assert [resumed[step][0]["loss"] for step in (6, 8)] == [full[step][0]["loss"] for step in (6, 8)]


@pytest.mark.slow
def test_a_two_rank_biart_run_resumed_inside_an_interval_halves_where_an_uninterrupted_one_does(data, tmp_path):  # noqa: F811
    """BiART on 2 ranks, 8 steps (2 of warmup) judged every 2 (patience 1, threshold 0.5),
    checkpoints every 3: resumed from step 3, inside the first judged interval, the run logs the
    uninterrupted run's learning rates and (from the first whole log interval on) losses."""
    cfg = train_config(tmp_path / "t.yaml", data, tmp_path / "run", log_every=2, checkpoint_every=3,
                       deepspeed="zero2_fp32", optim={"schedule": "plateau", "patience": 1,
                                                      "plateau_threshold": 0.5, "min_lr_ratio": 0.01})
    run_job(2, "train", "--config", cfg)
    full = metrics(tmp_path / "run")
    lrs = [full[step][0]["lr"] for step in sorted(full)]
    assert max(lrs) == 3e-3 and lrs[-1] < 3e-3, lrs  # the rule acted
    for step in (6, 8):
        shutil.rmtree(tmp_path / "run" / "checkpoints" / f"step_{step:08d}")
    (tmp_path / "run" / "metrics.jsonl").unlink()
    run_job(2, "train", "--config", cfg)
    resumed = metrics(tmp_path / "run")
    assert sorted(resumed) == [4, 6, 8]
    assert [resumed[step][0]["lr"] for step in (4, 6, 8)] == [full[step][0]["lr"] for step in (4, 6, 8)]
    for step in (6, 8):
        for key in ("t2i/loss", "i2t/loss"):
            assert resumed[step][0][key] == full[step][0][key], (step, key)
