"""The caption stage: every image of a webdataset corpus -> a caption, offline, in batches.

One input shard (img2dataset's image shards, or lverse's token shards) in, one parquet out,
``{name}.parquet`` with a row per image: key, url, caption (cut after its first full stop),
caption_whole (the same candidate as sampled: the untruncated rows of the paper's Table 2),
clip_score (and, with ``keep_candidates``, every candidate, cut, and its score; an image that does
not decode gets a row with its error), and the caption format (``core/formats.CAPTION_FORMAT``) in
its schema metadata. Written atomically; a rerun skips shards whose parquet exists.

Per batch of images: image tokens (the AugVAE encodes raw images in FP32; token shards carry
them), then BiART samples ``candidates`` captions per image of up to ``max_tokens`` text tokens
with the KV cache, the image prompt run once and shared by its candidates (``generate(...,
num_samples=...)``); each candidate is cut after its first full stop (``truncate_caption``), and CLIP (open_clip) keeps
the one closest to the image (for token shards the image CLIP sees is the AugVAE's decoding of the
tokens). ``candidates=1`` skips CLIP. Sampling is seeded per shard, so a shard captioned again
gets the same captions.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import tarfile
import time
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import atomic_write_parquet, read_json, remove_stale_temporaries
from lverse.core.formats import mark_captions
from lverse.core.images import preprocess
from lverse.core.resources import compute_dtype, resolve_device
from lverse.core.shards import check_vae, expand_shards, file_sha256, iter_samples, sample_meta, shard_name, stats_path
from lverse.model.biart import Direction, prompt_for
from lverse.model.clip import to_pil
from lverse.pipeline.configs import CaptionConfig
from lverse.preprocessing.text_tokenizer import truncate_caption
from lverse.runtime.model_cache import check_generator, load_generator
from lverse.runtime.stage import rate, run_shard_stage
from lverse.runtime.tasks import TaskResult

log = logging.getLogger(__name__)


@torch.no_grad()
def sample_captions(model, tok, codes: torch.Tensor, candidates: int, max_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float | None = None, generator=None,
                    use_cache: bool = True) -> list[list[str]]:
    """(B, image_len) codes -> B lists of ``candidates`` whole captions (up to PAD or ``max_tokens``)."""
    prompt = prompt_for(codes.to(next(model.parameters()).device), Direction.I2T, model.cfg)
    ids = model.generate(prompt, Direction.I2T, max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         generator=generator, use_cache=use_cache, num_samples=candidates).cpu()
    texts = [tok.decode(row) for row in ids]
    return [texts[i * candidates:(i + 1) * candidates] for i in range(codes.shape[0])]


@dataclass(frozen=True)
class ShardCaptioner:
    """The per-shard task (picklable; models are loaded once per worker process)."""

    cfg: CaptionConfig

    def __call__(self, shard: str) -> TaskResult:
        cfg = self.cfg
        name = shard_name(shard)
        target = os.path.join(cfg.output, f"{name}.parquet")
        if storage.exists(target):
            return TaskResult(name, ok=True, skipped=True)
        device = resolve_device(cfg.device)
        model, tok, vae, clip = load_generator(cfg.checkpoint, cfg.vae, cfg.tokenizer, device,
                                               cfg.clip if cfg.candidates > 1 else None, cfg.clip_checkpoint,
                                               cfg.precision)
        start = time.time()
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + zlib.crc32(name.encode()))
        rows = []
        # Streamed: samples are read from the tar as the batches need them, so memory holds one
        # batch of images (and the shard's rows of text), whatever the shard's size.
        samples = iter_samples(shard)
        try:
            while batch := list(itertools.islice(samples, cfg.batch_size)):
                rows += self._batch(batch, model, tok, vae, clip, gen, device)
        except (OSError, ValueError, EOFError, tarfile.TarError) as e:  # the tar itself is broken
            return TaskResult(name, ok=False, reason=f"unreadable shard {shard}: {type(e).__name__}: {e}")
        remove_stale_temporaries(target)  # what a writer killed mid-write left
        atomic_write_parquet(target, _table(rows, cfg.keep_candidates))
        seconds = time.time() - start
        failed = sum(r["error"] is not None for r in rows)
        return TaskResult(name, ok=True, stats={"images": len(rows), "failed": failed, "seconds": round(seconds, 2)})

    def _batch(self, samples, model, tok, vae, clip, gen, device) -> list[dict]:
        cfg = self.cfg
        rows, good, codes, pictures = [], [], [], []
        for s in samples:
            meta = sample_meta(s) or {}  # a .json that is no JSON object costs the url only
            row = {"key": s["__key__"], "url": meta.get("url"), "caption": None, "caption_whole": None,
                   "clip_score": None, "error": None, "candidates": None, "candidate_scores": None}
            rows.append(row)
            if "codes.npy" in s:
                try:
                    found = np.load(io.BytesIO(s["codes.npy"]), allow_pickle=False)
                except (ValueError, OSError, EOFError):
                    found = None
                if found is None or found.shape != (model.cfg.image_len,):
                    row["error"] = f"codes do not load as {model.cfg.image_len} AugVAE codes"
                    continue
                codes.append(torch.from_numpy(found.astype(np.int64)))
                good.append(row)
                continue
            image = _decode(s.get("jpg", b""), vae.cfg.image_size)
            if image is None:
                row["error"] = "image does not decode"
                continue
            good.append(row)
            pictures.append(image)
        if not good:
            return rows
        if pictures:  # raw images: tokens from the AugVAE, CLIP sees the image itself
            batch = torch.from_numpy(np.stack([p[0] for p in pictures])).to(device)
            codes = list(vae.encode(batch).cpu())
            pil = [p[1] for p in pictures]
        codes = torch.stack(codes)
        if not pictures and clip is not None:  # token shards: CLIP sees the AugVAE's decoding
            pil = to_pil(vae.decode(codes.to(device)))
        whole = sample_captions(model, tok, codes, cfg.candidates, cfg.max_tokens, temperature=cfg.temperature,
                                top_k=cfg.top_k, top_p=cfg.top_p, generator=gen)
        texts = [[truncate_caption(c) for c in cand] for cand in whole]  # what CLIP ranks and users read
        if clip is None:
            for row, cand, full in zip(good, texts, whole):
                row.update(caption=cand[0], caption_whole=full[0])
            return rows
        best, scores = clip.best_captions(pil, texts)
        for row, cand, full, b, sc in zip(good, texts, whole, best, scores.tolist()):
            row.update(caption=cand[b], caption_whole=full[b], clip_score=sc[b])
            if cfg.keep_candidates:
                row.update(candidates=cand, candidate_scores=sc)
        return rows


def _decode(jpg: bytes, size: int):
    """JPEG bytes -> (AugVAE input array, PIL image), or None."""
    from PIL import Image
    array = preprocess(jpg, size)
    if array is None:
        return None
    with Image.open(io.BytesIO(jpg)) as im:
        return array, im.convert("RGB")


def _table(rows: list[dict], keep_candidates: bool):
    import pyarrow as pa
    columns = ["key", "url", "caption", "caption_whole", "clip_score", "error"] + (
        ["candidates", "candidate_scores"] if keep_candidates else [])
    return mark_captions(pa.table({c: [r[c] for r in rows] for c in columns}))


def run_caption(cfg: CaptionConfig) -> dict:
    """Caption every shard not yet done; returns (and writes) the summary."""
    shards = expand_shards(cfg.shards)
    if not shards:
        raise FileNotFoundError(f"no shards match {cfg.shards}")
    if cfg.candidates < 1 or cfg.max_tokens < 1:
        raise InputError("--candidates and --max-tokens must be at least 1")
    check_generator(cfg.checkpoint, cfg.vae, cfg.tokenizer, cfg.ignore_provenance,
                    cfg.clip if cfg.candidates > 1 else None, cfg.clip_checkpoint)
    compute_dtype(cfg.precision, resolve_device(cfg.device))  # a precision the device lacks: refused once, here
    token_shards = [(s, read_json(stats_path(s))) for s in shards if storage.isfile(stats_path(s))]
    check_vae(token_shards, file_sha256(cfg.vae), image_shards="",
              other_vae="give --vae the AugVAE the shards were encoded with")
    storage.check_output(cfg.output)

    def totals(results, seconds):
        images = sum(r.stats.get("images", 0) for r in results if not r.skipped)
        return {"images": images, "undecodable": sum(r.stats.get("failed", 0) for r in results),
                "images_per_second": rate(images, seconds)}
    return run_shard_stage("caption", ShardCaptioner(cfg), shards, [shard_name(s) for s in shards], cfg.output,
                           cfg, totals=totals, rate_of="images")

