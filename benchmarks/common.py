"""What the benchmarks share (a helper, not a benchmark; run the benchmarks from the repository
root, ``python benchmarks/NAME.py``, and Python finds it beside them):

- training: an engine built the way `lverse train` builds it, random token batches, and the
  stage's own training step (``micro_step``);
- data in lverse's formats, made offline: raw image shards as img2dataset writes them, token
  shards as ``lverse encode`` writes them, and CC3M-like captions (lengths around 10 words, words
  drawn by Zipf's law from common caption words and made-up English-like ones: no caption data is
  available offline);
- serving: model files of a preset's size with random weights, a tokenizer of its text
  vocabulary, and the high-water mark of memory.

Random weights are what a throughput figure needs: sampling costs the same whatever the weights,
as long as every candidate runs to its last token (captions with random weights never end early;
images always take all 1024 tokens). The tokenizer ``model_files`` writes is fitted on the
synthetic captions at the model's text vocabulary (49,808 pieces for the paper's sizes), so the
text half of the head is the paper's size.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import os
import resource
import tarfile
import time

import numpy as np
import torch

from lverse.core.files import atomic_write_json
from lverse.core.formats import TOKEN_SHARD_FORMAT
from lverse.core.shards import add_to_tar
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.biart import PRESETS, BiART, Direction
from lverse.pipeline.configs import OptimConfig
from lverse.preprocessing.synthetic import draw_sample
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.deepspeed import load_ds_config, micro_step, wrap

__all__ = ["BPE_DROPOUT", "IMAGE_LEN", "IMAGE_VOCAB", "TEXT_LEN", "VAE", "PeakMemory", "build_engine", "captions",
           "deepspeed_config", "make_raw_shards", "make_token_shards", "micro_step", "model_files", "random_batches",
           "timed_rounds", "token_shard", "vocabulary"]


def deepspeed_config(name: str, batch: int, world_size: int = 1) -> dict:
    """The ds_config ``name`` (a shipped name or a path) as the train stage loads it for
    micro-batches of ``batch`` on ``world_size`` ranks."""
    return load_ds_config(name, world_size, micro_batch_size=batch, grad_accum=1, grad_clip=OptimConfig().grad_clip)


def build_engine(model: BiART, ds: dict, lr: float, device: torch.device, fused: bool | None = None,
                 compile: bool = False):
    """``model`` in a DeepSpeed engine as the train stage makes it (``wrap``) under the loaded
    config ``ds`` (not changed); ``fused``: the optimizer's choice (None: the stage's default);
    ``compile``: the blocks compiled (the run config's ``compile``). Returns (engine, kernel choices)."""
    optim = OptimConfig()
    if fused is not None:
        optim.fused = fused
    return wrap(model, copy.deepcopy(ds), lr, device, optim, compile=compile)


def timed_rounds(engine, data: list[tuple[torch.Tensor, torch.Tensor]], warmup: int, rounds: int,
                 steps: int) -> list[float]:
    """Seconds per training step (``micro_step``, directions alternating over ``data``) of each
    of ``rounds`` rounds of ``steps``, after ``warmup`` steps; on CUDA each round ends
    synchronised, so a round holds all its GPU work."""
    def sync():
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)
    for i in range(warmup):
        micro_step(engine, *data[i % len(data)], Direction(i % 2))
    sync()
    out = []
    for _ in range(rounds):
        start = time.perf_counter()
        for i in range(steps):
            micro_step(engine, *data[i % len(data)], Direction(i % 2))
        sync()
        out.append((time.perf_counter() - start) / steps)
    return out


def random_batches(cfg, batch: int, n: int, device: torch.device | str = "cpu",
                   seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (text, image) batches of a BiART config ``cfg``: captions of 5 to text_len random
    pieces, PAD-filled after, and random image codes."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        text = torch.randint(cfg.text_offset, cfg.pad_id, (batch, cfg.text_len), generator=g)
        lengths = torch.randint(5, cfg.text_len + 1, (batch, 1), generator=g)
        text[torch.arange(cfg.text_len)[None] >= lengths] = cfg.pad_id
        out.append((text.to(device), torch.randint(cfg.image_vocab, (batch, cfg.image_len), generator=g).to(device)))
    return out


# -- data in lverse's formats ---------------------------------------------------------------

IMAGE_LEN, IMAGE_VOCAB, TEXT_LEN, BPE_DROPOUT = 1024, 8192, 64, 0.1  # AugVAE-SL; BiART's text_len
VAE = "0" * 64  # the AugVAE hash the shards' stats record (none is loaded)

COMMON = ("a the of and in on with at for to from by an is are this that his her its their two three some over "
          "under near during after before into one man woman person people city view street house tree trees "
          "water sky building car dog cat girl boy family beach sea mountain road church river garden flowers table "
          "room night sunset portrait illustration vector background image photo player team football game stage "
          "actor artist fashion dress food kitchen wedding bride couple child children business office window door "
          "snow winter summer forest lake bridge train station market crowd festival hand face hair beautiful old "
          "young new white black red blue green large small little happy modern traditional famous wooden historic "
          "empty colorful dark bright looking standing sitting walking holding wearing celebrity arrives "
          "premiere attends event season front top side against stock concept").split()
ONSETS = ("", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "cr",
          "dr", "fl", "gr", "pl", "pr", "sh", "sl", "st", "str", "th", "tr", "ch", "sp", "bl", "cl")
VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "ie", "oo", "ou", "y")
CODAS = ("", "", "", "", "", "", "", "n", "r", "s", "t", "l", "m", "ng", "nd", "st", "ck", "rt", "ll", "ss", "ch", "x")


