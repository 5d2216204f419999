import argparse
import dataclasses
import os
import pickle
import re
import subprocess

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lverse.model.augvae import PRESETS, AugVAE, ml_to_sl
from lverse.model.losses import ReconstructionLoss
from lverse.model.quantizer import codebook_usage

from .conftest import free_port, reference_manifest


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


@pytest.mark.parametrize("preset", ["debug-ml", "debug-sl"])
def test_every_parameter_gets_a_gradient(preset):
    vae = AugVAE(PRESETS[preset]).train()
    loss_fn = ReconstructionLoss(perceptual_weight=0.1)
    x = images()
    recon, commit, idx = vae(x)
    assert recon.shape == x.shape and idx.shape == (2, vae.cfg.num_tokens)
    out = loss_fn(recon, x, commit)
    out["loss"].backward()
    assert all(torch.isfinite(v) for v in out.values())
    for name, p in vae.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    assert not any(p.requires_grad for p in loss_fn.parameters()), "LPIPS must stay frozen"
    loss_fn.train()
    assert not loss_fn.lpips.training, "LPIPS must stay in eval mode"


@pytest.mark.parametrize("preset", ["debug-ml", "debug-sl"])
def test_decode_of_encode_equals_forward_reconstruction(preset):
    vae = AugVAE(PRESETS[preset]).eval()
    x = images()
    tokens = vae.encode(x)
    assert tokens.dtype == torch.long and tokens.shape == (2, vae.cfg.num_tokens)
    assert tokens.min() >= 0 and tokens.max() < vae.cfg.codebook_size
    with torch.no_grad():
        recon, _, idx = vae(x)
    assert torch.equal(idx, tokens)
    assert torch.equal(vae.decode(tokens), recon)
    with pytest.raises(ValueError, match="tokens per image"):
        vae.decode(tokens[:, :-1])


