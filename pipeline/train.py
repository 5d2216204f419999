"""The train stage: BiART under DeepSpeed ZeRO, alternating directions, resumable to the step.

``lverse train --config RUN.yaml [--deepspeed NAME]`` runs ``train(cfg)`` in every
process of the job (``deepspeed``/torchrun on one node, ``srun`` one task per GPU under SLURM).

The loop, in nanoGPT's order: set the lr (a pure function of the step) -> micro-steps (direction
text->image on even steps, image->text on odd ones, the same on every rank) -> DeepSpeed's step
(clipping, loss scaling, ZeRO) -> log -> samples -> checkpoint. What a run needs to continue
exactly is in its checkpoint: model, optimizer, loss scaler (DeepSpeed's files) and the step. The
rest is a function of the step: the lr; the RNG (reseeded from (seed, step, rank) before every
step); the data position (samples consumed in one global order, see ``runtime/data.py``). A run
killed at any moment and resumed therefore logs the same losses as an uninterrupted one. The schedule, the
reseeding, the stop signal and the checkpoint lifecycle are the training core's
(``runtime/trainer.py``), shared with AugVAE and CLIP training.

Checkpoints: ``run_dir/checkpoints/step_NNNNNNNN/``, each rank's files decided by DeepSpeed and
written by lverse's writer (copied to host memory, then written in the background while training
goes on), then ``lverse.json`` written into it last (atomically) once every rank's files are
durable: a folder without it is a partial write and is never resumed from (nor counted among the
``keep_checkpoints`` kept). Resuming a ZeRO checkpoint on another number of ranks converts it to
DeepSpeed's universal format first (``universal/step_NNNNNNNN/``); one of stage 0 (plain data
parallel, ``ds_configs/ddp_*.json``: every rank holds the whole state, rank 0 writes it into one
file) loads on any number of ranks as it is. A resume across stage 0 and ZeRO is refused (their
optimizer state lives in other files). The data order continues at the next sample whatever the
number of ranks, and a run resumed with its config's batch settings on another number of ranks
keeps the checkpoint's global batch (``plan_batch``: fewer ranks take more micro-steps).
SIGTERM, SIGUSR1 and SIGINT checkpoint and stop at the same step on every rank.

The model meets the hardware in one place, ``wrap`` (runtime/deepspeed.py: fused LayerNorm,
compiled blocks, the optimizer, the engine); the choices are printed at start.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from lverse.core.errors import InputError
from lverse.core.files import atomic_write_json
from lverse.core.shards import expand_shards, read_tar, token_shard_counts
from lverse.core.storage import is_url
from lverse.model.augvae import AugVAEConfig
from lverse.model.biart import PRESETS, BiART, BiARTConfig, Direction, prompt_for
from lverse.model.checkpoint import check_provenance, provenance_of, read_config, save_model
from lverse.pipeline.configs import TrainConfig
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.data import GlobalBatches, GlobalOrder, TokenBatch, batch_loader, handover_chunk, micro_batches
from lverse.runtime.deepspeed import (
    WriterEngine,
    deepspeed_loads,
    layout_difference,
    load_ds_config,
    load_stage0_fp32,
    loss_scale,
    micro_step,
    precision,
    to_universal,
    wrap,
    zero_stage,
)
from lverse.runtime.metrics import MetricsLogger
from lverse.runtime.model_cache import load_vae
from lverse.runtime.tasks import StageFailed
from lverse.runtime.token_index_build import ensure_index
from lverse.runtime.trainer import (
    MARKER,
    Checkpoint,
    Checkpoints,
    FileWriter,
    Plateau,
    Process,
    Schedule,
    StopFlag,
    check_run_dir,
    clear_stop_record,
    complete_checkpoints,
    ignore_stop_signals,
    image_grid,
    latest_checkpoint,
    measure_peak_flops,
    read_checkpoint_meta,
    read_run_config,
    reseed,
    save_image,
    set_lr,
    start_process,
    wait_for_ranks,
    write_run_config,
)

log = logging.getLogger(__name__)

def ds_config(cfg: TrainConfig, world_size: int, batch: tuple[int, int] | None = None) -> dict:
    """The run's DeepSpeed config: its ``deepspeed`` file with the batch sizes and clipping of ``cfg``
    (``batch``: (micro_batch_size, grad_accum) instead of the config's, see ``plan_batch``)."""
    micro_batch_size, grad_accum = batch or (cfg.micro_batch_size, cfg.grad_accum)
    return load_ds_config(cfg.deepspeed, world_size, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                          grad_clip=cfg.optim.grad_clip)


# ---------------------------------------------------------------------------------------------
# the run

def build_model_config(cfg: TrainConfig):
    """The preset's transformer with the vocabulary and lengths of this run's tokenizer and AugVAE,
    and the run's activation checkpointing."""
    if cfg.model.preset not in PRESETS:
        raise InputError(f"model.preset {cfg.model.preset!r} is not one of {sorted(PRESETS)}")
    if "activation_checkpointing" in cfg.model.overrides:
        raise InputError("model.overrides: set activation_checkpointing at the top of the run config")
    for name, path in (("data.tokenizer", cfg.data.tokenizer), ("data.vae", cfg.data.vae)):
        if not path or not os.path.isfile(path):
            raise FileNotFoundError(f"{name} {path!r} does not exist")
    derived = {"text_vocab": CaptionTokenizer(cfg.data.tokenizer).vocab_size}
    if cfg.data.vae.endswith(".safetensors"):
        vae = read_config(cfg.data.vae, AugVAEConfig)
        derived.update(image_vocab=vae.codebook_size, image_len=vae.num_tokens)
    clash = {k: (v, derived[k]) for k, v in cfg.model.overrides.items() if k in derived and derived[k] != v}
    if clash:
        raise InputError(f"model.overrides {clash} (given, from the data) disagree with the tokenizer / AugVAE; "
                         "drop them: they are read from data.tokenizer and data.vae")
    try:
        return dataclasses.replace(PRESETS[cfg.model.preset], **{**cfg.model.overrides, **derived},
                                   activation_checkpointing=cfg.activation_checkpointing)
    except TypeError as e:
        raise InputError(f"model.overrides: {e}; the fields are those of BiARTConfig") from e


def train(cfg: TrainConfig) -> dict:
    """Run (or resume) training in this process; returns the last logged metrics."""
    check_run_dir(cfg.run_dir)
    proc = _start_process(cfg)
    clear_stop_record(cfg.run_dir, proc.rank)
    _check_precision(cfg, proc.world)  # before the first collective: no rank waits on one that refused
    resume = latest_checkpoint(cfg.run_dir, proc.rank)
    run = plan_run(cfg, proc, resume)
    rank = run.proc.rank
    # before the model: a stale index fails fast
    samples = ensure_index(run.shards, run.provenance["vae_sha256"], rank, index_dir=token_index_dir(cfg))
    _check_resume(run, resume)
    engine, kernels, writer = build_engine(run, resume)
    start = resume.step if resume else 0
    loader = data_loader(run, samples, start, resume)
    meter = Meter(run, engine.module.flops_per_token(), start)
    _announce(run, engine.module, kernels, meter.peak_flops)
    logger = MetricsLogger(cfg.run_dir, rank, cfg.tensorboard, cfg.wandb and dataclasses.asdict(cfg), cfg.wandb_project,
                           run.proc.world)
    sampler = Sampler(cfg, run.bcfg, run.shards[0], rank) if cfg.sample_every else None
    stop = StopFlag(cfg.run_dir, rank)
    plateau = Plateau.of(cfg.optim, cfg.log_every, run.proc.device, resume.meta.get("plateau") if resume else None,
                         rank)
    checkpoints = Checkpoints(cfg.run_dir, cfg.keep_checkpoints, rank, writer, derived=("universal",))
    last_checkpoint = time.monotonic()
    for step in range(start, cfg.steps):
        lr = set_lr(engine.optimizer, run.schedule.lr_at(step, cfg.steps, run.peak_lr,
                                                         plateau.scale if plateau else 1.0))
        reseed(cfg.seed, step, rank)
        direction = Direction(step % 2)  # text->image on even steps, image->text on odd: all ranks agree
        step_loss = 0.0
        for _ in range(run.grad_accum):
            batch = next(loader)
            losses = micro_step(engine, batch["text"], batch["image"], direction)
            meter.add(direction, losses)
            if plateau:
                step_loss = step_loss + losses[0] / run.grad_accum
        done = step + 1
        if step == start:  # a start on another number of ranks is recorded (runtime/metrics.py)
            logger.first_step_done(done)
        if plateau:
            plateau.add(step_loss, done, run.proc.world)
        if done % cfg.log_every == 0 or done == cfg.steps:
            logger.log(meter.metrics(done, lr, engine))
        with meter.paused():  # samples and checkpoints are left out of tokens/s
            if stop.holding(done, start):  # a test's fixed point (LVERSE_HOLD_AT_STEP)
                checkpoints.finish()
                _log_checkpoints(cfg, rank, checkpoints.completed())
                stop.wait()
            if sampler and done % cfg.sample_every == 0:
                sampler.run(engine, done, logger, run.ds)
            minutes = (time.monotonic() - last_checkpoint) / 60
            stopping, due, writing = stop.agreed(run.proc.device, 0 < cfg.checkpoint_every_minutes <= minutes,
                                                 checkpoints.writing())
            checkpoints.settle(writing)
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stopping or due:
                save_checkpoint(engine, run, done, checkpoints, plateau)
                last_checkpoint = time.monotonic()
            _log_checkpoints(cfg, rank, checkpoints.completed())
        if stopping:
            checkpoints.finish()
            _log_checkpoints(cfg, rank, checkpoints.completed())
            stop.finish(done)
            logger.close()
            return {**meter.last, "stopped_at": done}
    checkpoints.finish()
    _log_checkpoints(cfg, rank, checkpoints.completed())
    if cfg.export:
        export_checkpoint(cfg.run_dir, os.path.join(cfg.run_dir, "biart.safetensors"), rank=rank)
    logger.close()
    if rank == 0:  # the elastic job script's sign that training ended (slurm/train_elastic.sbatch)
        atomic_write_json(_finished_marker(cfg), {"step": cfg.steps})
    return meter.last


@dataclass
class Run:
    """What ``train`` derives from its config before any work, the same on every rank."""
    cfg: TrainConfig
    proc: Process
    bcfg: BiARTConfig
    ds: dict  # the DeepSpeed config
    shards: list[str]
    counts: list[int]  # samples per shard
    schedule: Schedule
    peak_lr: float
    micro_batch_size: int  # the config's, or what keeps a resumed run's global batch (``plan_batch``)
    grad_accum: int  # likewise
    global_batch: int
    data_key: dict  # what the data order depends on, and where this run's steps start in it (``origin``)
    provenance: dict  # the AugVAE's and tokenizer's hashes (model/checkpoint.py), recorded in every checkpoint


def _start_process(cfg: TrainConfig) -> Process:
    import deepspeed
    proc = start_process(cfg.master_port)
    # DeepSpeed's communication adopts the process group (no MPI discovery: the launcher's variables are set)
    try:
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   auto_mpi_discovery=False)
    except RuntimeError as e:
        # On CPU ranks DeepSpeed builds a communication op the first time (seconds of C++): a build
        # killed midway, or no C++ compiler, fails here. No bug of the run: one line, status 1.
        if not str(e).startswith("Error building extension"):
            raise
        log.error("%s", e)  # the compiler's output
        first = str(e).splitlines()[0].rstrip(": ")
        raise StageFailed(f"{first}: DeepSpeed could not build its op (the compiler's output is above); run the "
                          "same command again, and if it fails the same way, remove that op's folder under "
                          "TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions) or install a C++ compiler"
                          ) from None
    return proc


