"""The train-vae stage: AugVAE-ML training, conversion to SL, SL fine-tuning; data-parallel.

``lverse train-vae --config VAE.yaml`` runs ``train_vae(cfg)`` in every process of the job
(torchrun, ``deepspeed``, or ``srun`` one task per GPU; see ``distributed.py``). Steps
``[0, ml_steps)`` train the ML model; at ``ml_steps`` it is converted to SL (``ml_to_sl``: fresh
connectors) and steps ``[ml_steps, ml_steps + sl_steps)`` fine-tune it. ``augvae-ml.safetensors``
and ``augvae-sl.safetensors`` are written into the run folder at the end of each phase.

Data-parallel with DistributedDataParallel, ``broadcast_buffers=False``: the EMA codebook is not
copied from rank 0 each step but kept identical by the quantizer itself, which all-reduces its
counts and sums (``model/quantizer.py``); the run checks that the codebooks agree across ranks at
every log step and logs the largest difference (``codebook_max_diff``, expected 0).

Loss: MSE + 0.1 LPIPS(VGG) + commitment (``model/losses.py``); AdamW betas (0.9, 0.999), weight
decay 1e-5, lr 4.5e-6 x global batch (the paper's), after an optional warmup per phase either
constant (the default), a cosine decay over the phase, or the paper's rule, halved whenever the
training loss stops improving (``plateau``: judged every ``log_every`` steps, ``patience``
intervals without a ``plateau_threshold`` relative improvement; the training core's ``Schedule``
and ``Plateau``, whose state checkpoints carry, so resume stays exact). Images: a random square
crop of 75-100% of the shorter side, resized to the model's size, in [-1, 1] (the paper's "random
crop ratio 0.75").

Not elastic, unlike BiART training (``lverse slurm submit train --elastic``): the data order is per
reader slot (``runtime/data.Stream``: the shards split among ranks x workers, each slot read from
``step`` micro-batches on), and the global batch is ``batch_size`` x ranks with no gradient
accumulation to keep it, so a run resumed on another number of ranks reads another sample order
with another global batch and lr: a different run, not the same one continued on the ranks left.
Making it elastic needs BiART's global sample order (``runtime/data.GlobalOrder``) and
``plan_batch``'s micro-steps here. A start on another number of ranks is recorded all the same
(``runtime/metrics.py``, event ``reformed``).

Resume, checkpoints, RNG and stop signals are the training core's, as in BiART training
(``runtime/trainer.py``): a checkpoint folder counts once its ``lverse.json`` is written, RNG
reseeded from (seed, step, rank); the data position is ``step`` micro-batches. SIGTERM, SIGUSR1
and SIGINT make every rank checkpoint at the same next step and exit 0 (``stopped.json``).
Codebook usage (perplexity, dead codes) is counted with ``bincount``, never a one-hot.

Held-out evaluation (``eval_shards``): every ``eval_every`` steps and at the end of each phase,
rank 0 reconstructs the first ``eval_images`` held-out images and logs their mean PSNR
(``eval_psnr``). With ``target_psnr`` the SL phase ends at the first evaluation that reaches it,
so ``sl_steps`` becomes a ceiling: small models train with a loss that still jumps about at the
end, and how many steps one needs differs between seeds and machines (docs/demo.md). The
checkpoint written there records ``reached_target``, so a rerun does not train on.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lverse.core.errors import InputError
from lverse.core.files import atomic_output
from lverse.core.images import decodable_images
from lverse.core.shards import expand_shards, image_shard_counts, read_tar
from lverse.model.augvae import PRESETS, AugVAE, ml_to_sl
from lverse.model.checkpoint import save_model
from lverse.model.losses import ReconstructionLoss, psnr
from lverse.model.quantizer import codebook_usage
from lverse.pipeline.configs import VAETrainConfig
from lverse.runtime.data import Batches, Stream, worker_errors
from lverse.runtime.metrics import MetricsLogger
from lverse.runtime.trainer import (
    Checkpoint,
    Plateau,
    Process,
    Schedule,
    StopFlag,
    check_run_dir,
    clear_stop_record,
    ignore_stop_signals,
    image_grid,
    latest_checkpoint,
    reseed,
    save_image,
    set_lr,
    start_process,
    write_checkpoint,
    write_run_config,
)

log = logging.getLogger(__name__)


class ImageBatch:
    """img2dataset samples -> (B, 3, size, size) float32 in [-1, 1], a random crop per sample drawn
    from the sample's own RNG. A sample that does not decode is left out (and logged)."""

    def __init__(self, size: int, crop_ratio: float):
        self.size, self.crop_ratio = size, crop_ratio

    def __call__(self, samples: list[dict], rngs: list[np.random.Generator]) -> torch.Tensor:
        out = [im for im in (self._one(s, r) for s, r in zip(samples, rngs)) if im is not None]
        if not out:
            raise InputError(f"no image of samples {[s['__key__'] for s in samples]} decodes")
        return torch.from_numpy(np.stack(out))

    def _one(self, sample: dict, rng: np.random.Generator) -> np.ndarray | None:
        from PIL import Image
        try:
            with Image.open(io.BytesIO(sample.get("jpg", b""))) as im:
                im = im.convert("RGB")
                side = int(min(im.size) * rng.uniform(self.crop_ratio, 1.0))
                left = int(rng.integers(im.width - side + 1))
                top = int(rng.integers(im.height - side + 1))
                im = im.crop((left, top, left + side, top + side)).resize((self.size, self.size), Image.BICUBIC)
                return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            log.warning("sample %s does not decode (%s); left out of its batch", sample.get("__key__"), e)
            return None


