"""DeepSpeed as lverse trains with it: its config (loaded, checked, what it says), the kernels and
the optimizer a model trains with and the engine around them (``wrap``), one BiART micro-step
through the engine (``micro_step``: the train stage's, which the benchmarks time), and its checkpoints
(written through lverse's writer, read with weights only, regrouped for another number of ranks,
read back as fp32 weights from stage 0).

No stage's config reaches here: what a function needs comes as arguments (``AdamW`` names the
optimizer's settings, which the train stage's ``optim`` section holds), so the runtime stays below
the stages. DeepSpeed itself is imported where it is used: importing it costs seconds, and a
command that only reads a config should not pay them.

Kernels: ``wrap`` is the one place where the single-device model meets the hardware, in this
order: apex FusedLayerNorm (only when NVIDIA apex is importable) -> ``torch.compile`` of each
block's training forward (``compile``) -> optimizer (DeepSpeed FusedAdam on CUDA,
DeepSpeedCPUAdam with optimizer offload, else torch AdamW) -> ``deepspeed.initialize`` (stage 0's
priming optimizer step undone: ``undo_priming_step``). Attention is SDPA, which picks flash
kernels on CUDA. Activation checkpointing, the output head and its chunked loss are the model's
own (``BiARTConfig``). The choices are returned for the run's log.
"""

from __future__ import annotations

import collections.abc
import copy
import difflib
import itertools
import json
import logging
import os
import shutil
from typing import Protocol

import torch

from lverse.core.errors import InputError
from lverse.model.biart import Direction, build_sequence
from lverse.model.checkpoint import weights_only_loads

from .trainer import MARKER, FileWriter

log = logging.getLogger(__name__)

# What the run config owns: a ds_config that sets one of these is refused.
DS_CONFIG_OWNED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                        "optimizer", "scheduler", "gradient_clipping")


class AdamW(Protocol):
    """The optimizer's settings (the train stage's ``OptimConfig`` is one)."""
    weight_decay: float
    betas: list[float]
    eps: float
    fused: bool  # DeepSpeed's FusedAdam on CUDA, DeepSpeedCPUAdam with offload


# ---------------------------------------------------------------------------------------------
# the config

def ds_config_path(value: str) -> str:
    """A DeepSpeed config by path, or by the name of one shipped in ds_configs/ (``zero2_bf16`` or
    ``zero2_bf16.json``), which installs with the package, so names work from any folder."""
    if os.path.isfile(value):
        return value
    from importlib.resources import files
    shipped = files("lverse.ds_configs")
    names = sorted(p.name.removesuffix(".json") for p in shipped.iterdir() if p.name.endswith(".json"))
    if os.sep not in value and value.removesuffix(".json") in names:
        return str(shipped / f"{value.removesuffix('.json')}.json")
    raise FileNotFoundError(f"DeepSpeed config {value} is neither a file nor a shipped name ({', '.join(names)})")