def token_index_dir(cfg: TrainConfig) -> str | None:
    """Where the token index of ``data.shards`` is (``DataConfig.index_dir``)."""
    if cfg.data.index_dir is not None:
        return cfg.data.index_dir
    return os.path.join(cfg.run_dir, "token_index") if is_url(cfg.data.shards) else None


def plan_run(cfg: TrainConfig, proc: Process, resume: Checkpoint | None = None) -> Run:
    """Check the config against the data and the hardware; derive the model config, the batch (kept
    from ``resume`` on another number of ranks, ``plan_batch``) and the lr."""
    bcfg = build_model_config(cfg)
    shards = expand_shards(cfg.data.shards)
    if not shards:
        raise FileNotFoundError(f"data.shards {cfg.data.shards!r} matches no token shard")
    provenance = provenance_of(cfg.data.vae, cfg.data.tokenizer)
    counts = token_shard_counts(shards, provenance["vae_sha256"])
    micro_batch_size, grad_accum = plan_batch(cfg, proc.world, resume)
    if (micro_batch_size, grad_accum) != (cfg.micro_batch_size, cfg.grad_accum) and proc.rank == 0:
        log.info("global batch %d of checkpoint %s kept on %d ranks: micro_batch_size %d x grad_accum %d (the "
                 "config's %d x %d on %d ranks)", resume.meta["data"]["global_batch"], resume.folder, proc.world,
                 micro_batch_size, grad_accum, cfg.micro_batch_size, cfg.grad_accum, resume.meta["world_size"])
    ds = ds_config(cfg, proc.world, (micro_batch_size, grad_accum))
    global_batch = micro_batch_size * grad_accum * proc.world
    peak_lr = cfg.optim.lr if cfg.optim.lr is not None else cfg.optim.lr_per_sample * global_batch
    # the order's inputs, and where the run's positions start: step ``origin[0]`` begins at sample
    # ``origin[1]`` and each step takes global_batch more (data_loader moves it on a resume)
    data_key = {"seed": cfg.seed, "resampled": cfg.data.resampled, "shards": [os.path.basename(s) for s in shards],
                "global_batch": global_batch, "origin": [0, 0]}
    return Run(cfg, proc, bcfg, ds, shards, counts, Schedule.of(cfg.optim, "optim."), peak_lr, micro_batch_size,
               grad_accum, global_batch, data_key, provenance)


