"""The generate stage: text prompts -> images, the best of N candidates by CLIP.

For each prompt (one per line of ``--prompts``) BiART samples ``candidates`` image-token sequences
with the KV cache (the prompt computed once for all of them), the AugVAE decodes them in FP32, and
CLIP picks the one closest to the prompt. Written per prompt into ``OUTPUT/NNNNN/``: ``best.png``,
``candidates/CC.png``, ``sheet.png`` (every candidate in a grid, the chosen one framed) and
``result.json`` (prompt, scores, the chosen index), written last: a rerun skips prompts that have
it. ``candidates=1`` skips CLIP. Sampling is seeded per prompt.
"""

from __future__ import annotations

import logging
import math
import os
import time
import zlib
from dataclasses import dataclass

import torch

from lverse.core.errors import InputError
from lverse.core.files import atomic_write_json
from lverse.core.resources import pick_device
from lverse.runtime.stage import array_block

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    prompts: str  # a text file, one prompt per line
    checkpoint: str  # BiART .safetensors
    vae: str  # the AugVAE the model was trained with
    tokenizer: str  # the caption tokenizer's .model
    output: str  # folder for one subfolder per prompt
    candidates: int = 64  # images sampled per prompt, CLIP keeps one
    temperature: float = 1.0  # sampling temperature (0: greedy)
    top_k: int | None = 256  # sample from the k most likely tokens (None: off)
    top_p: float | None = None  # nucleus sampling mass (None: off)
    decode_batch: int = 16  # candidates decoded by the AugVAE at once
    clip: str = "ViT-B-32"  # open_clip architecture
    clip_checkpoint: str | None = None  # its weights, a local file (None: random weights, tests only)
    device: str = "auto"  # cuda when available, else cpu
    seed: int = 0  # sampling seed (drawn per prompt)
    task_index: int | None = None  # SLURM array task: generate only this block of the prompts
    num_tasks: int | None = None  # the number of array tasks the prompts are split into

    def __post_init__(self):
        if (self.task_index is None) != (self.num_tasks is None):
            raise InputError("--task-index and --num-tasks go together (one SLURM array task)")


def read_prompts(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise InputError(f"{path} holds no prompt (one per line)")
    return prompts


@torch.no_grad()
def run_generate(cfg: GenerateConfig) -> dict:
    """Generate for every prompt not yet done; returns a summary."""
    from lverse.model.augvae import AugVAE
    from lverse.model.biart import BiART, BiARTConfig, Direction, prompt_for
    from lverse.model.checkpoint import load_model
    from lverse.model.clip import ClipScorer, to_pil
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer
    for name, path in (("checkpoint", cfg.checkpoint), ("vae", cfg.vae), ("tokenizer", cfg.tokenizer)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path} does not exist")
    prompts = read_prompts(cfg.prompts)
    pick = pick_device(cfg.device)
    log.info(pick.describe("generate"))
    device = pick.device
    model = load_model(cfg.checkpoint, BiART, BiARTConfig).to(device).eval()
    vae = AugVAE.from_pretrained(cfg.vae).to(device).eval()
    if vae.cfg.num_tokens != model.cfg.image_len or vae.cfg.codebook_size != model.cfg.image_vocab:
        raise InputError(f"{cfg.vae} makes {vae.cfg.num_tokens} tokens of {vae.cfg.codebook_size} codes, "
                         f"{cfg.checkpoint} generates {model.cfg.image_len} of {model.cfg.image_vocab}: "
                         "give the AugVAE the model was trained with")
    tok = CaptionTokenizer(cfg.tokenizer, offset=model.cfg.text_offset)
    clip = ClipScorer(cfg.clip, cfg.clip_checkpoint, device) if cfg.candidates > 1 else None
    done, start = 0, time.time()
    block = range(len(prompts))
    if cfg.task_index is not None:
        block = array_block(len(prompts), cfg.task_index, cfg.num_tasks)
        log.info("array task %d of %d: prompts %d-%d", cfg.task_index, cfg.num_tasks, block.start, block.stop - 1)
    for i in block:
        text = prompts[i]
        folder = os.path.join(cfg.output, f"{i:05d}")
        if os.path.exists(os.path.join(folder, "result.json")):
            continue
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
        os.makedirs(os.path.join(folder, "candidates"), exist_ok=True)
        for j, pic in enumerate(pictures):
            pic.save(os.path.join(folder, "candidates", f"{j:02d}.png"))
        pictures[best].save(os.path.join(folder, "best.png"))
        contact_sheet(pictures, best).save(os.path.join(folder, "sheet.png"))
        atomic_write_json(os.path.join(folder, "result.json"),
                          {"prompt": text, "best": best, "clip_score": scores[best], "scores": scores})
        done += 1
        log.info("prompt %d/%d %r: candidate %d of %d (CLIP %s)", i + 1, len(prompts), text, best,
                 len(pictures), "n/a" if scores[best] is None else f"{scores[best]:.3f}")
    seconds = time.time() - start
    return {"prompts": len(block), "generated": done, "skipped": len(block) - done,
            "seconds": round(seconds, 1), "images_per_second": round(done * cfg.candidates / max(seconds, 1e-9), 2)}


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