def test_encode_is_fp32_under_autocast():
    vae = AugVAE(PRESETS["debug-sl"]).eval()
    x = images()
    expected = vae.encode(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(vae.encode(x.bfloat16()), vae.encode(x.bfloat16().float()))
        assert torch.equal(vae.encode(x), expected)
    with pytest.raises(TypeError, match="FP32"):
        vae.bfloat16().encode(x)


def test_eval_mode_leaves_the_codebook_alone_and_training_updates_it():
    vae = AugVAE(PRESETS["debug-sl"])
    before = vae.codebook.embed.clone()
    with torch.no_grad():
        vae.eval()(images())
    assert torch.equal(vae.codebook.embed, before)
    vae.train()(images())
    assert not torch.equal(vae.codebook.embed, before)


def test_ml_to_sl_keeps_the_level_one_tokens():
    ml = AugVAE(PRESETS["debug-ml"]).eval()
    sl = ml_to_sl(ml).eval()
    assert sl.cfg.variant == "sl" and sl.cfg.num_tokens == 64 and len(sl.encoders) == 2
    x = images()
    first = ml.cfg.level_sizes[0] ** 2
    assert torch.equal(sl.encode(x), ml.encode(x)[:, first:first + 64])
    assert torch.equal(sl.post_quant.bias[0], ml.post_quant.bias[0])
    assert sl.decode(sl.encode(x)).shape == x.shape
    with pytest.raises(ValueError):
        ml_to_sl(sl)


def test_codebook_usage_counts_without_one_hot():
    perplexity, dead = codebook_usage(torch.tensor([0, 1, 2, 3]), 8)
    assert perplexity == pytest.approx(4.0) and dead == 4


# -- official checkpoints -------------------------------------------------------------------

_SHARED = re.compile(r"(pre_quants|post_quants)\.\d+\.weight|quantizers\.\d+\.embedding\.(\w+)")


def official_state_dict(manifest):
    """Random weights in the official key layout; the shared tensors equal across levels."""
    shared, out = {}, {}
    for key, shape in manifest.items():
        m = _SHARED.fullmatch(key)
        family = re.sub(r"\.\d+\.", ".*.", key, count=1) if m else None
        if family and family in shared:
            out[key] = shared[family].clone()
            continue
        out[key] = torch.rand(shape) * 10 + 0.1 if key.endswith("cluster_size") else torch.randn(shape) * 0.05
        if family:
            shared[family] = out[key]
    return out


class Payload:
    """Would run a command if unpickled with pickle's full power."""

    def __init__(self, run, path):
        self.run, self.path = run, path

    def __reduce__(self):
        if self.run is os.system:
            return (os.system, (f"touch {self.path}",))
        return (self.run, (["touch", str(self.path)],))


def save_lightning(path, state, extra=None):
    torch.save({"state_dict": state, "epoch": 3,
                "hyper_parameters": {"args": argparse.Namespace(num_tokens=8192), **(extra or {})}}, path)


@pytest.mark.parametrize("variant", ["sl", "ml"])
def test_official_checkpoint_layout_loads(tmp_path, variant):
    state = official_state_dict(reference_manifest(f"augvae_{variant}_keys.json"))
    state["loss.perceptual.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)  # ignored
    canary = tmp_path / "pwned"
    path = tmp_path / "official.ckpt"
    save_lightning(path, state, {"callback": Payload(subprocess.call, canary)})
    vae = AugVAE.from_official_checkpoint(str(path))
    assert not canary.exists(), "loading a checkpoint must never run code from it"
    assert vae.cfg.variant == variant
    sd = vae.state_dict()
    assert torch.equal(sd["encoders.1.conv_out.weight"], state["encoders.1.conv_out.weight"])
    assert torch.equal(sd["codebook.embed"], state["quantizers.0.embedding.weight"])
    assert torch.equal(sd["pre_quant.weight"], state["pre_quants.2.weight"])
    if variant == "sl":  # the official SL bias detail: indices via level 1, decoding via level 0
        assert torch.equal(sd["pre_quant.bias"][0], state["pre_quants.1.bias"])
        assert torch.equal(sd["post_quant.bias"][0], state["post_quants.0.bias"])
        assert torch.equal(sd["connectors.1.weight"], state["connectors.1.weight"])
    else:
        for i in range(4):
            assert torch.equal(sd["pre_quant.bias"][i], state[f"pre_quants.{i}.bias"])
            assert torch.equal(sd["post_quant.bias"][i], state[f"post_quants.{i}.bias"])


def test_checkpoint_naming_os_functions_is_refused_unrun(tmp_path):
    canary = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    save_lightning(path, {"w": torch.zeros(1)}, {"x": Payload(os.system, canary)})
    with pytest.raises(ValueError, match="refused by the safe loader"):
        AugVAE.from_official_checkpoint(str(path))
    assert not canary.exists()


def test_mismatched_official_checkpoint_is_refused(tmp_path):
    state = official_state_dict(reference_manifest("augvae_sl_keys.json"))
    del state["decoders.0.conv_in.bias"]
    state["encoders.0.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.ckpt"
    save_lightning(path, state)
    with pytest.raises(ValueError) as e:
        AugVAE.from_official_checkpoint(str(path))
    assert "missing keys decoders.0.conv_in.bias" in str(e.value)
    assert "unexpected keys encoders.0.extra.weight" in str(e.value)


def test_official_checkpoint_with_untied_shared_weights_is_refused(tmp_path):
    state = official_state_dict(reference_manifest("augvae_sl_keys.json"))
    state["post_quants.2.weight"] = state["post_quants.2.weight"] + 1
    path = tmp_path / "untied.ckpt"
    save_lightning(path, state)
    with pytest.raises(ValueError, match=r"post_quants\.\*\.weight differ"):
        AugVAE.from_official_checkpoint(str(path))


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "notes.ckpt"
    path.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        AugVAE.from_official_checkpoint(str(path))


# -- the EMA codebook across data-parallel ranks ---------------------------------------------

EMA_CASES = {"data-init": dict(codebook_data_init=True), "no-init": dict(codebook_data_init=False),
             "restart": dict(codebook_data_init=True, codebook_restart=1.0)}


def _ema_worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, change in EMA_CASES.items():
        # With data init or restarts, ranks draw different random numbers: only the broadcast can
        # make their codebooks agree. The weights start equal as they would under DDP: from rank 0.
        random_draws = change["codebook_data_init"]
        torch.manual_seed(rank if random_draws else 0)
        vae = AugVAE(dataclasses.replace(PRESETS["debug-sl"], **change)).train()
        if random_draws:
            for p in vae.parameters():
                dist.broadcast(p.data, src=0)
        for step in range(3):  # different data on every rank
            vae(images(n=2, seed=100 * rank + step))
        torch.save(vae.codebook.state_dict(), os.path.join(out_dir, f"rank{rank}-{name}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_keep_identical_codebooks(tmp_path):
    mp.start_processes(_ema_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    for name in EMA_CASES:
        a, b = (torch.load(tmp_path / f"rank{r}-{name}.pt", weights_only=True) for r in range(2))
        for key in a:
            assert torch.equal(a[key], b[key]), f"codebook {key} differs between ranks ({name})"
    a = torch.load(tmp_path / "rank0-no-init.pt", weights_only=True)
    # Two ranks must update exactly as one process that sees both ranks' images (GroupNorm is
    # per sample, so features do not depend on the batch): one EMA step from the union.
    torch.manual_seed(0)
    union = AugVAE(dataclasses.replace(PRESETS["debug-sl"], codebook_data_init=False)).train()
    for step in range(3):
        union(torch.cat([images(n=2, seed=step), images(n=2, seed=100 + step)]))
    for key, value in union.codebook.state_dict().items():
        torch.testing.assert_close(a[key], value, rtol=1e-5, atol=1e-6)
    assert a["cluster_size"].sum() > 0


def test_first_training_step_sets_the_codebook_from_features():
    vae = AugVAE(PRESETS["debug-sl"]).train()
    assert not vae.codebook.initialized
    x = images(n=4)
    with torch.no_grad():
        feats = vae.quantized_features(x)[0].permute(0, 2, 3, 1).reshape(-1, vae.cfg.codebook_dim)
    vae(x)
    assert vae.codebook.initialized
    is_feature = (vae.codebook.embed[:, None, :] == feats[None]).all(dim=-1).any(dim=1)
    assert is_feature.all(), "every code is one of the batch's feature vectors"
    assert vae.codebook.embed.unique(dim=0).shape[0] > vae.cfg.codebook_size // 4
    before = vae.codebook.embed.clone()
    vae(images(n=4, seed=1))  # from now on, EMA updates
    assert not torch.equal(before, vae.codebook.embed)
    # EMA from the init's count of 1 per code: decay * 512 + (1 - decay) * 256 vectors this step
    expected = 0.99 * vae.cfg.codebook_size + 0.01 * feats.shape[0]
    assert vae.codebook.cluster_size.sum().item() == pytest.approx(expected, rel=1e-5)


def test_dead_codes_restart_from_the_batch_and_live_ones_follow_the_ema():
    torch.manual_seed(0)
    vae = AugVAE(dataclasses.replace(PRESETS["debug-sl"], codebook_restart=1.0)).train()
    vae(images(n=4))  # data init: every count 1
    book = vae.codebook
    x = images(n=4, seed=1)
    with torch.no_grad():
        feats = vae.quantized_features(x)[0].permute(0, 2, 3, 1).reshape(-1, vae.cfg.codebook_dim)
    used = torch.zeros(book.num_codes, dtype=torch.bool)
    used[book.nearest(feats)] = True
    vae(x)
    # an unused code's count decays from 1 to 0.99 < 1: it restarts as one of this batch's features
    assert (~used).any() and (book.cluster_size[~used] == 1.0).all()
    is_feature = (book.embed[:, None, :] == feats[None]).all(dim=-1).any(dim=1)
    assert is_feature[~used].all()
    assert (book.cluster_size[used] > 0.99).all(), "codes in use keep their EMA counts"
    assert torch.equal(book.embed_avg[~used], book.embed[~used])


def test_an_imported_codebook_is_never_reinitialised(tmp_path):
    state = official_state_dict(reference_manifest("augvae_sl_keys.json"))
    path = tmp_path / "official.ckpt"
    save_lightning(path, state)
    vae = AugVAE.from_official_checkpoint(str(path))
    assert vae.codebook.initialized
    ml = AugVAE(PRESETS["debug-ml"])
    assert not ml_to_sl(ml).codebook.initialized
    ml.train()(images())
    assert ml_to_sl(ml).codebook.initialized, "ml_to_sl carries the trained codebook's flag over"