def _check_precision(cfg: TrainConfig, world: int) -> None:
    if precision(ds_config(cfg, world, (cfg.micro_batch_size, cfg.grad_accum))) == "fp16" \
            and not torch.cuda.is_available():
        raise InputError(f"{cfg.deepspeed} trains in fp16, which needs a CUDA device (DeepSpeed's CPU accelerator "
                         "has no fp16); use a bf16 or fp32 config on a CPU")


def plan_batch(cfg: TrainConfig, world: int, resume: Checkpoint | None) -> tuple[int, int]:
    """(micro_batch_size, grad_accum) of a run on ``world`` ranks: the config's, unless it resumes
    ``resume`` with the batch settings that checkpoint was trained with on another number of ranks
    (a job requeued on fewer nodes, an elastic job that lost one). Then the checkpoint's global
    batch is kept, so every step holds the samples it would have held and the lr stays: the largest
    micro-batch up to the config's that divides the global batch's share of a rank, with as many
    micro-steps as make up the share. Another micro_batch_size or grad_accum in the config asks for
    the global batch they give (``data_loader`` continues the order there)."""
    asked = (cfg.micro_batch_size, cfg.grad_accum)
    if resume is None or tuple(resume.meta["batch"]) != asked:
        return asked
    kept = resume.meta["data"]["global_batch"]
    split = split_batch(kept, world, cfg.micro_batch_size)
    if split is None:
        fits = ", ".join(str(n) for n in range(1, kept + 1) if kept % n == 0)
        raise InputError(f"checkpoint {resume.folder} was trained with global batch {kept}, which {world} ranks cannot "
                         f"share evenly: run on a number of ranks that divides it ({fits}), or set "
                         f"micro_batch_size and grad_accum in the config for a new global batch (micro_batch_size x "
                         f"grad_accum x {world} ranks; the data order goes on at the next sample)")
    return split


