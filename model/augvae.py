"""AugVAE: the frozen multi-level VQ image tokenizer of L-Verse.

Kim et al. 2021, "L-Verse: Bidirectional Generation Between Image and Text" (arXiv:2111.11133);
official code github.com/tgisaturday/L-Verse (``latent_verse/models/vqvae.py``).

- **ML** (multi-level): encoder E0 takes the image to H/4; E1..E3 each halve that, chained on the
  continuous features. Every level is quantized (4096 + 1024 + 256 + 64 = 5440 tokens at 256px).
  Decoding goes coarse to fine: decoder 0 takes post(q8), decoder i > 0 takes
  cat(post(q_level), previous output), the last one makes RGB.
- **SL** (single-level): E0, E1 of a trained ML model; only the H/8 level is quantized (1024 tokens,
  row-major) and decoded through a fresh 1x1 connector in front of each of ML's two finest
  decoders. ``ml_to_sl`` builds one from an ML model.

All levels share one EMA codebook (``quantizer.EMACodebook``); the 1x1 pre- and post-quantization
convs share their weight but keep a bias per level, as in the official code. Which bias serves
where (the official detail that SL checkpoints depend on): pre-quant bias j belongs to quantized
level j; post-quant bias i belongs to decoder i, which reads the level i-th from the coarse end.
So SL indices come from the level-1 pre-quant bias and SL decoding uses the level-0 post-quant bias.

One deliberate difference: the official SL model still quantizes the unused H/4 level, adds its
commitment loss and feeds its statistics (80% of them) to the codebook EMA while fine-tuning. Ours
quantizes only the level it keeps. Tokens and reconstructions are identical either way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lverse.core.errors import InputError

from .quantizer import EMACodebook
from .vae_blocks import Decoder, Encoder


@dataclass(frozen=True)
class AugVAEConfig:
    variant: str = "sl"  # "ml": every level quantized; "sl": only the last encoder's level
    image_size: int = 256  # side of the square input images
    in_channels: int = 3  # image channels
    hidden: int = 128  # base width of encoders and decoders
    z_channels: int = 256  # channels of the continuous features between levels
    codebook_dim: int = 256  # size of each code vector
    codebook_size: int = 8192  # number of codes, shared by all levels
    num_levels: int = 4  # encoders in the chain (ML 4; SL keeps the first 2)
    first_ch_mult: tuple[int, ...] = (1, 2, 4)  # E0 and the RGB decoder: image -> H/4
    level_ch_mult: tuple[int, ...] = (2, 4)  # E1.. and the inner decoders: one halving each
    enc_blocks: int = 2  # ResnetBlocks per encoder level
    dec_blocks: int = 3  # ResnetBlocks per decoder level
    dropout: float = 0.0  # dropout inside ResnetBlocks
    norm_groups: int = 32  # GroupNorm groups (taming's 32; vae_blocks.normalize says when fewer)
    ema_decay: float = 0.99  # codebook EMA decay
    ema_eps: float = 1e-5  # Laplace smoothing of the EMA cluster sizes
    commit_beta: float = 0.25  # weight of the commitment loss
    codebook_data_init: bool = True  # first training step sets the codes from features (quantizer doc)
    codebook_restart: float = 0.0  # restart codes whose EMA count falls below this (0: never; quantizer doc)

    def __post_init__(self):
        if self.variant not in ("ml", "sl"):
            raise InputError(f"AugVAE variant must be 'ml' or 'sl', got {self.variant!r}")
        if self.image_size % (1 << (len(self.first_ch_mult) - 1 + self.num_levels - 1)):
            raise InputError(f"image_size {self.image_size} is not divisible by the total "
                             f"downsampling of {self.num_levels} levels")

    @property
    def quant_levels(self) -> tuple[int, ...]:
        """Encoder levels whose output is quantized, fine to coarse."""
        return tuple(range(self.num_levels)) if self.variant == "ml" else (self.num_levels - 1,)

    @property
    def level_sizes(self) -> tuple[int, ...]:
        """Side of each encoder level's feature map."""
        first = self.image_size >> (len(self.first_ch_mult) - 1)
        return tuple(first >> i for i in range(self.num_levels))

    @property
    def num_tokens(self) -> int:
        return sum(self.level_sizes[lvl] ** 2 for lvl in self.quant_levels)