def load_ds_config(path: str, world_size: int, *, micro_batch_size: int, grad_accum: int,
                   grad_clip: float) -> dict:
    """A ds_configs/ file (a path or a shipped name) plus the values the run config owns (batch
    sizes, clipping)."""
    path = ds_config_path(path)
    with open(path) as f:
        try:
            ds = json.load(f)
        except ValueError as e:
            raise InputError(f"DeepSpeed config {path} is not JSON: {e}") from None
    if not isinstance(ds, dict):
        raise InputError(f"DeepSpeed config {path} holds a {type(ds).__name__}, not a JSON object")
    owned = [k for k in DS_CONFIG_OWNED_KEYS if k in ds]
    if owned:
        raise InputError(f"{path} sets {owned}; batch sizes, the optimizer, its schedule and clipping come "
                         "from the run config only (micro_batch_size, grad_accum, optim.*): remove them")
    ds.update(train_micro_batch_size_per_gpu=micro_batch_size, gradient_accumulation_steps=grad_accum,
              train_batch_size=micro_batch_size * grad_accum * world_size, gradient_clipping=grad_clip,
              steps_per_print=10**9, wall_clock_breakdown=False)
    check_ds_config(ds, path)
    if "stage" not in ds.get("zero_optimization", {}):
        # DeepSpeed's default is stage 0, which a file that means ZeRO-2 but misspells a key
        # inside would then train at without a word: the stage is said, not implied.
        raise InputError(f"DeepSpeed config {path}: zero_optimization.stage is not set (DeepSpeed would train at "
                         "stage 0): set it, 0 for plain data parallel (the shipped ddp_bf16) or 1, 2, 3 for ZeRO")
    return ds


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a loaded ds_config; 0 is plain data parallel: every rank holds the whole
    model, gradients and optimizer state, and gradients are all-reduced."""
    return int(ds.get("zero_optimization", {}).get("stage", 0))


class _ReadKeys(dict):
    """A dict that records which keys were asked for, however they are asked for."""

    def __init__(self, data: dict):
        super().__init__(data)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)

    def keys(self):  # ``key in d.keys()`` would bypass __contains__ on a plain keys view
        outer = self

        class Keys(collections.abc.KeysView):
            def __contains__(self, key):
                return key in outer

        return Keys(self)


def check_ds_config(ds: dict, path: str) -> None:
    """Run DeepSpeed's own config parser on ``ds`` before any work, so a mistake is one line naming
    the file: bad values and unknown keys inside its sections (which it refuses itself), and
    top-level keys it never reads. DeepSpeed ignores those silently, so the typo
    ``zero_optimisation`` would train a ZeRO-0 run; the rule "a key the parser never asked for is
    unknown" needs no list of keys that could age with DeepSpeed's versions."""
    from deepspeed.runtime.config import DeepSpeedConfig
    # train_batch_size is left to DeepSpeed to derive: it counts ranks only once they have started
    seen = _ReadKeys({k: copy.deepcopy(v) for k, v in ds.items() if k != "train_batch_size"})
    try:
        DeepSpeedConfig(seen)
    except Exception as e:  # pydantic's ValidationError, DeepSpeedConfigError, AssertionError
        errors = getattr(e, "errors", None)  # pydantic: one short line per field
        text = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']} (got {x.get('input')!r})" for x in errors()) \
            if callable(errors) else str(e)
        raise InputError(f"DeepSpeed config {path}: {getattr(e, 'title', '')} {text}".replace("  ", " ")) from None
    unknown = sorted(set(ds) - seen.read - {"train_batch_size"})
    if unknown:
        hints = [f"{k} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(k, seen.read, 1)) else k
                 for k in unknown]
        raise InputError(f"DeepSpeed config {path}: unknown keys {', '.join(hints)}; DeepSpeed would ignore them")


def precision(ds: dict) -> str:
    return "fp16" if ds.get("fp16", {}).get("enabled") else "bf16" if ds.get("bf16", {}).get("enabled") else "fp32"


# ---------------------------------------------------------------------------------------------
# optimizer, kernels, the engine

def build_optimizer(model: torch.nn.Module, adamw: AdamW, ds: dict, lr: float) -> tuple[torch.optim.Optimizer, str]:
    """The fastest AdamW the hardware has, with a named CPU fallback (see the module doc)."""
    groups = model.optim_groups(adamw.weight_decay)
    kw = dict(lr=lr, betas=tuple(adamw.betas), eps=adamw.eps)
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"
    if offload and adamw.fused:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw), "DeepSpeedCPUAdam (offloaded optimizer states)"
    if torch.cuda.is_available() and adamw.fused and not offload:
        try:
            from deepspeed.ops.adam import FusedAdam
            return FusedAdam(groups, adam_w_mode=True, **kw), "DeepSpeed FusedAdam (CUDA)"
        except Exception as e:  # the op could not be built (no nvcc, mismatched CUDA): say so
            log.warning("FusedAdam unavailable (%s: %s); using torch's fused AdamW", type(e).__name__, e)
            return torch.optim.AdamW(groups, fused=True, **kw), "torch AdamW fused=True (CUDA)"
    if offload:  # DeepSpeed refuses a non-DeepSpeed optimizer with offload unless told it is meant
        ds["zero_force_ds_cpu_optimizer"] = False
    name = "torch AdamW (foreach)" + (" on offloaded states" if offload else "")
    return torch.optim.AdamW(groups, foreach=True, **kw), name