def split_batch(global_batch: int, world: int, micro_batch_size: int) -> tuple[int, int] | None:
    """(micro_batch_size, grad_accum) that make up ``global_batch`` on ``world`` ranks: the largest
    micro-batch up to ``micro_batch_size`` that divides a rank's share, and as many micro-steps as
    make up the share; None when the ranks cannot share the batch evenly."""
    if global_batch % world:
        return None
    share = global_batch // world
    micro = max(m for m in range(1, micro_batch_size + 1) if share % m == 0)
    return micro, share // micro


def check_elastic(cfg: TrainConfig, nodes: int, min_nodes: int, ranks_per_node: int) -> None:
    """Before an elastic job is submitted (`lverse slurm submit train --elastic MIN`): the global
    batch of the config on every node keeps when any number of nodes from ``min_nodes`` up is
    left (``plan_batch``), or an error that says which node counts cannot keep it and what to
    change. Checked here, not first when a node is lost: there the job could only requeue."""
    global_batch = cfg.micro_batch_size * cfg.grad_accum * nodes * ranks_per_node
    left = range(min_nodes, nodes)
    refused = [n for n in left if split_batch(global_batch, n * ranks_per_node, cfg.micro_batch_size) is None]
    if not refused:
        return
    need = math.lcm(*(n * ranks_per_node for n in left))  # what the global batch must be a multiple of
    accum = next(a for a in itertools.count(cfg.grad_accum)
                 if cfg.micro_batch_size * a * nodes * ranks_per_node % need == 0)
    raise InputError(f"--elastic {min_nodes} of --nodes {nodes}: the global batch {global_batch} (micro_batch_size "
                     f"{cfg.micro_batch_size} x grad_accum {cfg.grad_accum} x {nodes * ranks_per_node} ranks) cannot "
                     f"be shared evenly by the ranks of {' or '.join(map(str, refused))} nodes, so training could not "
                     f"go on there; make it a multiple of {need} (e.g. grad_accum {accum}), or give --elastic "
                     f"{max(refused) + 1}")


