"""BiART's global data order (runtime/data.py) over the token index (runtime/token_index.py).

The token shards are real: ``run_encode`` output of tests/test_train.py's ``data`` fixture (4
shards of 16 samples). The order is checked at the data layer, from the loaders themselves
(``GlobalBatches``, and ``data_loader`` of pipeline/train.py on a planned run of each rank), and
once through real training: a 2-rank run resumed on 1 rank logs the losses of one that was not.
"""

import copy
import glob
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch

from lverse.cli import main
from lverse.core.errors import InputError
from lverse.core.shards import file_sha256, iter_samples
from lverse.pipeline.encode import EncodeConfig, run_encode
from lverse.pipeline.train import DataConfig, TrainConfig, data_loader, plan_run
from lverse.runtime.data import GlobalBatches, GlobalOrder, TokenBatch
from lverse.runtime.token_index import TokenIndex, TokenSamples, build_index, ensure_index, open_samples
from lverse.runtime.trainer import Checkpoint, Process

from .test_train import PER_SHARD, SHARDS, data, losses, metrics, run_job, train_config  # noqa: F401  (the token-shard fixture)

N = SHARDS * PER_SHARD


def shards_of(folder):
    return sorted(glob.glob(os.path.join(folder, "*.tar")))


@pytest.fixture(scope="module")
def samples(data):  # noqa: F811
    """The fixture's shards through their index (built here when missing, as training does)."""
    return ensure_index(shards_of(data["tokens"]), file_sha256(data["vae"]))


@pytest.fixture
def tokens(data, tmp_path):  # noqa: F811
    """A copy of the token shards (mtimes kept, no index) that a test may change."""
    folder = tmp_path / "tokens"
    shutil.copytree(data["tokens"], folder, ignore=shutil.ignore_patterns("_index", ".*"))
    return str(folder)


def keys_of(samples, rngs):
    return [s["__key__"] for s in samples]


# --- the index --------------------------------------------------------------------------------