def _phase_model(cfg: VAETrainConfig, step: int, trained_ml, resume: Checkpoint | None):
    """The model to train from ``step`` on: ML before ``ml_steps``; after, the SL conversion of the
    ML model just trained (``trained_ml``), or of the one checkpointed at the switch, or the SL
    structure a later checkpoint is loaded into. Connectors are drawn from ``seed`` every time,
    so a run resumed at the switch converts exactly as an uninterrupted one."""
    if cfg.preset not in PRESETS or PRESETS[cfg.preset].variant != "ml":
        raise InputError(f"preset {cfg.preset!r} must be an ML preset: "
                         f"{sorted(k for k, v in PRESETS.items() if v.variant == 'ml')}")
    ml = trained_ml
    if ml is None:
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        ml = AugVAE.from_pretrained(cfg.init) if cfg.init else AugVAE(PRESETS[cfg.preset])
        if ml.cfg.variant != "ml":
            raise InputError(f"init {cfg.init} is an SL model; train-vae starts from an ML model")
        if step >= cfg.ml_steps and resume and resume.step == cfg.ml_steps and cfg.ml_steps > 0:
            state = torch.load(os.path.join(resume.folder, "state.pt"), map_location="cpu", weights_only=True)
            ml.load_state_dict(state["model"])
    if step < cfg.ml_steps:
        return ml
    torch.manual_seed(cfg.seed + 1)
    return ml_to_sl(ml.cpu())


def train_vae(cfg: VAETrainConfig) -> dict:
    """Run (or resume) AugVAE training in this process; returns the last logged metrics."""
    check_run_dir(cfg.run_dir)
    proc = start_process(cfg.master_port)
    clear_stop_record(cfg.run_dir, proc.rank)
    stream, total = _stream(cfg), cfg.ml_steps + cfg.sl_steps
    schedule, global_batch = Schedule.of(cfg), cfg.batch_size * proc.world
    peak_lr = cfg.lr if cfg.lr is not None else cfg.lr_per_sample * global_batch
    resume = latest_checkpoint(cfg.run_dir, proc.rank)
    step = resume.step if resume else 0
    if resume and resume.meta["reached_target"]:  # ended at target_psnr before: the SL model is written
        total = step
    torch.manual_seed(cfg.seed)  # LPIPS without a VGG checkpoint is random: the same one on every run
    loss_fn = ReconstructionLoss(cfg.perceptual_weight, cfg.vgg_checkpoint).to(proc.device)
    logger = MetricsLogger(cfg.run_dir, proc.rank, cfg.tensorboard, world_size=proc.world)
    write_run_config(cfg.run_dir, cfg, proc.rank)
    held_out = _eval_images(cfg, proc.device) if proc.rank == 0 and cfg.eval_shards else None
    phase, meter, plateau, started = None, _Meter(cfg, proc, step), None, step
    stop = StopFlag(cfg.run_dir, proc.rank)
    while step < total:
        if phase is None or phase.name != _phase_name(cfg, step):  # start (or resume) a phase
            phase = _Phase.start(cfg, proc, step, total, phase, resume, stream, peak_lr)
            # the phase's rule; from the checkpoint mid-phase, afresh when a phase starts
            mid_phase = resume is not None and resume.step == step and step != cfg.ml_steps
            state = resume.meta.get("plateau") if mid_phase else None
            plateau = Plateau.of(cfg, cfg.log_every, proc.device, state, proc.rank)
        lr = set_lr(phase.opt, schedule.lr_at(step - phase.first, phase.end - phase.first, peak_lr,
                                              plateau.scale if plateau else 1.0))
        reseed(cfg.seed, step, proc.rank)
        images = next(phase.loader).to(proc.device, non_blocking=True)
        recon, commit, indices = phase.ddp(images)
        losses = loss_fn(recon, images, commit)
        phase.opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        phase.opt.step()
        meter.add(losses)
        step += 1
        if step == started + 1:  # a start on another number of ranks is recorded (runtime/metrics.py)
            logger.first_step_done(step)
        if plateau:
            plateau.add(losses["loss"], step - phase.first, proc.world)
        if step % cfg.log_every == 0 or step == phase.end:
            logger.log(meter.metrics(step, phase, lr, indices))
        if cfg.sample_every and step % cfg.sample_every == 0 and proc.rank == 0:
            _log_reconstructions(images[:4], recon[:4], step, cfg.run_dir, logger)
        reached = False
        if cfg.eval_shards and (step % cfg.eval_every == 0 or step == phase.end):
            reached = _evaluate(cfg, phase, step, held_out, proc, logger)
            if reached and step < phase.end:
                phase.end = total = step
        # The phase's model file before the checkpoint that ends the phase: a run that dies between
        # the two resumes from the checkpoint before and writes the file again; the other way round
        # it would resume past the phase's end and never write it.
        if step == phase.end:
            _export(cfg, phase, proc.rank)
        if stop.holding(step, started):  # a test's fixed point (LVERSE_HOLD_AT_STEP)
            stop.wait()
        (stopping,) = stop.agreed(proc.device)
        if step % cfg.checkpoint_every == 0 or step == phase.end or stopping:
            rule = {"plateau": plateau.state(proc.world)} if plateau else {}  # collective
            _save(cfg, phase.model, phase.opt, step, proc.rank, reached, rule)
        if stopping:
            stop.finish(step)
            logger.close()
            return {**meter.last, "stopped_at": step}
    dist.barrier()
    logger.close()
    return meter.last