def _check_resume(run: Run, resume: Checkpoint | None) -> None:
    """Refuse a checkpoint of another model, ZeRO layout, AugVAE or tokenizer. A ``finished.json``
    is removed: this is a run given more steps."""
    cfg, rank = run.cfg, run.proc.rank
    differ = _model_differences(resume.meta["model"], run.bcfg) if resume else []
    if differ:
        raise InputError(f"checkpoint {resume.folder} is of another model ({'; '.join(differ)}): resume it with the "
                         "model config it was trained with (model.preset, model.overrides), or use a new run_dir")
    layout = layout_difference(resume.meta, run.ds) if resume else None
    if layout:
        raise InputError(f"checkpoint {resume.folder} {layout}; DeepSpeed keeps the optimizer state of the two in "
                         f"other forms and neither loads the other's: resume with a ds_config like the checkpoint's "
                         f"(deepspeed: {cfg.deepspeed} now), or use a new run_dir")
    if resume and not cfg.ignore_provenance:
        check_provenance(resume.meta["provenance"], cfg.data.vae, cfg.data.tokenizer, f"checkpoint {resume.folder}",
                         "ignore_provenance: true in the run config")
    if rank == 0 and os.path.exists(_finished_marker(cfg)):
        os.remove(_finished_marker(cfg))


def build_engine(run: Run, resume: Checkpoint | None):
    """The run's model (the same initial weights on every rank) in its DeepSpeed engine, restored
    from ``resume``, writing checkpoints through lverse's writer; returns (engine, kernel choices,
    the writer)."""
    from deepspeed.checkpoint import UNIVERSAL_CHECKPOINT_INFO
    if resume and _needs_universal(resume, run):
        run.ds.setdefault("checkpoint", {})["load_universal"] = True
    torch.manual_seed(run.cfg.seed)
    model = BiART(run.bcfg)
    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {"universal_checkpoint_version": 0.2})
    engine, kernels = wrap(model, run.ds, run.peak_lr, run.proc.device, run.cfg.optim, run.cfg.compile)
    writer = FileWriter(run.cfg.checkpoint_background)
    engine.checkpoint_engine = WriterEngine(writer)
    if resume:
        _load(engine, run, resume)
    return engine, kernels, writer


def _needs_universal(resume: Checkpoint, run: Run) -> bool:
    """A ZeRO checkpoint of another number of ranks: its partitions must be regrouped. Stage 0's
    one file holds everything and loads on any number of ranks as it is."""
    return resume.meta["world_size"] != run.proc.world and zero_stage(run.ds) > 0