PRESETS: dict[str, AugVAEConfig] = {
    "augvae-ml": AugVAEConfig(variant="ml", num_levels=4),
    "augvae-sl": AugVAEConfig(variant="sl", num_levels=2),
    # 64x64 images, seconds on a CPU: 340 (ML) or 64 (SL) tokens.
    "debug-ml": AugVAEConfig(variant="ml", num_levels=4, image_size=64, hidden=32, z_channels=64,
                             codebook_dim=64, codebook_size=512),
    "debug-sl": AugVAEConfig(variant="sl", num_levels=2, image_size=64, hidden=32, z_channels=64,
                             codebook_dim=64, codebook_size=512),
    # The demo's (lverse/demo.py): 32x32 images, width 16, one ResnetBlock per level, 3 levels (the
    # fewest ML->SL conversion takes), 1 GroupNorm group (vae_blocks.normalize says why); SL makes
    # 8x8 = 64 tokens. 64 codes, and codes unused for ~300 steps restarted (EMA count below 0.05): with
    # 512 codes and no restarts, which of the 8 colours kept a code of their own depended on the seed
    # and the CPU (docs/demo.md).
    "tiny-ml": AugVAEConfig(variant="ml", num_levels=3, image_size=32, first_ch_mult=(1, 2), hidden=16,
                            z_channels=32, codebook_dim=32, codebook_size=64, enc_blocks=1, dec_blocks=1,
                            norm_groups=1, codebook_restart=0.05),
}


class SharedConv1x1(nn.Module):
    """A 1x1 conv whose weight all levels share, with a bias of its own per level."""

    def __init__(self, in_ch: int, out_ch: int, levels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 1, 1))
        self.bias = nn.Parameter(torch.empty(levels, out_ch))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's default init
        nn.init.uniform_(self.bias, -in_ch ** -0.5, in_ch ** -0.5)

    def forward(self, x: Tensor, level: int) -> Tensor:
        return F.conv2d(x, self.weight, self.bias[level])