def _stream(cfg: VAETrainConfig):
    """The shards' sample stream; refuses a run without steps or shards."""
    shards = expand_shards(cfg.shards)
    if not shards:
        raise FileNotFoundError(f"shards {cfg.shards!r} matches no image shard")
    if cfg.ml_steps + cfg.sl_steps <= 0:
        raise InputError("ml_steps + sl_steps must be positive")
    return Stream(tuple(shards), tuple(image_shard_counts(shards)), cfg.seed, cfg.shuffle_shards, cfg.resampled)


def _phase_name(cfg: VAETrainConfig, step: int) -> str:
    return "ml" if step < cfg.ml_steps else "sl"


@dataclass
class _Phase:
    """ML or SL: its model, optimizer, data and steps ``[first, end)``."""
    name: str
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    ddp: torch.nn.parallel.DistributedDataParallel
    loader: Iterator[torch.Tensor]
    first: int
    end: int

    @classmethod
    def start(cls, cfg: VAETrainConfig, proc: Process, step: int, total: int, previous: _Phase | None,
              resume: Checkpoint | None, stream, peak_lr: float) -> _Phase:
        """The phase of ``step``, continuing from the previous phase's model or from ``resume``."""
        name = _phase_name(cfg, step)
        model = _phase_model(cfg, step, previous.model if previous and name == "sl" else None, resume)
        model = model.to(proc.device)
        opt = torch.optim.AdamW(model.parameters(), lr=peak_lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        if resume and resume.step == step and step != cfg.ml_steps:
            state = torch.load(os.path.join(resume.folder, "state.pt"), map_location=proc.device, weights_only=True)
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            if proc.rank == 0:
                log.info("resumed from %s at step %d (%s)", resume.folder, step, name)
        ddp = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
        batches = Batches(stream, ImageBatch(model.cfg.image_size, cfg.crop_ratio), cfg.batch_size, proc.rank,
                          proc.world, cfg.workers, start_batches=step, read=read_tar)
        loader = worker_errors(iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=cfg.workers,
                                                                prefetch_factor=4 if cfg.workers else None,
                                                                worker_init_fn=ignore_stop_signals)))
        first, end = (0, cfg.ml_steps) if name == "ml" else (cfg.ml_steps, total)
        if proc.rank == 0:
            log.info("AugVAE-%s: %.1fM parameters, %d tokens per image, %d ranks, global batch %d, "
                     "lr %.3g, steps %d-%d", name.upper(), sum(p.numel() for p in model.parameters()) / 1e6,
                     model.cfg.num_tokens, proc.world, cfg.batch_size * proc.world, peak_lr, first + 1, end)
        return cls(name, model, opt, ddp, loader, first, end)