def _load(engine, run: Run, resume: Checkpoint) -> None:
    """Model, optimizer and loss scaler of ``resume``; a ZeRO checkpoint of another number of ranks
    is converted to a universal checkpoint first."""
    rank, world, folder = run.proc.rank, run.proc.world, resume.folder
    if resume.meta["world_size"] != world and rank == 0 and not _needs_universal(resume, run):
        log.info("checkpoint of %d ranks, now %d: stage 0 holds the whole state in one file, loaded as it is",
                 resume.meta["world_size"], world)
    if _needs_universal(resume, run):
        if rank == 0:
            log.info("checkpoint of %d ranks, now %d: converting to a universal checkpoint",
                     resume.meta["world_size"], world)
            to_universal(folder, run.cfg.run_dir)
        wait_for_ranks()
        folder = os.path.join(run.cfg.run_dir, "universal", os.path.basename(folder))
    with deepspeed_loads(folder):
        load_path, _ = engine.load_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder),
                                              load_module_strict=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load {folder}")
    if rank == 0:
        log.info("resumed from %s at step %d", folder, resume.step)


def samples_before(run: Run, step: int) -> int:
    """Samples of the global order consumed before ``step`` (see ``origin`` in the data key)."""
    origin_step, origin_samples = run.data_key["origin"]
    return origin_samples + (step - origin_step) * run.global_batch


def data_loader(run: Run, samples, start_step: int, resume: Checkpoint | None):
    """This rank's micro-batches of ``samples`` (the token index, ``ensure_index``) from
    ``start_step`` on, in the global order (runtime/data.py): a
    resume continues at the sample after the checkpoint's last one, on any number of ranks and
    workers. With another global batch than the checkpoint's, the steps from the resume on each take
    the new global batch of samples from there (step s no longer starts at sample s x global batch);
    ``origin`` in the data key records it, so later resumes stay exact."""
    cfg, bcfg, key = run.cfg, run.bcfg, run.data_key
    if resume:
        old, done = resume.meta["data"], resume.meta["samples"]  # the checkpoint's data key, samples consumed
        changed = [k for k in ("seed", "resampled", "shards") if old[k] != key[k]]
        if changed and run.proc.rank == 0:
            log.warning("the checkpoint's data order differs (%s): this run's order goes on from sample %d",
                        ", ".join(changed), done)
        if old["global_batch"] != run.global_batch and run.proc.rank == 0:
            log.info("global batch %d, the checkpoint's %d: step %d starts at sample %d", run.global_batch,
                     old["global_batch"], resume.step, done)
        key["origin"] = [resume.step, done]
    order = GlobalOrder(len(samples), cfg.seed, cfg.data.resampled)
    make_batch = TokenBatch(cfg.data.tokenizer, bcfg.text_offset, bcfg.text_len, bcfg.image_len,
                            bcfg.image_vocab, cfg.data.bpe_dropout)
    start = samples_before(run, start_step)
    batches = GlobalBatches(samples, order, make_batch, run.micro_batch_size, run.proc.rank, run.proc.world,
                            cfg.data.workers, start, handover_chunk(run.micro_batch_size, cfg.data.workers))
    return micro_batches(batch_loader(batches, cfg.data.workers, ignore_stop_signals), run.micro_batch_size)


def _announce(run: Run, model, kernels: dict, peak_flops: float) -> None:
    """The resolved configs into the run folder, and what the run is, in the log (rank 0)."""
    cfg = run.cfg
    write_run_config(cfg.run_dir, cfg, run.proc.rank)
    if run.proc.rank:
        return
    atomic_write_json(os.path.join(cfg.run_dir, "ds_config.json"), run.ds)
    log.info("BiART %s: %.1fM parameters, %d ranks, global batch %d, peak lr %.3g, %d steps",
             cfg.model.preset, sum(p.numel() for p in model.parameters()) / 1e6, run.proc.world, run.global_batch,
             run.peak_lr, cfg.steps)
    log.info("kernels: %s", "; ".join(f"{k}: {v}" for k, v in kernels.items()))
    log.info("MFU against %.3g FLOP/s per device (%s)", peak_flops, "configured" if cfg.peak_flops else "measured")


