"""`lverse train-clip`: contrastive training of a small open_clip model on image-caption shards.

L-Verse reranks its candidates with a pretrained CLIP. Where none can be had (offline machines,
the demo), this trains one from scratch on the same pairs BiART sees: open_clip's model and its
symmetric contrastive loss (``open_clip.loss.ClipLoss``), one process, AdamW with a linear
warmup and a cosine decay to 0 at the last step (the training core's ``Schedule``, as in BiART and
AugVAE training). The pairs are read once into memory, so it suits corpora of thousands of
images, not CC3M: for real data use a pretrained checkpoint with ``--clip-checkpoint``.

The weights are written (atomically) as one ``.safetensors`` file that ``--clip MODEL
--clip-checkpoint FILE`` of caption and generate loads. Held-out shards, when given, are scored
after training: image->text top-1 accuracy among the distinct held-out captions (an image counts
as right when the chosen caption equals its own).
"""

from __future__ import annotations

import io
import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from lverse.core.errors import InputError
from lverse.core.formats import MODEL_FORMAT
from lverse.core.shards import expand_shards, iter_samples
from lverse.model.checkpoint import save_state
from lverse.model.clip import register_configs
from lverse.pipeline.configs import ClipTrainConfig
from lverse.runtime.trainer import Schedule, set_lr

log = logging.getLogger(__name__)


def load_pairs(shards: str, preprocess) -> tuple[torch.Tensor, list[str]]:
    """Every (image, caption) of the shards, images through open_clip's preprocessing."""
    from PIL import Image
    paths = expand_shards(shards)
    if not paths:
        raise FileNotFoundError(f"no .tar shards match {shards}")
    images, captions, skipped = [], [], 0
    for path in paths:
        for files in iter_samples(path):
            if "jpg" not in files or "txt" not in files:
                skipped += 1
                continue
            try:
                with Image.open(io.BytesIO(files["jpg"])) as im:
                    images.append(preprocess(im.convert("RGB")))
            except OSError:
                skipped += 1
                continue
            captions.append(files["txt"].decode("utf-8", errors="replace"))
    if not images:
        raise InputError(f"{shards} holds no image-caption pairs")
    if skipped:
        log.warning("%d samples without a decodable image and a caption skipped", skipped)
    return torch.stack(images), captions


@torch.no_grad()
def retrieval_accuracy(model, tokenizer, images: torch.Tensor, captions: list[str]) -> dict:
    """Image->text top-1 accuracy among the distinct captions (an image is right when the caption it
    picks equals its own)."""
    model.eval()
    img = torch.nn.functional.normalize(torch.cat([model.encode_image(b) for b in images.split(256)]), dim=-1)
    distinct = sorted(set(captions))
    txt = torch.nn.functional.normalize(model.encode_text(tokenizer(distinct)), dim=-1)
    best = (img @ txt.T).argmax(dim=1).tolist()
    correct = sum(distinct[b] == c for b, c in zip(best, captions))
    return {"image_to_text_top1_distinct": correct / len(captions), "pairs": len(captions),
            "distinct_captions": len(distinct)}


def train_clip(cfg: ClipTrainConfig) -> dict:
    import open_clip

    register_configs()
    torch.manual_seed(cfg.seed)
    model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=None)
    tokenizer = open_clip.get_tokenizer(cfg.model)
    images, captions = load_pairs(cfg.shards, preprocess)
    tokens = tokenizer(captions)
    log.info("training CLIP %s (%.1fM parameters) on %d pairs for %d steps of %d", cfg.model,
             sum(p.numel() for p in model.parameters()) / 1e6, len(captions), cfg.steps, cfg.batch_size)

    loss_fn = open_clip.loss.ClipLoss()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98), eps=1e-6)
    schedule = Schedule("cosine", cfg.warmup_steps, min_lr_ratio=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(captions))
    model.train()
    t0, losses = time.time(), []
    bar = tqdm(range(cfg.steps), desc="train-clip", unit="step", mininterval=5)
    for step in bar:
        set_lr(opt, schedule.lr_at(step, cfg.steps, cfg.lr))
        rows = torch.randperm(len(captions), generator=gen)[:batch]
        image_features, text_features, logit_scale = model(images[rows], tokens[rows])[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # as in CLIP: the temperature stays at most 100
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    result = {"model": cfg.model, "steps": cfg.steps, "pairs": len(captions), "seconds": round(time.time() - t0, 1),
              "first_loss": losses[0], "last_loss": float(np.mean(losses[-20:]))}
    if cfg.eval_shards:
        held_images, held_captions = load_pairs(cfg.eval_shards, preprocess)
        result["heldout"] = retrieval_accuracy(model, tokenizer, held_images, held_captions)
    save_state(model.state_dict(), cfg.output, {"format": str(MODEL_FORMAT), "model": cfg.model})
    log.info("CLIP loss %.3f -> %.3f in %.0f s; weights in %s%s", result["first_loss"], result["last_loss"],
             result["seconds"], cfg.output, f"; held-out {result['heldout']}" if cfg.eval_shards else "")
    return result