def test_the_index_holds_every_sample_of_the_shards(tokens, capsys):
    summary = build_index(tokens, progress=False, workers=2)  # shards read by 2 processes
    index = TokenIndex(os.path.join(tokens, "_index"))
    assert summary["samples"] == len(index) == N and index.meta["image_len"] == 64
    assert os.path.getsize(os.path.join(tokens, "_index", "codes.u16")) == 2 * 64 * N
    row = 0
    for shard in shards_of(tokens):
        for sample in iter_samples(shard):
            got = index.sample(row)
            assert got["__key__"] == sample["__key__"] and got["txt"] == sample["txt"]
            assert np.array_equal(got["codes"], np.load(io.BytesIO(sample["codes.npy"])))
            row += 1
    # a subset of the folder's shards (data.shards as a glob or range) is read from the same index
    subset = TokenSamples(index, shards_of(tokens)[1::2])
    expected = [s["__key__"] for shard in shards_of(tokens)[1::2] for s in iter_samples(shard)]
    assert [subset[i]["__key__"] for i in range(len(subset))] == expected
    # the command leaves an index that matches the shards as it is
    assert main(["index", "--tokens", tokens, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["up_to_date"] is True


def test_a_stale_index_is_refused_until_it_is_rebuilt(tokens, data, capsys):  # noqa: F811
    vae_hash, named = file_sha256(data["vae"]), shards_of(tokens)
    ensure_index(named, vae_hash)  # none there: built
    os.remove(os.path.join(tokens, "00001_stats.json"))  # shard 1 encoded again
    run_encode(EncodeConfig(shards=os.path.join(data["raw"], "00001.tar"), vae=data["vae"], output=tokens))
    with pytest.raises(InputError, match=r"no longer matches the shards: 00001.* `lverse index --tokens "):
        ensure_index(named, vae_hash)  # training builds only a missing index; a stale one is refused
    assert main(["index", "--tokens", tokens, "--quiet"]) == 0
    assert "up_to_date" not in json.loads(capsys.readouterr().out)
    assert len(ensure_index(named, vae_hash)) == N
    shutil.copy(os.path.join(tokens, "00000.tar"), os.path.join(tokens, "00004.tar"))  # a shard added
    shutil.copy(os.path.join(tokens, "00000_stats.json"), os.path.join(tokens, "00004_stats.json"))
    with pytest.raises(InputError, match="00004.tar is not in it"):
        open_samples(shards_of(tokens), vae_hash)
    assert len(open_samples(named, vae_hash)) == N  # the shards it holds unchanged are still served
    with pytest.raises(InputError, match="of another AugVAE"):
        open_samples(named, "0" * 64)
    build_index(tokens, progress=False)
    assert len(open_samples(shards_of(tokens), vae_hash)) == N + PER_SHARD


# --- the order --------------------------------------------------------------------------------

def global_batches(samples, world, workers, steps, resampled=False):
    """Micro-steps 0..steps-1 of ``world`` ranks with W*B = 8, each as one list of keys (rank 0's
    slice first)."""
    per_rank = []
    for rank in range(world):
        ds = GlobalBatches(samples, GlobalOrder(len(samples), 0, resampled), keys_of, 8 // world, rank, world, workers)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers))
        per_rank.append([next(it) for _ in range(steps)])
    return [[key for rank in range(world) for key in per_rank[rank][g]] for g in range(steps)]


@pytest.mark.parametrize("resampled", [False, True], ids=["epochs", "resampled"])
def test_global_batch_g_holds_the_same_samples_whatever_the_ranks_and_workers(samples, resampled):
    reference = global_batches(samples, 1, 0, 12, resampled)  # 96 samples: into the second epoch
    for world in (1, 2, 4):
        for workers in (0, 1, 2):
            assert global_batches(samples, world, workers, 12, resampled) == reference, (world, workers)


def test_an_epoch_sees_every_sample_once(samples):
    every = sorted(samples[i]["__key__"] for i in range(N))
    keys = [samples[i]["__key__"] for _, i in GlobalOrder(N, 0).at(range(2 * N))]
    assert sorted(keys[:N]) == sorted(keys[N:]) == every
    assert keys[:N] != keys[N:]  # each epoch its own permutation
    assert [k for _, k in GlobalOrder(N, 1).at(range(N))] != [k for _, k in GlobalOrder(N, 0).at(range(N))]
    drawn = GlobalOrder(N, 0, resampled=True).epoch(0)  # resampled: N draws with replacement
    assert len(drawn) == N and len(set(drawn.tolist())) < N


def test_more_ranks_times_workers_than_shards(samples):
    """8 ranks x 2 workers read 4 shards: one epoch (4 micro-steps of 8 x 2) is every sample once."""
    seen = []
    for rank in range(8):
        ds = GlobalBatches(samples, GlobalOrder(N, 0), keys_of, 2, rank, 8, 2)
        it = iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2))
        seen += [key for _ in range(4) for key in next(it)]
    assert sorted(seen) == sorted(samples[i]["__key__"] for i in range(N))


class KeyedTokenBatch(TokenBatch):
    """TokenBatch that also says which samples it made the batch of."""

    def __call__(self, samples, rngs):
        return {**super().__call__(samples, rngs), "keys": [s["__key__"] for s in samples]}


def consume(paths, world, micro_batch, start, end, resume=None, grad_accum=1, workers=2):
    """What ``world`` ranks' data_loader gives for steps start..end-1, as one list of
    (key, direction, caption ids) in the order of the global batches, and the checkpoint its run
    would write at ``end``."""
    cfg = TrainConfig(micro_batch_size=micro_batch, grad_accum=grad_accum, deepspeed="zero2_fp32",
                      data=DataConfig(shards=paths["tokens"], tokenizer=paths["tokenizer"], vae=paths["vae"],
                                      workers=workers))
    cfg.model.overrides = {"text_len": 24}
    runs = [plan_run(cfg, Process(rank, world, rank, torch.device("cpu"))) for rank in range(world)]
    loaders = [data_loader(run, start, resume) for run in runs]
    consumed = []
    for step in range(start, end):
        for _ in range(grad_accum):
            for loader in loaders:
                batch = next(loader)
                consumed += [(key, step % 2, tuple(text.tolist())) for key, text in zip(batch["keys"], batch["text"])]
    meta = {"data": copy.deepcopy(runs[0].data_key), "samples": end * runs[0].global_batch, "step": end}
    return consumed, Checkpoint(end, "", meta)


def test_a_run_resumed_2_1_4_ranks_consumes_what_an_uninterrupted_one_does(data, samples, monkeypatch):  # noqa: F811
    """(key, direction, caption pieces with BPE-dropout) of every sample consumed, through
    data_loader: 2 ranks to step 4, 1 rank (micro-batch doubled) to 8, 4 ranks (halved) to 12,
    against 2 ranks throughout; then with other global batches: the samples continue exactly."""
    import lverse.runtime.data
    monkeypatch.setattr(lverse.runtime.data, "TokenBatch", KeyedTokenBatch)
    full, _ = consume(data, 2, 4, 0, 12)
    assert len(full) == 96 and len({k for k, _, _ in full[:N]}) == N
    part, checkpoint = consume(data, 2, 4, 0, 4)
    more, checkpoint = consume(data, 1, 8, 4, 8, checkpoint)
    rest, _ = consume(data, 4, 2, 8, 12, checkpoint, workers=0)
    assert part + more + rest == full
    # global batch 8 -> 10 (1 rank, 5 x 2 micro-steps) -> 8: each sample follows the last consumed
    part, checkpoint = consume(data, 2, 4, 0, 3)
    more, checkpoint = consume(data, 1, 5, 3, 6, checkpoint, grad_accum=2)
    assert checkpoint.meta["data"]["origin"] == [3, 24]
    rest, _ = consume(data, 4, 2, 6, 8, checkpoint, workers=1)
    assert [(k, t) for k, _, t in part + more + rest] == [(k, t) for k, _, t in full[:24 + 30 + 16]]


# --- through training -------------------------------------------------------------------------

@pytest.mark.slow
def test_a_two_rank_run_resumed_on_one_rank_logs_the_same_losses(data, tmp_path):  # noqa: F811
    """Universal checkpoint, lr 3e-3: a 2-rank run checkpointed at step 4 and resumed on 1 rank
    with the micro-batch doubled (the same global batch, so the same samples per step) logs the
    losses of the 2-rank run that went on, within 1e-4 (measured: 1e-6). That needs the Adam
    moments carried over: with them zeroed after the load the losses of steps 6-8 differ by up to
    1.8 (measured). What would differ for other reasons is held equal: fp32 (bf16 rounds the two
    layouts' sums differently); no dropout (its masks are drawn per rank); text_len 12, shorter
    than every caption, so no caption is padded: a rank's loss is the mean over its own text
    tokens, and with padding the mean of two ranks' means is not the mean over all 8 samples
    (1.9e-3 apart on this data with text_len 24), a property of the loss, not of the data order."""
    over = dict(steps=8, checkpoint_every=4, export=False, deepspeed="zero2_fp32",
                model={"preset": "debug", "overrides": {"text_len": 12, "embd_pdrop": 0.0, "resid_pdrop": 0.0,
                                                         "attn_pdrop": 0.0}},
                optim={"schedule": "constant"})  # the lr of a step does not depend on cfg.steps
    run_job(2, "train", "--config", train_config(tmp_path / "full.yaml", data, tmp_path / "full", **over))
    run_job(2, "train", "--config", train_config(tmp_path / "a.yaml", data, tmp_path / "part", **{**over, "steps": 4}))
    out = run_job(1, "train", "--config", train_config(tmp_path / "b.yaml", data, tmp_path / "part", **over,
                                                       micro_batch_size=8))
    assert "converting to a universal checkpoint" in out and "resumed from" in out
    full, part = metrics(tmp_path / "full"), metrics(tmp_path / "part")
    assert sorted(full) == sorted(part) == list(range(1, 9))
    worst = 0.0
    for step in range(5, 9):
        a, b = losses(full[step][0]), losses(part[step][-1])
        assert a.keys() == b.keys()
        worst = max(worst, *(abs(a[k] - b[k]) for k in a))
    print(f"largest loss difference after the resume: {worst:.2e}")
    assert worst <= 1e-4