class AugVAE(nn.Module):
    def __init__(self, cfg: AugVAEConfig):
        super().__init__()
        self.cfg = cfg
        z, nq = cfg.z_channels, len(cfg.quant_levels)
        g = cfg.norm_groups
        enc = lambda cin, mult: Encoder(cin, cfg.hidden, mult, cfg.enc_blocks, z, cfg.dropout, g)  # noqa: E731
        dec = lambda cin, mult, cout: Decoder(cin, cfg.hidden, mult, cfg.dec_blocks, cout, cfg.dropout, g)  # noqa: E731
        self.encoders = nn.ModuleList([enc(cfg.in_channels, cfg.first_ch_mult)] + [
            enc(z, cfg.level_ch_mult) for _ in range(cfg.num_levels - 1)])
        self.pre_quant = SharedConv1x1(z, cfg.codebook_dim, nq)
        self.codebook = EMACodebook(cfg.codebook_size, cfg.codebook_dim, cfg.ema_decay,
                                    cfg.ema_eps, cfg.commit_beta, cfg.codebook_data_init, cfg.codebook_restart)
        self.post_quant = SharedConv1x1(cfg.codebook_dim, z, nq)
        # Decoders run coarse to fine; every one but the ML coarsest reads 2*z channels
        # (a concatenation in ML, a connector's output in SL).
        ins = [z if (cfg.variant == "ml" and i == 0) else 2 * z for i in range(cfg.num_levels)]
        self.decoders = nn.ModuleList(
            [dec(c, cfg.level_ch_mult, z) for c in ins[:-1]] + [dec(ins[-1], cfg.first_ch_mult, cfg.in_channels)])
        self.connectors = nn.ModuleList(
            [nn.Conv2d(z, 2 * z, 1) for _ in range(cfg.num_levels)]) if cfg.variant == "sl" else None

    def quantized_features(self, x: Tensor) -> list[Tensor]:
        """Pre-quantization features of every quantized level, fine to coarse."""
        feats, h = [], x
        for level, encoder in enumerate(self.encoders):
            h = encoder(h)
            if level in self.cfg.quant_levels:
                feats.append(self.pre_quant(h, len(feats)))
        return feats

    def decode_codes(self, codes: list[Tensor]) -> Tensor:
        """Images in [-1, 1] (roughly) from each quantized level's codes, fine to coarse."""
        if self.cfg.variant == "sl":
            h = self.post_quant(codes[-1], 0)
            for connector, decoder in zip(self.connectors, self.decoders):
                h = decoder(connector(h))
            return h
        h = None
        for i, decoder in enumerate(self.decoders):
            q = self.post_quant(codes[-(i + 1)], i)
            h = decoder(q if h is None else torch.cat([q, h], dim=1))
        return h

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Reconstruct images in [-1, 1]; in training mode, also one EMA codebook update.

        Returns:
            recon: (B, C, H, W) reconstruction.
            commit: scalar sum of the levels' commitment losses.
            indices: (B, num_tokens) code indices, levels fine to coarse, each row-major.
        """
        feats = self.quantized_features(x)
        codes, indices, commit = [], [], x.new_zeros((), dtype=torch.float32)
        for f in feats:
            q, idx, loss = self.codebook.quantize(f)
            codes.append(q)
            indices.append(idx)
            commit = commit + loss
        if self.training:
            self.codebook.ema_update(feats, indices)
        return self.decode_codes(codes), commit, torch.cat(indices, dim=1)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(B, C, H, W) images in [-1, 1] -> (B, num_tokens) LongTensor, always in FP32."""
        self._check_fp32()
        with torch.autocast(device_type=images.device.type, enabled=False):
            feats = self.quantized_features(images.float())
            return torch.cat([self.codebook.quantize(f)[1] for f in feats], dim=1)

    @torch.no_grad()
    def decode(self, indices: Tensor) -> Tensor:
        """(B, num_tokens) indices -> (B, C, H, W) images, in FP32."""
        self._check_fp32()
        if indices.shape[1] != self.cfg.num_tokens:
            raise InputError(f"expected {self.cfg.num_tokens} tokens per image, got {indices.shape[1]}")
        sides = [self.cfg.level_sizes[lvl] for lvl in self.cfg.quant_levels]
        parts = indices.long().split([s * s for s in sides], dim=1)
        with torch.autocast(device_type=indices.device.type, enabled=False):
            return self.decode_codes([self.codebook.lookup(p, (s, s)) for p, s in zip(parts, sides)])

    @torch.no_grad()
    def reconstruct(self, images: Tensor, batch_size: int = 64) -> Tensor:
        """``decode(encode(images))`` in [-1, 1], ``batch_size`` images at a time: (B, 3, H, W)."""
        return torch.cat([self.decode(self.encode(b)).clamp(-1, 1) for b in images.split(batch_size)])

    def _check_fp32(self) -> None:
        if self.codebook.embed.dtype != torch.float32 or self.pre_quant.weight.dtype != torch.float32:
            raise TypeError("AugVAE encodes and decodes in FP32 (the quantizer underflows in half "
                            "precision); keep the model in float32, e.g. model.float()")

    @classmethod
    def load(cls, path: str) -> AugVAE:
        """An lverse ``.safetensors`` file, or else the authors' released ``.ckpt``."""
        return cls.from_pretrained(path) if path.endswith(".safetensors") else cls.from_official_checkpoint(path)

    @classmethod
    def from_pretrained(cls, path: str) -> AugVAE:
        """Load a model saved by ``lverse.model.checkpoint.save_model`` (safetensors)."""
        from .checkpoint import load_model
        return load_model(path, cls, AugVAEConfig)

    @classmethod
    def from_official_checkpoint(cls, path: str) -> AugVAE:
        """Load the authors' released AugVAE (Lightning ``.ckpt``; ML or SL, detected by keys)."""
        from .checkpoint import load_torch_state_dict
        state = {k: v for k, v in load_torch_state_dict(path).items() if not k.startswith("loss.")}
        variant = "sl" if any(k.startswith("connectors.") for k in state) else "ml"
        model = cls(PRESETS[f"augvae-{variant}"])
        model.load_state_dict(convert_official_state_dict(state, model, source=path))
        return model