def apex_layernorm() -> type | None:
    """NVIDIA apex's FusedLayerNorm when NVIDIA apex is installed (never PyPI's unrelated `apex`)."""
    try:
        from apex.normalization import FusedLayerNorm
    except Exception:
        return None
    return FusedLayerNorm


def wrap(model, ds: dict, lr: float, device: torch.device, adamw: AdamW, compile: bool = False):
    """Single-device model -> DeepSpeed engine on ``device`` (the rank's, ``pick_device``), its
    blocks compiled if ``compile``; returns (engine, kernel choices)."""
    import argparse

    import deepspeed
    kernels = {}
    cuda = torch.cuda.is_available()
    fused_ln = apex_layernorm() if cuda else None
    if fused_ln is not None:
        for parent in list(model.modules()):
            for name, child in parent.named_children():
                if isinstance(child, torch.nn.LayerNorm):
                    new = fused_ln(child.normalized_shape, eps=child.eps)
                    new.load_state_dict(child.state_dict())
                    setattr(parent, name, new)
        kernels["layernorm"] = "apex FusedLayerNorm"
    else:
        kernels["layernorm"] = "torch LayerNorm" + ("" if cuda else " (CPU)") + " (NVIDIA apex not importable)" * cuda
    kernels["activation_checkpointing"] = "on" if model.cfg.activation_checkpointing else "off"
    if compile:
        compile_blocks(model)
    kernels["compile"] = "torch.compile of the blocks" if compile else "off (eager)"
    kernels["head"] = f"{model.cfg.head}, loss in chunks of {model.cfg.loss_chunk} positions" \
        if model.cfg.loss_chunk else f"{model.cfg.head}, loss from all logits at once"
    if cuda:
        kernels["attention"] = ("SDPA, flash kernel available" if torch.backends.cuda.flash_sdp_enabled()
                                else "SDPA, flash kernel disabled")
    else:
        kernels["attention"] = "SDPA (CPU kernels)"
    optimizer, kernels["optimizer"] = build_optimizer(model, adamw, ds, lr)
    kernels["precision"] = precision(ds)
    stage = zero_stage(ds)
    kernels["zero_stage"] = f"{stage}" + " (plain data parallel: whole state on every rank)" * (stage == 0)
    # DeepSpeed would take cuda:LOCAL_RANK, which does not exist where a task sees only its own GPU.
    args = argparse.Namespace(device_rank=device.index or 0) if device.type == "cuda" else None
    engine, *_ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, config=ds)
    undo_priming_step(engine.optimizer)
    if stage == 0 and engine.dp_world_size == 1:
        # DeepSpeed's stage-0 all-reduce flattens every gradient into a bucket and copies it back
        # even on one rank: 5% of a biart-mini step on the CPU (benchmarks/train.py), for nothing
        engine.enable_backward_allreduce = False
    return engine, kernels


