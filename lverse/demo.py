"""`lverse demo`: the largest end-to-end piece of the pipeline that exists, on synthetic data.

Until the inference stages land and the demo is wired through the stage commands (issues 6-7), it
runs the models in-process on a CPU: draw image-caption pairs -> fit the caption tokenizer -> train a debug AugVAE-ML,
convert it to SL and fine-tune it -> encode every image to tokens -> train a debug BiART with
alternating directions -> caption a few images and generate images for a few captions. It says so
when it starts. Everything it writes goes under ``--output``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

import numpy as np
import torch
from PIL import Image

from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.augvae import AugVAE, ml_to_sl
from lverse.model.biart import PRESETS as BIART_PRESETS
from lverse.model.biart import BiART, Direction, build_sequence, prompt_for
from lverse.model.checkpoint import save_model
from lverse.model.losses import ReconstructionLoss
from lverse.preprocessing.synthetic import draw_sample, image_to_tensor_array
from lverse.preprocessing.text_tokenizer import CaptionTokenizer

log = logging.getLogger("lverse.demo")


@dataclasses.dataclass
class DemoConfig:
    output: str = "runs/demo"  # folder for everything the demo writes
    samples: int = 512  # synthetic image-caption pairs
    vae_steps: int = 60  # AugVAE-ML steps, then as many SL fine-tuning steps
    biart_steps: int = 300  # BiART steps, directions alternating
    batch_size: int = 16  # images per step, both models
    seed: int = 0  # data, initialisation and sampling


def run_demo(cfg: DemoConfig) -> dict[str, float]:
    """Run the demo; returns the first and last losses of each model."""
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output, exist_ok=True)
    log.info("interim demo: runs the models in-process on synthetic data; the stage-by-stage demo "
             "(download, encode with Ray, DeepSpeed training, CLIP reranking, report) is not wired yet")
    rng = np.random.default_rng(cfg.seed)
    pairs = [draw_sample(rng, size=64) for _ in range(cfg.samples)]
    images = torch.from_numpy(np.stack([image_to_tensor_array(im) for im, _ in pairs]))
    captions = [c for _, c in pairs]

    tok = CaptionTokenizer.fit(captions, os.path.join(cfg.output, "tokenizer"), vocab_size=64,
                               offset=VAE_PRESETS["debug-sl"].codebook_size)
    stats = {}
    vae = _train_vae(AugVAE(VAE_PRESETS["debug-ml"]), images, cfg, "augvae-ml", stats)
    vae = _train_vae(ml_to_sl(vae), images, cfg, "augvae-sl", stats).eval()
    save_model(vae, os.path.join(cfg.output, "augvae-sl.safetensors"))
    codes = torch.cat([vae.encode(b) for b in images.split(64)])
    log.info("encoded %d images to %d tokens each", len(codes), codes.shape[1])

    # The synthetic captions take up to 25 pieces of a 64-piece vocabulary, 36 with BPE-dropout.
    bcfg = dataclasses.replace(BIART_PRESETS["debug"], text_vocab=tok.vocab_size, text_len=40,
                               image_vocab=vae.cfg.codebook_size, image_len=vae.cfg.num_tokens)
    biart = _train_biart(BiART(bcfg), tok, codes, captions, cfg, stats).eval()
    save_model(biart, os.path.join(cfg.output, "biart.safetensors"))
    _sample(biart, vae, tok, codes[:4], captions[:4], cfg.output)
    for name, (first, last) in stats.items():
        log.info("%s loss: %.3f at the first step -> %.3f at the last", name, first, last)
    return {f"{name}_{when}": v for name, pair in stats.items() for when, v in zip(("first", "last"), pair)}


def _train_vae(vae: AugVAE, images: torch.Tensor, cfg: DemoConfig, name: str, stats: dict) -> AugVAE:
    loss_fn = ReconstructionLoss(perceptual_weight=0.1)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=1e-5)
    vae.train()
    losses, t0 = [], time.time()
    for step in range(cfg.vae_steps):
        batch = images[torch.randint(len(images), (cfg.batch_size,))]
        recon, commit, _ = vae(batch)
        loss = loss_fn(recon, batch, commit)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0 or step == cfg.vae_steps - 1:
            log.info("%s step %d/%d loss %.4f (%.1fs)", name, step + 1, cfg.vae_steps, loss.item(), time.time() - t0)
    stats[name] = (losses[0], float(np.mean(losses[-5:])))
    return vae


def _train_biart(model: BiART, tok: CaptionTokenizer, codes: torch.Tensor, captions: list[str],
                 cfg: DemoConfig, stats: dict) -> BiART:
    opt = model.configure_optimizers(lr=3e-3)
    model.train()
    losses, t0 = {d: [] for d in Direction}, time.time()
    for step in range(cfg.biart_steps):
        direction = Direction(step % 2)  # text->image on even steps, image->text on odd
        rows = torch.randint(len(codes), (cfg.batch_size,))
        text = tok.encode([captions[i] for i in rows], model.cfg.text_len, training=True)
        seq = build_sequence(text, codes[rows], direction, model.cfg)
        _, loss = model(seq[:, :-1], direction, targets=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses[direction].append(loss["gen"].item())
        if step % 50 == 0 or step == cfg.biart_steps - 1:
            log.info("biart step %d/%d %s ref %.3f gen %.3f (%.1fs)", step + 1, cfg.biart_steps,
                     direction.name, loss["ref"].item(), loss["gen"].item(), time.time() - t0)
    for d, values in losses.items():
        stats[f"biart-{d.name.lower()}-gen"] = (values[0], float(np.mean(values[-5:])))
    return model


def _sample(biart: BiART, vae: AugVAE, tok: CaptionTokenizer, codes: torch.Tensor,
            captions: list[str], output: str) -> None:
    cfg = biart.cfg
    text_ids = biart.generate(prompt_for(codes, Direction.I2T, cfg), Direction.I2T, cfg.text_len, temperature=0)
    for truth, ids in zip(captions, text_ids):
        log.info("caption: %r  (drawn as %r)", tok.decode(ids), truth)
    prompts = tok.encode(captions, cfg.text_len)
    image_ids = biart.generate(prompt_for(prompts, Direction.T2I, cfg), Direction.T2I, cfg.image_len,
                               temperature=1.0, top_k=32)
    pictures = ((vae.decode(image_ids).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1)
    folder = os.path.join(output, "generated")
    os.makedirs(folder, exist_ok=True)
    for i, (caption, pic) in enumerate(zip(captions, pictures)):
        Image.fromarray(pic.numpy()).save(os.path.join(folder, f"{i}.png"))
        log.info("generated %s for %r", os.path.join(folder, f"{i}.png"), caption)
