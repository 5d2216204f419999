"""`lverse demo`: the whole pipeline on the synthetic stand-in for Conceptual Captions, on a CPU.

Every stage runs as the real command a user would type (``python -m lverse.cli STAGE ...``, each
logged with ``$`` so it can be copied), in order:

    serve -> download (img2dataset, train and held-out) -> tokenizer -> train-vae -> encode (Ray)
    -> train (BiART, DeepSpeed, both directions) -> train-clip -> caption -> generate
    -> evaluate -> accuracy -> report

A stage that finishes writes ``OUTPUT/_done/{stage}.json`` (its command and seconds); a rerun
skips finished stages and resumes the others (each stage resumes by itself). A stage run before
with other options is refused: use another ``--output``.

The sizes (``DemoConfig``) are meant for both directions to learn on 2 CPU cores in under 20
minutes (docs/demo.md says what was measured); the two accuracies below come out of the run:

- ``caption_accuracy``: the share of held-out images whose caption (CLIP-reranked) contains
  "<colour> <shape>" of the image's true caption, e.g. "red circle".
- ``t2i_color_accuracy``: the share of held-out prompts whose generated image (CLIP-reranked)
  shows the prompted colour, judged by pixel statistics: every pixel is assigned to the nearest
  of the 8 palette colours (RGB distance); the most frequent class is the background; the shape's
  colour is the most frequent other class, and counts only if it covers at least
  ``MIN_SHAPE_SHARE`` of the image. Correct iff it is the prompted shape colour.

Both are also computed for the first candidate (no reranking), and written with the run's facts to
``OUTPUT/demo_results.json``, which the report shows.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from urllib.parse import urlparse

import yaml

from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json
from lverse.core.formats import read_captions
from lverse.runtime.tasks import StageFailed

log = logging.getLogger("lverse.demo")

MIN_SHAPE_SHARE = 0.03  # of the pixels; the synthetic shapes cover 12-40%
# The AugVAE gate, checked on the held-out images before BiART trains on its tokens (``vae_quality``).
# Tokenizers that kept the colour of 79-81% of shapes (19.7-20.7 dB) led to t2i_color_accuracy 0.52;
# those of the defaults keep 98-100% (24-27 dB). docs/demo.md has the measurements.
VAE_GATE = {"vae_color_kept": 0.95, "vae_psnr": 23.0}
# SL training ends once the reconstructions of a training shard reach this PSNR (train-vae's
# target_psnr; vae_sl_steps is the ceiling): the steps it takes differ between seeds and CPUs.
VAE_TARGET_PSNR = 25.0


@dataclass(frozen=True)
class DemoConfig:
    output: str = "runs/demo"  # everything the demo writes
    train: int = 2000  # synthetic training pairs served
    heldout: int = 100  # held-out pairs: images to caption; their captions are the prompts
    prompts: int = 50  # held-out captions to generate images for
    image_size: int = 64  # pixels of the served and downloaded images (the AugVAE resizes to its 32)
    vocab_size: int = 96  # caption tokenizer pieces (the synthetic captions use ~40 words)
    vae_ml_steps: int = 100  # AugVAE-ML steps (SL starts over after the conversion: docs/demo.md)
    # AugVAE-SL steps at most: SL ends once the reconstructions of a training shard reach
    # VAE_TARGET_PSNR (lverse/demo.py).
    vae_sl_steps: int = 3000
    biart_steps: int = 2000  # BiART steps, directions alternating
    clip_steps: int = 800  # tiny open_clip steps
    caption_candidates: int = 64  # captions sampled per held-out image, CLIP keeps one
    image_candidates: int = 64  # images sampled per prompt, CLIP keeps one
    seed: int = 0  # random seed of the data and of every stage
    min_accuracy: float = 0.8  # exit non-zero when either accuracy is below (0: never), or the AugVAE gate fails


class Demo:
    def __init__(self, cfg: DemoConfig):
        self.cfg = cfg
        self.out = cfg.output
        self.path = lambda *parts: os.path.join(self.out, *parts)  # noqa: E731

    # -- running one stage ----------------------------------------------------------------------

    def stage(self, name: str, args: list[str], config: tuple[str, dict] | None = None,
              env: dict[str, str] | None = None) -> None:
        """Run ``lverse ARGS`` unless the stage is done; refuse one done with other arguments.
        ``config`` is (path, values) of a YAML file the stage reads, written just before it runs;
        ``env`` the stage's environment (default: this process's)."""
        marker = self.path("_done", f"{name}.json")
        record = {"command": ["lverse", *args], "config": config and config[1]}
        if os.path.exists(marker):
            with open(marker) as f:
                done = json.load(f)
            if {k: done.get(k) for k in record} != record:
                raise InputError(f"stage {name} of {self.out} ran with other options ({shlex.join(done['command'])}); "
                                 "use another --output, or delete the folder")
            log.info("stage %s: done before (%.0f s), skipped", name, done["seconds"])
            return
        if config:
            with atomic_output(config[0]) as tmp, open(tmp, "w") as f:
                yaml.safe_dump(config[1], f, sort_keys=False)
        log.info("stage %s\n$ %s", name, shlex.join(record["command"]))
        t0 = time.time()
        # The stage's own log goes straight to this terminal: its progress bars and lines.
        rc = subprocess.run([sys.executable, "-m", "lverse.cli", *args], env=env).returncode
        if rc != 0:
            raise StageFailed(f"stage {name} failed (exit status {rc}); fix what it said and run the demo "
                              f"again: finished stages are kept")
        atomic_write_json(marker, {**record, "seconds": round(time.time() - t0, 1)})
        log.info("stage %s: done in %.0f s", name, time.time() - t0)

    def check_settings(self) -> None:
        """Refuse to continue a demo folder made with other settings (another seed, other sizes)."""
        path = self.path("demo_config.json")
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("output", "min_accuracy")}
        if os.path.exists(path):
            with open(path) as f:
                before = json.load(f)
            if before != settings:
                changed = sorted(k for k in settings if before.get(k) != settings[k])
                raise InputError(f"{self.out} holds a demo run with other settings ({', '.join(changed)}); use "
                                 "another --output, or delete the folder")
        atomic_write_json(path, settings)

    # -- the pipeline ---------------------------------------------------------------------------

    def run(self) -> dict:
        cfg, p = self.cfg, self.path
        t0 = time.time()
        os.makedirs(self.out, exist_ok=True)
        self.check_settings()
        tsv = {split: p("data", f"{split}.tsv") for split in ("train", "heldout")}
        download = ["--image-size", str(cfg.image_size), "--resize-mode", "center_crop", "--samples-per-shard",
                    "500", "--download-threads", "16", "--timeout", "3", "--workers", "2", "--retries", "1"]
        with self.server(tsv) or nullcontext():
            self.stage("download", ["download", "--input", tsv["train"], "--output", p("images"), *download])
            self.stage("download-heldout", ["download", "--input", tsv["heldout"], "--output",
                                            p("heldout", "images"), *download])
        self.stage("tokenizer", ["tokenizer", "--captions", tsv["train"], "--output", p("tokenizer"),
                                 "--vocab-size", str(cfg.vocab_size)])

        vae_config = p("configs", "augvae.yaml")
        self.stage("train-vae", ["train-vae", "--config", vae_config], (vae_config, self.vae_values()))
        vae = p("augvae", "augvae-sl.safetensors")
        quality = self.check_vae(vae)
        self.stage("encode", ["encode", "--shards", p("images"), "--vae", vae, "--output", p("tokens"),
                              "--executor", "ray", "--workers", "2", "--batch-size", "64", "--decode-threads", "1"])

        biart_config = p("configs", "biart.yaml")
        biart_values = {
            "run_dir": p("biart"), "steps": cfg.biart_steps, "micro_batch_size": 32,
            "deepspeed": "zero2_fp32", "seed": cfg.seed, "checkpoint_every": 200,
            "keep_checkpoints": 1, "log_every": 50, "sample_every": 0, "tensorboard": True,
            "model": {"preset": "debug", "overrides": {"n_layer": 4, "n_head": 4, "n_embd": 128, "text_len": 32}},
            "data": {"shards": p("tokens"), "tokenizer": p("tokenizer.model"), "vae": vae, "workers": 1,
                     "resampled": True},
            "optim": {"lr": 3e-3, "warmup_steps": 50, "schedule": "cosine", "weight_decay": 0.01}}
        self.stage("train", ["train", "--config", biart_config], (biart_config, biart_values))
        biart = p("biart", "biart.safetensors")
        clip = p("clip", "lverse-tiny.safetensors")
        self.stage("train-clip", ["train-clip", "--shards", p("images"), "--output", clip, "--eval-shards",
                                  p("heldout", "images"), "--steps", str(cfg.clip_steps), "--seed", str(cfg.seed)])

        models = ["--checkpoint", biart, "--vae", vae, "--tokenizer", p("tokenizer.model"),
                  "--clip", "lverse-tiny", "--clip-checkpoint", clip, "--seed", str(cfg.seed)]
        self.stage("caption", ["caption", "--shards", p("heldout", "images"), "--output", p("captions"), *models,
                               "--candidates", str(cfg.caption_candidates), "--temperature", "0.7",
                               "--batch-size", "16", "--keep-candidates"])
        references = self.references()
        prompts = p("data", "prompts.txt")
        if not os.path.exists(prompts):
            with atomic_output(prompts) as tmp, open(tmp, "w") as f:
                f.write("\n".join(sorted(set(references.values()))[:cfg.prompts]) + "\n")
        self.stage("generate", ["generate", "--prompts", prompts, "--output", p("generated"), *models,
                                "--candidates", str(cfg.image_candidates), "--temperature", "0.7",
                                "--top-k", "16"])
        refs_json = p("data", "heldout_references.json")
        atomic_write_json(refs_json, {
            "images": [{"id": k} for k in references],
            "annotations": [{"image_id": k, "id": i, "caption": c} for i, (k, c) in enumerate(references.items())]})
        self.stage("evaluate-captions", ["evaluate", "captions", "--predictions", p("captions"), "--references",
                                         refs_json, "--output", p("evaluate_captions.json")])
        self.stage("evaluate-generations", ["evaluate", "generations", "--generations", p("generated"),
                                            "--output", p("evaluate_generations.json")])
        self.stage("evaluate-reconstruction", ["evaluate", "reconstruction", "--shards", p("heldout", "images"),
                                               "--vae", vae, "--output", p("evaluate_reconstruction.json")])

        results = {**caption_accuracy(p("captions"), references), **t2i_color_accuracy(p("generated")), **quality,
                   "heldout_images": len(references), "train_pairs": cfg.train, "seconds": round(time.time() - t0)}
        atomic_write_json(p("demo_results.json"), results)
        # The report is rewritten on every run: it shows the results just computed.
        log.info("report\n$ %s", shlex.join(["lverse", "report", self.out, "--images", p("heldout", "images")]))
        from lverse.pipeline.report import write_report
        results["report"] = write_report(self.out, images=p("heldout", "images"), title="lverse demo")
        return results

    def vae_values(self) -> dict:
        """The train-vae config of the demo (``VAETrainConfig`` fields)."""
        return {
            "run_dir": self.path("augvae"), "shards": self.path("images"), "preset": "tiny-ml",
            "ml_steps": self.cfg.vae_ml_steps, "sl_steps": self.cfg.vae_sl_steps,
            "batch_size": 16, "lr": 1e-3, "warmup_steps": 20, "crop_ratio": 0.9,
            # Cosine over the ceiling: at a constant 1e-3 the held-out PSNR jumped by up to 8 dB
            # between evaluations late in training, and the hardest seed took 2800 SL steps to reach
            # the target; decaying, it rose steadily and took 1000-1200 (docs/demo.md).
            "schedule": "cosine", "min_lr_ratio": 0.05,
            # LPIPS needs VGG weights, which cannot be downloaded here; a random VGG's "perceptual"
            # loss is noise that costs a second a step. Flat synthetic shapes need only MSE.
            "perceptual_weight": 0.0, "workers": 1, "seed": self.cfg.seed, "log_every": 25, "sample_every": 100,
            "checkpoint_every": 200, "keep_checkpoints": 1,
            # The stopping rule reads a training shard, so the held-out images stay unseen until the gate.
            "eval_shards": self.path("images", "00000.tar"), "eval_every": 100, "target_psnr": VAE_TARGET_PSNR}

    def check_vae(self, vae: str) -> dict:
        """The AugVAE gate: refuse to train BiART on a tokenizer that loses the shapes' colours
        (``VAE_GATE``), minutes before text-to-image would fail on it."""
        quality = vae_quality(vae, self.path("heldout", "images"))
        judged = self.cfg.min_accuracy > 0
        log.info("AugVAE on the held-out images: %.1f dB PSNR, shape colour kept in %.0f%% (gate: %.0f dB, %.0f%%)",
                 quality["vae_psnr"], 100 * quality["vae_color_kept"], VAE_GATE["vae_psnr"],
                 100 * VAE_GATE["vae_color_kept"])
        if judged:  # --min-accuracy 0 judges nothing: the tiny runs of the tests pass untrained models on
            check_vae_gate(quality, vae)
        return quality

    def server(self, tsv: dict[str, str]):
        """The synthetic set's HTTP server, for the download stages (None when both are done).

        The TSVs name the server's port; a rerun keeps them (download refuses a changed input in
        the same folder) and serves on the same port again."""
        from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet
        if all(os.path.exists(self.path("_done", f"{s}.json")) for s in ("download", "download-heldout")):
            return None
        data = SyntheticSet(seed=self.cfg.seed, train=self.cfg.train, heldout=self.cfg.heldout,
                            image_size=self.cfg.image_size)
        port = 0
        if os.path.exists(tsv["train"]):
            with open(tsv["train"], encoding="utf-8") as f:
                port = urlparse(f.readline().rstrip("\n").split("\t")[1]).port
        try:
            server = SyntheticServer(data, port=port, slow_seconds=6.0)
        except OSError as e:
            raise InputError(f"port {port} of the synthetic server (named in {tsv['train']}) is taken ({e}); "
                               "free it, or use another --output") from e
        if not port:
            server.write_tsv(self.path("data"), bad_urls=True)
        log.info("serving %d train and %d held-out synthetic pairs on %s (plus a few bad URLs, to show how they "
                 "are counted)", data.train, data.heldout, server.url)
        return server

    def references(self) -> dict[str, str]:
        """key -> caption of every downloaded held-out image."""
        from lverse.core.shards import expand_shards, iter_samples
        refs = {}
        for shard in expand_shards(self.path("heldout", "images")):
            for sample in iter_samples(shard):
                if "txt" in sample:
                    refs[sample["__key__"]] = sample["txt"].decode("utf-8")
        if not refs:
            raise InputError(f"no held-out images were downloaded into {self.path('heldout', 'images')}")
        return refs


# -- the two accuracies ------------------------------------------------------------------------

def _truth(caption: str) -> tuple[str, str] | None:
    from lverse.preprocessing.synthetic import COLORS, SHAPES
    m = re.match(rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)}) ", caption)
    return (m.group(1), m.group(2)) if m else None


def caption_accuracy(folder: str, references: dict[str, str]) -> dict:
    """Share of held-out images whose caption names their colour and shape (module doc); of the
    reranked caption and of the first candidate."""
    rows = [r for path in sorted(glob.glob(os.path.join(folder, "*.parquet")))
            for r in read_captions(path).to_pylist()]
    right = {"caption_accuracy": 0, "caption_accuracy_first_candidate": 0}
    judged = 0
    for r in rows:
        truth = _truth(references.get(r["key"], ""))
        if truth is None:
            continue
        judged += 1
        phrase = re.compile(rf"\b{truth[0]} {truth[1]}\b")
        right["caption_accuracy"] += bool(r["caption"] and phrase.search(r["caption"]))
        first = (r.get("candidates") or [r["caption"]])[0]
        right["caption_accuracy_first_candidate"] += bool(first and phrase.search(first))
    if not judged:
        raise InputError(f"no caption of {folder} matches a held-out reference")
    return {k: v / judged for k, v in right.items()} | {"captions_judged": judged}


def shape_color(image) -> str | None:
    """The colour of the shape in an (H, W, 3) uint8 numpy picture by the rule of the module doc,
    or None when no second colour covers MIN_SHAPE_SHARE of it."""
    import numpy as np

    from lverse.preprocessing.synthetic import COLORS
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names], dtype=np.float32)
    pixels = image.reshape(-1, 3).astype(np.float32)
    nearest = ((pixels[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    counts = np.bincount(nearest, minlength=len(names))
    background = counts.argmax()
    counts[background] = 0
    shape = counts.argmax()
    return names[shape] if counts[shape] >= MIN_SHAPE_SHARE * len(pixels) else None


def t2i_color_accuracy(folder: str) -> dict:
    """Share of prompts whose generated image shows the prompted colour (module doc); of the
    reranked image and of the first candidate."""
    import numpy as np
    from PIL import Image
    right = {"t2i_color_accuracy": 0, "t2i_color_accuracy_first_candidate": 0}
    judged = 0
    for path in sorted(glob.glob(os.path.join(folder, "*", "result.json"))):
        with open(path) as f:
            truth = _truth(json.load(f)["prompt"])
        if truth is None:
            continue
        judged += 1
        for key, name in (("t2i_color_accuracy", "best.png"),
                          ("t2i_color_accuracy_first_candidate", os.path.join("candidates", "00.png"))):
            with Image.open(os.path.join(os.path.dirname(path), name)) as im:
                right[key] += shape_color(np.asarray(im.convert("RGB"))) == truth[0]
    if not judged:
        raise InputError(f"{folder} holds no generated image of a synthetic prompt")
    return {k: v / judged for k, v in right.items()} | {"prompts_judged": judged}


def check_vae_gate(quality: dict, vae: str, gate: dict = VAE_GATE) -> None:
    """Raise StageFailed, saying what to change, when ``quality`` (``vae_quality``) is below ``gate``."""
    short = [f"{k} {quality[k]:.3g} < {v}" for k, v in gate.items() if quality[k] < v]
    if short:
        raise StageFailed(
            f"the AugVAE {vae} is too weak for text-to-image ({', '.join(short)} on the held-out images): "
            "BiART would learn colours its tokens do not keep. Run the demo with another --seed and another "
            "--output (docs/demo.md says how often this was measured to happen)")


def vae_quality(vae_path: str, shards: str) -> dict:
    """How well an AugVAE keeps what text-to-image is judged on, over the held-out images: mean
    PSNR of the reconstructions and the share of images whose reconstructed shape shows the
    colour of the caption (``shape_color``, the same judge as ``t2i_color_accuracy``)."""
    import torch

    from lverse.core.images import decodable_images
    from lverse.model.losses import psnr
    from lverse.runtime.model_cache import load_vae
    vae = load_vae(vae_path, "cpu")
    images, truths = [], []
    for sample, image in decodable_images(shards, vae.cfg.image_size):
        truth = _truth(sample.get("txt", b"").decode("utf-8"))
        if truth is not None:
            images.append(torch.from_numpy(image))
            truths.append(truth[0])
    if not images:
        raise InputError(f"no held-out image of a synthetic caption in {shards}")
    x = torch.stack(images)
    recon = vae.reconstruct(x)
    pictures = ((recon + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    kept = sum(shape_color(p) == t for p, t in zip(pictures, truths))
    return {"vae_psnr": float(psnr((x + 1) / 2, (recon + 1) / 2).mean()), "vae_color_kept": kept / len(truths),
            "vae_images": len(truths)}
