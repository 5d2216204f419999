"""What the caption and generate throughput benchmarks share: model files of a given size with
random weights, a tokenizer of the model's vocabulary, token shards, and the high-water mark of
memory.

Random weights are what a throughput figure needs: sampling costs the same whatever the weights,
as long as every candidate runs to its last token (captions with random weights never end early;
images always take all 1024 tokens). The caption tokenizer is fitted on the synthetic CC3M-like
captions of ``benchmarks/data.py`` at the model's text vocabulary (49,808 pieces for the paper's
sizes), so the text half of the head is the paper's size.
"""

from __future__ import annotations

import dataclasses
import os
import resource

import numpy as np
import torch
from data import captions, make_token_shards, vocabulary

from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.biart import PRESETS, BiART
from lverse.preprocessing.text_tokenizer import CaptionTokenizer

# The AugVAE each BiART preset's image block fits: its tokens and codebook.
VAE_FOR = {"biart-500m": "augvae-sl", "biart-mini": "augvae-sl", "debug": "debug-sl"}


def model_files(folder: str, preset: str) -> dict[str, str]:
    """BiART ``preset`` and its AugVAE with random weights (seed 0), and a tokenizer of its text
    vocabulary, written into ``folder`` unless there; returns their paths."""
    paths = {name: os.path.join(folder, name) for name in ("biart.safetensors", "vae.safetensors", "tok.model")}
    bcfg = PRESETS[preset]
    if not os.path.exists(paths["tok.model"]):
        rng = np.random.default_rng(0)
        texts = captions(rng, vocabulary(rng), max(20_000, 2 * bcfg.text_vocab))
        CaptionTokenizer.fit(texts, paths["tok.model"][:-len(".model")], vocab_size=bcfg.text_vocab)
    torch.manual_seed(0)
    if not os.path.exists(paths["vae.safetensors"]):
        save_model(AugVAE(VAE_PRESETS[VAE_FOR[preset]]), paths["vae.safetensors"])
    if not os.path.exists(paths["biart.safetensors"]):
        save_model(BiART(dataclasses.replace(bcfg)), paths["biart.safetensors"])
    return {"checkpoint": paths["biart.safetensors"], "vae": paths["vae.safetensors"], "tokenizer": paths["tok.model"]}


def token_shard(folder: str, preset: str, images: int) -> str:
    """One token shard of ``images`` samples of random codes in the preset's image block."""
    bcfg = PRESETS[preset]
    if (bcfg.image_len, bcfg.image_vocab) != (1024, 8192):
        raise SystemExit(f"{preset}: token shards here hold 1024 codes below 8192")
    rng = np.random.default_rng(1)
    texts = captions(rng, vocabulary(rng, 1000), images)
    return make_token_shards(os.path.join(folder, "tokens"), images, images, texts)[0]


class PeakMemory:
    """The high-water mark of memory while a block runs: CUDA's allocator on a GPU, else this
    process's resident set (which only grows: measure the smaller set-up first)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