def vocabulary(rng: np.random.Generator, size: int = 100_000) -> list[str]:
    """The common words, then made-up words of 1-3 syllables, ``size`` in all, each once."""
    words = list(dict.fromkeys(COMMON))
    seen = set(words)
    while len(words) < size:
        syllables = rng.choice(3, p=[0.5, 0.4, 0.1]) + 1
        word = "".join(ONSETS[rng.integers(len(ONSETS))] + VOWELS[rng.integers(len(VOWELS))]
                       + CODAS[rng.integers(len(CODAS))] for _ in range(syllables))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def captions(rng: np.random.Generator, words: list[str], n: int) -> list[str]:
    """``n`` captions: lognormal lengths around 9.5 words, words drawn by Zipf's law (exponent 1.1)."""
    p = np.arange(1, len(words) + 1, dtype=np.float64) ** -1.1
    lengths = np.clip(np.rint(rng.lognormal(np.log(9.5), 0.4, n)), 3, 40).astype(int)
    draws = rng.choice(len(words), size=int(lengths.sum()), p=p / p.sum())
    out, at = [], 0
    for length in lengths:
        text = " ".join(words[i] for i in draws[at:at + length])
        at += length
        out.append(text[0].upper() + text[1:] if rng.random() < 0.3 else text)
    return out


def make_token_shards(folder: str, samples: int, per_shard: int, texts: list[str], seed: int = 0,
                      image_len: int = IMAGE_LEN, image_vocab: int = IMAGE_VOCAB) -> list[str]:
    """Token shards as ``lverse encode`` writes them (its tar writer, its stats file), ``image_len``
    random codes below ``image_vocab`` an image; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng, paths = np.random.default_rng(seed), []
    for s, first in enumerate(range(0, samples, per_shard)):
        path = os.path.join(folder, f"{s:05d}.tar")
        count = min(per_shard, samples - first)
        codes = rng.integers(image_vocab, size=(count, image_len), dtype=np.uint16)
        with tarfile.open(path, "w") as out:
            for i in range(count):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                np.save(buf, codes[i])
                add_to_tar(out, f"{key}.codes.npy", buf.getvalue())
                add_to_tar(out, f"{key}.txt", texts[first + i].encode())
                add_to_tar(out, f"{key}.json", json.dumps({"key": key, "url": f"synthetic/{key}.jpg", "vae": VAE},
                                                     sort_keys=True).encode())
        atomic_write_json(os.path.join(folder, f"{s:05d}_stats.json"),
                          {"samples": count, "corrupt": 0, "bad_json": 0, "no_extension": 0,
                           "format": TOKEN_SHARD_FORMAT, "vae": VAE, "crops": 0, "source": path, "seconds": 0.0,
                           "node": "benchmark"})
        paths.append(path)
    return paths


def make_raw_shards(folder: str, shards: int, per_shard: int, size: int) -> list[str]:
    """Raw shards as img2dataset writes them, ``size`` x ``size`` JPEGs; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    paths = []
    for s in range(shards):
        rng = np.random.default_rng(s)
        path = os.path.join(folder, f"{s:05d}.tar")
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                image, caption = draw_sample(rng, size)
                buf = io.BytesIO()
                image.save(buf, format="JPEG", quality=95)
                meta = json.dumps({"key": key, "url": f"http://example.com/{key}.jpg"}).encode()
                for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", meta)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


# -- serving ---------------------------------------------------------------------------------

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
    rng = np.random.default_rng(1)
    texts = captions(rng, vocabulary(rng, 1000), images)
    return make_token_shards(os.path.join(folder, "tokens"), images, images, texts, image_len=bcfg.image_len,
                             image_vocab=bcfg.image_vocab)[0]


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