def ml_to_sl(ml: AugVAE, keep_levels: int = 2) -> AugVAE:
    """AugVAE-SL from a trained ML model: its first ``keep_levels`` encoders, its finest
    ``keep_levels`` decoders, the shared codebook and convs, and fresh connectors."""
    if ml.cfg.variant != "ml" or not 1 <= keep_levels < ml.cfg.num_levels:
        raise InputError(f"need an ML model with more than {keep_levels} levels")
    sl = AugVAE(replace(ml.cfg, variant="sl", num_levels=keep_levels))
    sl.encoders.load_state_dict(nn.ModuleList(list(ml.encoders)[:keep_levels]).state_dict())
    sl.decoders.load_state_dict(nn.ModuleList(list(ml.decoders)[-keep_levels:]).state_dict())
    sl.codebook.load_state_dict(ml.codebook.state_dict())
    with torch.no_grad():
        # The SL level keeps its own pre-quant bias; decoding uses post-quant bias 0 (module doc).
        sl.pre_quant.weight.copy_(ml.pre_quant.weight)
        sl.pre_quant.bias.copy_(ml.pre_quant.bias[keep_levels - 1:keep_levels])
        sl.post_quant.weight.copy_(ml.post_quant.weight)
        sl.post_quant.bias.copy_(ml.post_quant.bias[:1])
    return sl.to(ml.codebook.embed.device)


# The official SL checkpoint still holds all four levels' quant convs and quantizers of its ML model.
OFFICIAL_ML_LEVELS = 4
_OFFICIAL_SHARED = {  # our key -> official key of each level's copy of one shared tensor
    "pre_quant.weight": "pre_quants.{}.weight",
    "post_quant.weight": "post_quants.{}.weight",
    "codebook.embed": "quantizers.{}.embedding.weight",
    "codebook.cluster_size": "quantizers.{}.embedding.cluster_size",
    "codebook.embed_avg": "quantizers.{}.embedding.embed_avg",
}


def convert_official_state_dict(official: dict[str, Tensor], model: AugVAE,
                                source: str = "checkpoint") -> dict[str, Tensor]:
    """Map an official AugVAE state dict onto ``model``'s keys.

    Encoder, decoder and connector keys are the same in both layouts. Each shared tensor has one
    copy per level in the official file (all identical); per-level biases are stacked. Raises
    ValueError naming the missing and unexpected keys when the file is not an AugVAE of this shape.
    """
    cfg = model.cfg
    n_official = cfg.num_levels if cfg.variant == "ml" else OFFICIAL_ML_LEVELS
    same = [k for k in model.state_dict() if k.split(".")[0] in ("encoders", "decoders", "connectors")]
    expected = set(same) | {fam.format(i) for fam in list(_OFFICIAL_SHARED.values())
                            + ["pre_quants.{}.bias", "post_quants.{}.bias"] for i in range(n_official)}
    missing, unexpected = sorted(expected - set(official)), sorted(set(official) - expected)
    if missing or unexpected:
        raise InputError(
            f"{source} is not an official AugVAE-{cfg.variant.upper()} checkpoint: "
            f"missing keys {_abbrev(missing)}; unexpected keys {_abbrev(unexpected)}")
    out = {k: official[k] for k in same}
    out["codebook.initialized"] = torch.tensor(True)  # a trained codebook: never re-initialise
    for ours, fam in _OFFICIAL_SHARED.items():
        copies = [official[fam.format(i)] for i in range(n_official)]
        if any(c.shape != copies[0].shape or not torch.equal(c, copies[0]) for c in copies[1:]):
            raise InputError(f"{source}: the per-level copies of {fam.format('*')} differ, but "
                             "AugVAE shares that tensor across levels")
        out[ours] = copies[0]
    out["pre_quant.bias"] = torch.stack([official[f"pre_quants.{lvl}.bias"] for lvl in cfg.quant_levels])
    out["post_quant.bias"] = torch.stack(
        [official[f"post_quants.{i}.bias"] for i in range(len(cfg.quant_levels))])
    bad = [f"{k} {tuple(v.shape)} != {tuple(model.state_dict()[k].shape)}"
           for k, v in out.items() if v.shape != model.state_dict()[k].shape]
    if bad:
        raise InputError(f"{source}: shapes do not match AugVAE-{cfg.variant.upper()}: {_abbrev(bad)}")
    return out


def _abbrev(items: list[str], n: int = 8) -> str:
    if not items:
        return "none"
    more = f" ... and {len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more