def undo_priming_step(optimizer) -> None:
    """DeepSpeed's stage-0 wrappers of a bf16 or fp16 model (FP16_Optimizer, FP16_UnfusedOptimizer)
    create the optimizer state with one AdamW step on zero gradients as they start. Adam's step
    count then runs one ahead, so the first real update is 0.735 of the lr (the bias corrections
    of step 2 over moments holding one gradient), and the fp32 masters are weight-decayed once at
    the peak lr: ddp_bf16's loss fell 0.06 less by step 2 than that of the ZeRO configs and of
    fp32 (tests/test_ds_configs.py). ZeRO's optimizers take no such step. Undone here: the masters
    are their bf16 weights again (they were cloned from them) and the state is empty."""
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    if isinstance(optimizer, FP16_Optimizer):
        pairs = zip(optimizer.fp32_groups_flat, optimizer.fp16_groups_flat)
    elif isinstance(optimizer, FP16_UnfusedOptimizer):
        pairs = zip([p for g in optimizer.fp32_groups for p in g], [p for g in optimizer.fp16_groups for p in g])
    else:
        return
    with torch.no_grad():
        for master, weight in pairs:
            master.copy_(weight)
    optimizer.optimizer.state.clear()


def compile_blocks(model) -> None:
    """``torch.compile`` each block's forward where it has no KV cache (training, evaluation of
    whole sequences); generation's cached steps, whose shapes change at every token, stay eager.
    The module tree and its state-dict keys are unchanged."""
    for block in model.blocks:
        compiled, eager = torch.compile(block.forward), block.forward

        def forward(x, cache=None, layer=0, compiled=compiled, eager=eager):
            return eager(x, cache, layer) if cache is not None else compiled(x)
        block.forward = forward


def loss_scale(engine) -> float | None:
    if not engine.fp16_enabled():
        return None
    opt = engine.optimizer
    return float(getattr(opt, "cur_scale", getattr(opt, "loss_scale", 0.0)))


# ---------------------------------------------------------------------------------------------
# checkpoints

def layout_difference(meta: dict, ds: dict) -> str | None:
    """Why a checkpoint's files cannot load under ``ds``, or None. Stage 0 keeps module and
    optimizer in one file (``mp_rank_00_model_states.pt``), ZeRO keeps the optimizer in per-rank
    ``*_optim_states.pt`` files, and neither engine reads the other's; at stage 0 the optimizer's
    state is that of DeepSpeed's wrapper for the precision (fp32 masters under bf16, the bare
    optimizer under fp32). ``meta`` is the checkpoint's marker (its ``zero_stage`` and ``precision``)."""
    there, here = meta["zero_stage"], zero_stage(ds)
    if (there == 0) != (here == 0):
        return f"was trained at ZeRO stage {there}, this run's zero_optimization.stage is {here}"
    if here == 0 and meta["precision"] != precision(ds):
        return (f"was trained at stage 0 in {meta['precision']}, this run's ds_config trains in {precision(ds)} "
                "(its bf16.enabled / fp16.enabled)")
    return None


class WriterEngine:
    """DeepSpeed's checkpoint-engine interface over lverse's ``FileWriter``: DeepSpeed decides
    what each rank saves, the writer how (durably; in the background). DeepSpeed clones the model's
    tensors for saving unless told the engine copies them itself, which the background writer does."""

    name = "lverse"

    def __init__(self, writer: FileWriter):
        self.writer = writer

    def create(self, info) -> None:
        pass

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        os.makedirs(path, exist_ok=exist_ok)

    def save(self, state_dict, path: str) -> None:
        self.writer.save(state_dict, path)

    def load(self, path: str, map_location=None):
        return torch.load(path, map_location=map_location, weights_only=True)  # DeepSpeed's types: deepspeed_loads

    def commit(self, info) -> bool:
        return True

    def is_data_parallel_writer(self, dp_rank: int) -> bool:
        return dp_rank == 0

    def is_decoupled(self) -> bool:
        return False

    def preserves_storage_sharing(self) -> bool:
        return not self.writer.background

    def cleanup(self) -> None:
        pass


