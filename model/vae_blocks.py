"""Convolutional encoder and decoder of AugVAE: taming-transformers' VQGAN blocks without attention.

Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis"
(github.com/CompVis/taming-transformers, ``taming/modules/diffusionmodules/model.py``). Module names
follow that layout (``conv_in``, ``down.{i}.block.{j}``, ``mid.block_1``, ``norm_out`` ...), which
is also the layout of the official L-Verse checkpoints, so their keys map one to one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def swish(x: Tensor) -> Tensor:
    # x * sigmoid(x) rather than F.silu: the two differ in the last bit, and official checkpoints
    # must give bit-identical reconstructions (and so never flip a near-tie token).
    return x * torch.sigmoid(x)


def normalize(channels: int, groups: int = 32) -> nn.GroupNorm:
    """taming's GroupNorm: 32 groups, or AugVAEConfig.norm_groups.

    GroupNorm's statistics are per image and group: on an image that is mostly one flat colour (the
    demo's synthetic shapes) the background is nearly the group mean and normalises to about zero
    whatever its colour. With few channels per group that loses colour: on the demo's data and
    preset (width 16, ML 300 + SL 500 steps), 4 groups decoded 88% of backgrounds and 37% of shapes
    in their own colour, 1 group 100% and 62%; no normalisation at all did not learn (MSE 0.51)."""
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> swish -> conv3x3 -> GroupNorm -> swish -> dropout -> conv3x3, plus a 1x1
    ``nin_shortcut`` on the residual when the channel count changes."""

    def __init__(self, in_ch: int, out_ch: int, dropout: float, groups: int = 32):
        super().__init__()
        self.norm1 = normalize(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = normalize(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Pad right and bottom by one, then a stride-2 3x3 conv (taming's asymmetric padding)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(ch: int, dropout: float, groups: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(ch, ch, dropout, groups)
    mid.block_2 = ResnetBlock(ch, ch, dropout, groups)
    return mid


class Encoder(nn.Module):
    """Downsamples by 2**(len(ch_mult)-1): ``num_blocks`` ResnetBlocks per level, a middle of two,
    then GroupNorm -> swish -> conv3x3 to ``z_channels``."""

    def __init__(self, in_channels: int, hidden: int, ch_mult: tuple[int, ...], num_blocks: int,
                 z_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, hidden, 3, padding=1)
        in_mult = (1,) + tuple(ch_mult)
        self.down = nn.ModuleList()
        for level, mult in enumerate(ch_mult):
            ch_in, ch_out = hidden * in_mult[level], hidden * mult
            stage = nn.Module()
            stage.block = nn.ModuleList(
                [ResnetBlock(ch_in if j == 0 else ch_out, ch_out, dropout, groups) for j in range(num_blocks)])
            if level != len(ch_mult) - 1:
                stage.downsample = Downsample(ch_out)
            self.down.append(stage)
        ch = hidden * ch_mult[-1]
        self.mid = _mid(ch, dropout, groups)
        self.norm_out = normalize(ch, groups)
        self.conv_out = nn.Conv2d(ch, z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid.block_2(self.mid.block_1(h))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """Upsamples by 2**(len(ch_mult)-1): conv3x3 from ``in_channels``, a middle of two
    ResnetBlocks, ``num_blocks`` per level from coarse to fine, then GroupNorm -> swish -> conv3x3
    to ``out_channels``. ``up`` is indexed fine to coarse, as in taming."""

    def __init__(self, in_channels: int, hidden: int, ch_mult: tuple[int, ...], num_blocks: int,
                 out_channels: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        ch = hidden * ch_mult[-1]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.mid = _mid(ch, dropout, groups)
        up = []
        for level in reversed(range(len(ch_mult))):
            ch_out = hidden * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList(
                [ResnetBlock(ch if j == 0 else ch_out, ch_out, dropout, groups) for j in range(num_blocks)])
            ch = ch_out
            if level != 0:
                stage.upsample = Upsample(ch)
            up.insert(0, stage)
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(ch, groups)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.mid.block_2(self.mid.block_1(self.conv_in(z)))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))