class Meter:
    """Losses per direction between log steps, throughput and MFU; time in ``paused()`` (samples,
    checkpoints) does not count."""

    def __init__(self, run: Run, flops_per_token: float, start_step: int):
        cfg, device = run.cfg, run.proc.device
        self.run, self.flops_per_token = run, flops_per_token
        self.peak_flops = cfg.peak_flops or measure_peak_flops(
            device, {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision(run.ds)]
            if device.type == "cuda" else torch.float32)
        self.tokens_per_step = run.global_batch * (run.bcfg.seq_len - 1)
        self.last, self.last_step, self.t0 = {}, start_step, time.time()
        self._reset()

    def _reset(self) -> None:
        self.sums = {d: torch.zeros(4, device=self.run.proc.device) for d in Direction}  # loss, ref, gen, steps

    def add(self, direction, losses: torch.Tensor) -> None:
        one = torch.ones(1, device=losses.device)
        self.sums[direction] += torch.cat([losses, one]) / self.run.grad_accum

    def metrics(self, step: int, lr: float, engine) -> dict:
        """The metrics of the steps since the last call, averaged over the ranks (collective)."""
        run, dt, steps = self.run, time.time() - self.t0, step - self.last_step
        metrics = _gather_metrics(self.sums)
        metrics.update(step=step, lr=lr, grad_norm=_float(engine.get_global_grad_norm()),
                       loss_scale=loss_scale(engine), tokens_per_s=self.tokens_per_step * steps / dt,
                       samples_per_s=run.global_batch * steps / dt)
        metrics["mfu"] = self.flops_per_token * metrics["tokens_per_s"] / (self.peak_flops * run.proc.world)
        self._reset()
        self.last, self.last_step, self.t0 = metrics, step, time.time()
        return metrics

    @contextlib.contextmanager
    def paused(self):
        paused = time.time()
        try:
            yield
        finally:
            self.t0 += time.time() - paused


def _gather_metrics(sums: dict) -> dict:
    stacked = torch.stack([sums[d] for d in Direction])
    dist.all_reduce(stacked)
    out = {}
    for d, row in zip(Direction, stacked.tolist()):
        if row[3]:
            name = d.name.lower()
            out.update({f"{name}/{part}": row[i] / row[3] for i, part in enumerate(("loss", "ref", "gen"))})
    return out


def _float(x) -> float | None:
    return None if x is None else float(x)


# ---------------------------------------------------------------------------------------------
# checkpoints

def save_checkpoint(engine, run: Run, step: int, checkpoints: Checkpoints, plateau: Plateau | None = None) -> None:
    """DeepSpeed's files of every rank, handed to the writer (collective); the marker, with what
    the data order and a resume on another number of ranks need (and the plateau rule's state),
    follows once they are on disk."""
    meta = {"world_size": run.proc.world, "data": run.data_key, "samples": samples_before(run, step),
            "batch": [run.cfg.micro_batch_size, run.cfg.grad_accum],  # as asked: plan_batch compares
            "model": _model_fields(run.bcfg), "zero_stage": zero_stage(run.ds), "precision": precision(run.ds),
            "provenance": run.provenance}
    if plateau is not None:
        meta["plateau"] = plateau.state(run.proc.world)
    checkpoints.start(step, meta, lambda folder: engine.save_checkpoint(
        os.path.dirname(folder), tag=os.path.basename(folder), save_latest=False))


# BiARTConfig fields that change how the numbers are computed (memory, chunking), not the model: not
# recorded, never compared.
_HOW_COMPUTED = ("activation_checkpointing", "loss_chunk")


def _model_fields(bcfg) -> dict:
    """The model config as a checkpoint records it (JSON's types; ``_HOW_COMPUTED`` left out)."""
    fields = json.loads(json.dumps(dataclasses.asdict(bcfg)))
    for name in _HOW_COMPUTED:
        fields.pop(name, None)
    return fields


def _model_differences(recorded: dict, bcfg) -> list[str]:
    """How this run's model config differs from the one a checkpoint recorded, field by field."""
    return [f"{k} {recorded.get(k)!r} there, {v!r} here" for k, v in _model_fields(bcfg).items()
            if recorded.get(k) != v]