def deepspeed_loads(folder: str):
    """A block in which DeepSpeed's loaders read ``folder``'s files with weights only (its
    ``torch.load`` calls ask for full pickle): beside tensors its checkpoints pickle these few
    classes, which are allowed; anything else is refused, so a run folder cannot run code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return weights_only_loads((LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address),
                              f"DeepSpeed checkpoint {folder}")


def to_universal(folder: str, run_dir: str) -> str:
    """Convert a ZeRO checkpoint for loading on another number of ranks (rank 0 only)."""
    import argparse

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
    out = os.path.join(run_dir, "universal", os.path.basename(folder))
    if not os.path.isfile(os.path.join(out, MARKER)):
        shutil.rmtree(out, ignore_errors=True)
        with deepspeed_loads(folder):
            ds_to_universal(argparse.Namespace(input_folder=folder, output_folder=out, num_extract_workers=1,
                                               num_merge_workers=1, keep_temp_folder=False, strict=True,
                                               inject_missing_state=False))
        shutil.copy(os.path.join(folder, MARKER), os.path.join(out, MARKER))  # last: complete
    return out


def load_stage0_fp32(model, folder: str) -> None:
    """A stage-0 checkpoint's fp32 weights into ``model``. DeepSpeed's zero_to_fp32 reads ZeRO's
    optimizer files, which stage 0 has none of: its one file holds the module as trained (fp32
    weights under fp32) and, under bf16/fp16, the optimizer wrapper's fp32 masters, one list per
    param group in the optimizer's order (``BiART.optim_groups``, as ``build_optimizer`` made them;
    DeepSpeed drops empty groups)."""
    with deepspeed_loads(folder):
        state = torch.load(os.path.join(folder, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=True)
    model.load_state_dict(state["module"], strict=True)  # under bf16/fp16 only the rounded weights
    opt = state["optimizer"] or {}
    masters = opt.get("fp32_groups")  # FP16_UnfusedOptimizer (torch AdamW), bf16 or fp16
    groups = [g["params"] for g in model.optim_groups(0.0) if g["params"]]
    if masters is None and "fp32_groups_flat" in opt:  # FP16_Optimizer (FusedAdam): one flat tensor a group
        masters = [flat.split([p.numel() for p in params]) for flat, params in zip(opt["fp32_groups_flat"], groups)]
    if masters is None:  # fp32: the module is the master
        return
    if [len(m) for m in masters] != [len(g) for g in groups]:
        raise ValueError(f"{folder}: the optimizer holds {[len(m) for m in masters]} fp32 masters a group, the "
                         f"model has {[len(g) for g in groups]} parameters a group")
    with torch.no_grad():
        for params, fp32 in zip(groups, masters):
            for p, master in zip(params, fp32):
                if master.numel() != p.numel():
                    raise ValueError(f"{folder}: an fp32 master of {master.numel()} values for a parameter of "
                                     f"{p.numel()}")
                p.copy_(master.view(p.shape))


# A test's fault (tests/test_train.py): with LVERSE_TEST_RAISE_AT_MICRO_STEP=k in its environment, the
# k-th micro-step of a process raises, as a step that fails (a kernel's error, a bug) does.
_RAISE_AT_MICRO_STEP = int(os.environ.get("LVERSE_TEST_RAISE_AT_MICRO_STEP") or 0)
_micro_steps = itertools.count(1)


def micro_step(engine, text: torch.Tensor, image: torch.Tensor, direction: Direction) -> torch.Tensor:
    """Forward and backward of one micro-batch of (text, image) pairs (DeepSpeed steps the
    optimizer at the last of the step's ``grad_accum``); returns (loss, ref, gen) detached. The train
    stage runs it, and the benchmarks time this same step."""
    if _RAISE_AT_MICRO_STEP and next(_micro_steps) == _RAISE_AT_MICRO_STEP:
        raise RuntimeError(f"micro-step {_RAISE_AT_MICRO_STEP} failed: raised by LVERSE_TEST_RAISE_AT_MICRO_STEP")
    seq = build_sequence(text, image, direction, engine.module.cfg).to(engine.device, non_blocking=True)
    _, losses = engine(seq[:, :-1], direction, targets=seq[:, 1:])
    engine.backward(losses["loss"])
    engine.step()
    return torch.stack([losses["loss"].detach(), losses["ref"].detach(), losses["gen"].detach()])