class _Meter:
    """Losses between log steps, averaged over the ranks; codebook usage; images per second."""

    def __init__(self, cfg: VAETrainConfig, proc: Process, step: int):
        self.cfg, self.proc = cfg, proc
        self.sums, self.last_step, self.t0, self.last = torch.zeros(4, device=proc.device), step, time.time(), {}

    def add(self, losses: dict) -> None:
        self.sums += torch.stack([losses["loss"].detach(), losses["mse"], losses["lpips"], losses["commit"]])

    def metrics(self, step: int, phase: _Phase, lr: float, indices: torch.Tensor) -> dict:
        """Collective: the losses are all-reduced, the codebooks compared."""
        world, steps = self.proc.world, step - self.last_step
        dist.all_reduce(self.sums)
        perplexity, dead = codebook_usage(indices.detach(), phase.model.cfg.codebook_size)
        mean = (self.sums / (world * steps)).tolist()
        self.last = {"step": step, "phase": phase.name, "loss": mean[0], "mse": mean[1], "lpips": mean[2],
                     "commit": mean[3], "lr": lr, "perplexity": perplexity, "dead_codes": dead,
                     "codebook_max_diff": _codebook_spread(phase.model),
                     "images_per_s": self.cfg.batch_size * world * steps / (time.time() - self.t0)}
        self.sums, self.last_step, self.t0 = torch.zeros(4, device=self.proc.device), step, time.time()
        return self.last


def _codebook_spread(model) -> float:
    """Largest difference between this rank's codebook and any other rank's (0 when in sync)."""
    embed = model.codebook.embed.detach()
    lo, hi = embed.clone(), embed.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return float((hi - lo).abs().max())


def _save(cfg: VAETrainConfig, model, opt, step: int, rank: int, reached_target: bool = False,
          extra: dict | None = None) -> None:
    """Rank 0 writes model and optimizer: the ranks hold identical replicas (DDP; codebook all-reduced).
    ``extra`` goes into the checkpoint's marker (the plateau rule's state)."""
    def write(folder: str) -> None:
        with atomic_output(os.path.join(folder, "state.pt")) as tmp:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp)
    write_checkpoint(cfg.run_dir, step, {"variant": model.cfg.variant, "reached_target": reached_target,
                                         **(extra or {})}, cfg.keep_checkpoints, rank, write)


def _export(cfg: VAETrainConfig, phase: _Phase, rank: int) -> None:
    """``augvae-ml.safetensors`` / ``augvae-sl.safetensors`` at the end of a phase (rank 0)."""
    if rank == 0:
        path = os.path.join(cfg.run_dir, f"augvae-{phase.name}.safetensors")
        save_model(phase.model, path)
        log.info("wrote %s", path)


def _evaluate(cfg: VAETrainConfig, phase: _Phase, step: int, held_out, proc: Process, logger: MetricsLogger) -> bool:
    """Log the held-out PSNR (collective); whether SL reached ``target_psnr``."""
    psnr = _eval_psnr(phase.model, held_out, proc.device)
    logger.log({"step": step, "phase": phase.name, "eval_psnr": psnr})
    reached = phase.name == "sl" and cfg.target_psnr is not None and psnr >= cfg.target_psnr
    if reached and step < phase.end and proc.rank == 0:
        log.info("held-out PSNR %.2f dB reached target_psnr %.2f at step %d: SL ends here",
                 psnr, cfg.target_psnr, step)
    return reached


def _eval_images(cfg: VAETrainConfig, device) -> torch.Tensor:
    """The first ``eval_images`` decodable held-out images, centre crops at the model's size."""
    if not expand_shards(cfg.eval_shards):
        raise FileNotFoundError(f"eval_shards {cfg.eval_shards!r} matches no image shard")
    images = [torch.from_numpy(image) for _, image in
              itertools.islice(decodable_images(cfg.eval_shards, PRESETS[cfg.preset].image_size), cfg.eval_images)]
    if not images:
        raise InputError(f"eval_shards {cfg.eval_shards!r} holds no decodable image")
    return torch.stack(images).to(device)


def _eval_psnr(model, images: torch.Tensor | None, device) -> float:
    """Mean PSNR of ``images``' reconstructions on rank 0, the same number on every rank."""
    value = torch.zeros(1, device=device)
    if images is not None:
        model.eval()
        recon = model.reconstruct(images)
        model.train()
        value[0] = psnr((images + 1) / 2, (recon + 1) / 2).mean()
    dist.broadcast(value, src=0)
    return float(value)


def _log_reconstructions(images, recon, step: int, run_dir: str, logger: MetricsLogger) -> None:
    grid = image_grid(images, recon)  # originals above reconstructions
    save_image(os.path.join(run_dir, "samples", f"recon_{step:08d}.png"), grid)
    logger.image("reconstructions", grid, step)