def _log_checkpoints(cfg: TrainConfig, rank: int, completed: list[dict]) -> None:
    """Completed checkpoints' figures: in the log and in run_dir/checkpoints.jsonl (rank 0)."""
    if rank:
        return
    for figures in completed:
        log.info("checkpoint of step %d complete: %.1f MB written in %.2f s; training held up %.3f s",
                 figures["checkpoint_step"], figures["checkpoint_mb"], figures["checkpoint_write_s"],
                 figures["checkpoint_stall_s"])
        with open(os.path.join(cfg.run_dir, "checkpoints.jsonl"), "a") as f:
            f.write(json.dumps(figures) + "\n")


def _finished_marker(cfg: TrainConfig) -> str:
    return os.path.join(cfg.run_dir, "finished.json")


# ---------------------------------------------------------------------------------------------
# samples

class Sampler:
    """Sample captions and images every ``sample_every`` steps from a few fixed samples of the
    first shard; every rank takes part (ZeRO-3 gathers parameters collectively), rank 0 writes."""

    def __init__(self, cfg: TrainConfig, bcfg, first_shard: str, rank: int, n: int = 4):
        samples = read_tar(first_shard)[:n]
        make = TokenBatch(cfg.data.tokenizer, bcfg.text_offset, bcfg.text_len, bcfg.image_len, bcfg.image_vocab, 0.0)
        self.batch = make(samples, [np.random.default_rng(0)] * len(samples))
        self.captions = [s.get("txt", b"").decode("utf-8", "replace") for s in samples]
        self.cfg, self.bcfg, self.rank = cfg, bcfg, rank
        self.vae = None

    def run(self, engine, step: int, logger: MetricsLogger, ds: dict) -> None:
        model, device = engine.module, engine.device
        gather = contextlib.nullcontext()
        if zero_stage(ds) == 3:
            import deepspeed
            gather = deepspeed.zero.GatheredParameters(list(model.parameters()))
        model.eval()
        gen = torch.Generator(device=device).manual_seed(0)
        with gather, torch.no_grad():
            text = model.generate(prompt_for(self.batch["image"].to(device), Direction.I2T, self.bcfg),
                                  Direction.I2T, self.bcfg.text_len, temperature=0)
            image = model.generate(prompt_for(self.batch["text"].to(device), Direction.T2I, self.bcfg),
                                   Direction.T2I, self.bcfg.image_len, temperature=1.0, top_k=64, generator=gen)
        model.train()
        if self.rank:
            return
        tok = CaptionTokenizer(self.cfg.data.tokenizer, offset=self.bcfg.text_offset)
        lines = [f"{truth!r} -> {tok.decode(ids.cpu())!r}" for truth, ids in zip(self.captions, text)]
        folder = os.path.join(self.cfg.run_dir, "samples")
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, f"step_{step:08d}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        logger.text("samples/captions", "\n\n".join(lines), step)
        self.vae = self.vae or load_vae(self.cfg.data.vae)
        grid = image_grid(self.vae.decode(image.cpu().long()))
        save_image(os.path.join(folder, f"step_{step:08d}.png"), grid)
        logger.image("samples/text_to_image", grid, step)


# ---------------------------------------------------------------------------------------------
# export

def export_checkpoint(run_dir: str, output: str, step: int | None = None, rank: int = 0) -> str:
    """The newest complete checkpoint (or ``step``'s) -> one safetensors file of fp32 weights with
    the model config, in-process; works for every ZeRO stage and stage 0. Only ``rank`` 0 writes."""
    found = dict(complete_checkpoints(run_dir))
    if not found:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint (checkpoints/step_*/{MARKER})")
    step = max(found) if step is None else step
    if step not in found:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint of step {step}; it has {sorted(found)}")
    if rank:
        return output
    folder = found[step]
    meta = read_checkpoint_meta(folder)
    cfg = read_run_config(run_dir, TrainConfig)
    # the exported file describes the model; how it was trained (recomputing blocks) is not part of it
    model = BiART(dataclasses.replace(build_model_config(cfg), activation_checkpointing=False))
    if meta["zero_stage"] == 0:
        load_stage0_fp32(model, folder)
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with deepspeed_loads(folder):
            state = get_fp32_state_dict_from_zero_checkpoint(os.path.dirname(folder), tag=os.path.basename(folder))
        model.load_state_dict(state, strict=True)
    save_model(model, output, meta["provenance"])
    log.info("exported step %d of %s to %s", step, run_dir, output)
    return output
