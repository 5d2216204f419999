"""The generate stage: text prompts -> images, the best of N candidates by CLIP.

For each prompt (one per line of ``--prompts``) BiART samples ``candidates`` image-token sequences
with the KV cache (the prompt computed once for all of them), the AugVAE decodes them in FP32, and
CLIP picks the one closest to the prompt. Written per prompt into ``OUTPUT/NNNNN/``: ``best.png``,
``candidates/CC.png``, ``sheet.png`` (every candidate in a grid, the chosen one framed) and
``result.json`` (prompt, scores, the chosen index), written last: a rerun skips prompts that have
it. ``candidates=1`` skips CLIP. Sampling is seeded per prompt.

A shard stage like caption: the prompts are split into items of ``prompts_per_item``, run by
local worker processes (one per GPU), Ray actors (``--executor ray``) or SLURM array tasks, each
keeping its models loaded; ``_summary.json`` as every stage writes it.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from dataclasses import dataclass

import torch

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import atomic_write_json
from lverse.core.resources import compute_dtype, resolve_device
from lverse.model.biart import Direction, prompt_for
from lverse.model.clip import to_pil
from lverse.pipeline.configs import GenerateConfig
from lverse.runtime.model_cache import check_generator, load_generator
from lverse.runtime.stage import rate, run_shard_stage
from lverse.runtime.tasks import TaskResult

log = logging.getLogger(__name__)


def read_prompts(path: str) -> list[str]:
    with storage.open(path, "r", encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise InputError(f"{path} holds no prompt (one per line)")
    return prompts


def run_generate(cfg: GenerateConfig) -> dict:
    """Generate for every prompt not yet done, in items of ``prompts_per_item`` prompts on the
    configured executor; returns (and writes) the summary."""
    if cfg.prompts_per_item < 1:
        raise InputError("--prompts-per-item must be at least 1")
    prompts = read_prompts(cfg.prompts)
    check_generator(cfg.checkpoint, cfg.vae, cfg.tokenizer, cfg.ignore_provenance,
                    cfg.clip if cfg.candidates > 1 else None, cfg.clip_checkpoint)
    compute_dtype(cfg.precision, resolve_device(cfg.device))  # a precision the device lacks: refused once, here
    storage.check_output(cfg.output)
    items = prompt_items(len(prompts), cfg.prompts_per_item)

    def totals(results, seconds):
        done = sum(r.stats.get("generated", 0) for r in results)
        return {"prompts": len(prompts), "generated": done,
                "images_per_second": rate(done * cfg.candidates, seconds)}
    return run_shard_stage("generate", PromptGenerator(cfg, tuple(prompts)), items, [item_name(r) for r in items],
                           cfg.output, cfg, totals=totals, rate_of="generated")


def prompt_items(count: int, per_item: int) -> list[range]:
    return [range(i, min(i + per_item, count)) for i in range(0, count, per_item)]


def item_name(indices: range) -> str:
    """A work item's name in logs and the summary: its first and last prompt."""
    return f"prompts_{indices.start:05d}-{indices.stop - 1:05d}"


@dataclass(frozen=True)
class PromptGenerator:
    """The per-item task: the prompts of one range (picklable; models loaded once per worker)."""

    cfg: GenerateConfig
    prompts: tuple[str, ...]

    @torch.no_grad()
    def __call__(self, indices: range) -> TaskResult:
        cfg = self.cfg
        name = item_name(indices)
        todo = [i for i in indices if not storage.exists(os.path.join(cfg.output, f"{i:05d}", "result.json"))]
        if not todo:
            return TaskResult(name, ok=True, skipped=True)
        device = resolve_device(cfg.device)
        models = load_generator(cfg.checkpoint, cfg.vae, cfg.tokenizer, device,
                                cfg.clip if cfg.candidates > 1 else None, cfg.clip_checkpoint,
                                cfg.precision)
        for i in todo:
            self._one(i, *models, device)
        return TaskResult(name, ok=True, stats={"generated": len(todo)})

    def _one(self, i, model, tok, vae, clip, device):
        cfg, text = self.cfg, self.prompts[i]
        folder = os.path.join(cfg.output, f"{i:05d}")
        gen = torch.Generator(device=device).manual_seed(cfg.seed * 1_000_003 + zlib.crc32(text.encode()))
        ids = tok.encode([text], model.cfg.text_len).to(device)
        codes = model.generate(prompt_for(ids, Direction.T2I, model.cfg), Direction.T2I, model.cfg.image_len,
                               temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, generator=gen,
                               num_samples=cfg.candidates)
        pictures = to_pil(torch.cat([vae.decode(c) for c in codes.split(cfg.decode_batch)]))
        scores, best = [None] * len(pictures), 0
        if clip is not None:
            (best,), all_scores = clip.best_images(pictures, [text], len(pictures))
            scores = all_scores[0].tolist()
        storage.makedirs(os.path.join(folder, "candidates"))
        for j, pic in enumerate(pictures):
            _save_png(pic, os.path.join(folder, "candidates", f"{j:02d}.png"))
        _save_png(pictures[best], os.path.join(folder, "best.png"))
        _save_png(contact_sheet(pictures, best), os.path.join(folder, "sheet.png"))
        # Last: the prompt counts as done once this is written (a rerun redoes a prompt without it).
        atomic_write_json(os.path.join(folder, "result.json"),
                          {"prompt": text, "best": best, "clip_score": scores[best], "scores": scores})
        log.info("prompt %d %r: candidate %d of %d (CLIP %s)", i, text, best, len(pictures),
                 "n/a" if scores[best] is None else f"{scores[best]:.3f}")


def _save_png(picture, path: str) -> None:
    """A PNG at a local path or an s3:// URL (one object write)."""
    with storage.open(path, "wb") as f:
        picture.save(f, format="PNG")


def contact_sheet(pictures: list, chosen: int, pad: int = 4):
    """Every candidate in a near-square grid; the chosen one framed in green."""
    from PIL import Image
    w, h = pictures[0].size
    cols = math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / cols)
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for k, pic in enumerate(pictures):
        x, y = pad + (k % cols) * (w + pad), pad + (k // cols) * (h + pad)
        if k == chosen:
            frame = Image.new("RGB", (w + 2 * pad, h + 2 * pad), (0, 170, 0))
            sheet.paste(frame, (x - pad, y - pad))
        sheet.paste(pic, (x, y))
    return sheet

