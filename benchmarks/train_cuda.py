"""BiART training on one CUDA GPU: the CUDA code paths, then throughput and MFU.

The engine is built the way ``pipeline/train.py`` builds it (``ds_config`` -> ``BiART`` ->
``wrap``: FusedAdam, precision and ZeRO stage from the ds_config) and fed random token batches
already on the GPU, directions alternating, so the figures leave out data loading.

Checks (``--skip-checks`` to leave them out):

* kernels: the choices ``wrap`` makes (FusedAdam is JIT-built on first use; its time is printed).
* fp16 and bf16: ``--check-steps`` steps of ``--check-preset`` on two fixed batches with
  ``ds_configs/zero2_fp16.json`` / ``zero2_bf16.json``: the loss must go down, the fp16 loss scale
  (read with ``loss_scale``, as the training stage logs it) must be finite and not every step skipped.
* flash: one training step (forward and backward) with SDPA restricted to the flash backend
  (``sdpa_kernel(SDPBackend.FLASH_ATTENTION)``: any shape, dtype or mask flash cannot take raises),
  in bf16 and fp16, plus KV-cache generation with flash forced; and a profiled default step, whose
  op names say which SDPA backend PyTorch picks by itself (``sdpa_default_backend_*``).

Throughput: for each ``--sweep PRESET:B1,B2,...`` one ZeRO-2 engine (``--deepspeed``, bf16 by
default) is timed at each micro-batch size (ascending; stops at the first out-of-memory):
``--warmup`` steps, then ``--rounds`` rounds of ``--steps`` steps, the median round counted. MFU =
``BiART.flops_per_token`` (6N + 12 L d T, as ``lverse train`` logs it) x tokens/s over ``--peak-flops``
(default 989e12: H100 SXM bf16 dense), and also over a measured 8192^3 bf16 matmul.

Diagnosis (``--diagnose PRESET:B``, default biart-500m:16; ``''`` to skip): the engine's step with
SDPA forced to each backend in turn; a profiled step (GPU-busy time, the costliest kernels and host
calls); the same engine with the vocabulary grown to a multiple of 64; and a plain PyTorch loop
(autocast bf16, fp32 weights, torch fused AdamW, clipping) with both vocabularies.

The last lines are ``name=value``. Needs a CUDA device; exits with a message otherwise. DeepSpeed
0.19.8 cannot parse an arch-specific ``TORCH_CUDA_ARCH_LIST`` entry such as ``9.0a`` and then
``wrap`` falls back to torch's fused AdamW (it says so): set ``TORCH_CUDA_ARCH_LIST=9.0`` for FusedAdam.

Usage: python benchmarks/train_cuda.py [--sweep biart-500m:4,8,16,32] [--sweep biart-mini:16,64]
                                       [--diagnose biart-500m:16] [--skip-checks]

(Not named cuda.py: run as a script, that file would shadow the ``cuda`` package torch imports.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import logging
import statistics
import sys
import time

import torch
from common import build_engine, deepspeed_config, micro_step, random_batches, timed_rounds

from lverse.model.biart import PRESETS, BiART, Direction, build_sequence, prompt_for
from lverse.runtime.deepspeed import loss_scale
from lverse.runtime.distributed import setup_env

H100_BF16_DENSE = 989e12


def new_engine(preset: str, ds_path: str, batch: int, lr: float, seed: int = 0, **overrides):
    """A fresh engine of ``preset`` (config fields ``overrides`` changed) on this GPU; returns
    (engine, kernel choices, seconds it took to build)."""
    torch.manual_seed(seed)
    model = BiART(dataclasses.replace(PRESETS[preset], **overrides))
    start = time.perf_counter()
    engine, kernels = build_engine(model, deepspeed_config(ds_path, batch), lr,
                                   torch.device("cuda", torch.cuda.current_device()))
    engine.train()
    return engine, kernels, time.perf_counter() - start


def train_step(engine, pair: tuple[torch.Tensor, torch.Tensor], direction: Direction) -> torch.Tensor:
    """The training stage's step on a (text, image) pair; returns (loss, ref, gen)."""
    return micro_step(engine, *pair, direction)


def release() -> None:
    """Return the memory of engines no longer referenced (DeepSpeed's hooks make reference cycles,
    so this must run after the caller has dropped its names for the engine)."""
    gc.collect()
    torch.cuda.empty_cache()


def check_precision(name: str, ds_path: str, preset: str, steps: int, batch: int, lr: float, out: dict) -> None:
    engine, kernels, seconds = new_engine(preset, ds_path, batch, lr)
    print(f"[{name}] kernels ({seconds:.1f} s to build the engine): {kernels}", flush=True)
    out[f"{name}_optimizer"] = kernels["optimizer"]
    data = random_batches(engine.module.cfg, batch, 2, "cuda", seed=1)
    losses, scales = [], []
    for step in range(steps):
        loss = train_step(engine, data[step % 2], Direction(step % 2))
        losses.append(loss[0].item())
        scales.append(loss_scale(engine))
        if step < 5 or (step + 1) % 10 == 0:
            gn = engine.get_global_grad_norm()
            print(f"[{name}] step {step + 1}: loss {losses[-1]:.4f} loss_scale {scales[-1]} "
                  f"grad_norm {None if gn is None else float(gn):.4g} skipped {engine.skipped_steps}", flush=True)
    finite = all(torch.isfinite(p).all() for p in engine.module.parameters())
    # The same direction's loss at the start and the end (directions alternate).
    first, last = losses[0], losses[-2 if (steps - 1) % 2 else -1]
    out.update({f"{name}_loss_first": round(first, 4), f"{name}_loss_last": round(last, 4),
                f"{name}_loss_down": last < first - 0.5, f"{name}_skipped_steps": engine.skipped_steps,
                f"{name}_steps": steps, f"{name}_params_finite": bool(finite)})
    if name == "fp16":
        out["fp16_loss_scale_first"] = scales[0]
        out["fp16_loss_scale_last"] = scales[-1]
    check_flash(name, engine, data[0], out)
    engine.destroy()


def check_flash(name: str, engine, pair, out: dict) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            for d in Direction:
                train_step(engine, pair, d)
            torch.cuda.synchronize()
        out[f"flash_forced_train_{name}"] = True
    except RuntimeError as e:
        print(f"[{name}] flash forced, training step failed: {e}", flush=True)
        out[f"flash_forced_train_{name}"] = False
    model = engine.module
    model.eval()
    try:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION), torch.no_grad():
            cfg = model.cfg
            image = pair[1][:2]
            model.generate(prompt_for(image, Direction.I2T, cfg), Direction.I2T, 8, temperature=0)
            torch.cuda.synchronize()
        out[f"flash_forced_generate_{name}"] = True
    except RuntimeError as e:
        print(f"[{name}] flash forced, KV-cache generation failed: {e}", flush=True)
        out[f"flash_forced_generate_{name}"] = False
    model.train()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        train_step(engine, pair, Direction.T2I)
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    sdpa = sorted(n[:90] for n in names if "scaled_dot_product" in n or "flash" in n.lower())
    print(f"[{name}] SDPA ops and kernels in a default training step: {sdpa}", flush=True)
    backends = {"aten::_scaled_dot_product_flash_attention": "flash", "aten::_scaled_dot_product_cudnn_attention":
                "cudnn", "aten::_scaled_dot_product_efficient_attention": "efficient",
                "aten::_scaled_dot_product_attention_math": "math"}
    out[f"sdpa_default_backend_{name}"] = ",".join(v for k, v in backends.items() if k in names) or "unknown"


def matmul_peak(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3)


def sweep(preset: str, sizes: list[int], args, measured_peak: float, out: dict, table: list) -> None:
    engine, kernels, seconds = new_engine(preset, args.deepspeed, sizes[0], 1e-4)
    model = engine.module
    cfg = model.cfg
    fpt = model.flops_per_token()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"[{preset}] {n_params / 1e6:.1f}M parameters, {fpt / 1e9:.3f} GFLOP per token, kernels {kernels}",
          flush=True)
    for b in sizes:
        try:
            torch.cuda.reset_peak_memory_stats()
            data = random_batches(cfg, b, 2, "cuda", seed=b)
            rounds = timed_rounds(engine, data, args.warmup, args.rounds, args.steps)
        except torch.OutOfMemoryError:
            print(f"[{preset}] batch {b}: out of memory; larger batches skipped", flush=True)
            out[f"{preset}_b{b}"] = "oom"
            break
        step_s = statistics.median(rounds)
        tokens = b * (cfg.seq_len - 1) / step_s
        mfu, mfu_measured = fpt * tokens / args.peak_flops, fpt * tokens / measured_peak
        mem = torch.cuda.max_memory_allocated() / 2**30
        key = f"{preset}_b{b}"
        out.update({f"{key}_step_ms": round(step_s * 1e3, 2), f"{key}_tokens_per_s": round(tokens),
                    f"{key}_samples_per_s": round(b / step_s, 2), f"{key}_mfu": round(mfu, 4),
                    f"{key}_mfu_vs_measured_matmul": round(mfu_measured, 4), f"{key}_peak_mem_gib": round(mem, 1)})
        table.append((preset, b, step_s * 1e3, tokens, b / step_s, mfu, mfu_measured, mem,
                      [round(r * 1e3, 1) for r in rounds]))
        print(f"[{preset}] batch {b}: {step_s * 1e3:.1f} ms/step (rounds {table[-1][-1]} ms), {tokens:,.0f} tokens/s, "
              f"{b / step_s:.1f} samples/s, MFU {mfu:.3f} (vs measured matmul {mfu_measured:.3f}), "
              f"peak memory {mem:.1f} GiB", flush=True)
        del data
    engine.destroy()


def _gpu_busy_us(prof) -> float | None:
    """Microseconds in which at least one kernel or copy ran on the GPU (union of intervals)."""
    from torch.autograd import DeviceType
    spans = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
                   if e.device_type() == DeviceType.CUDA)
    busy, end = 0, None
    for a, b in spans:
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    return busy / 1e3


def timed_steps(engine_or_fn, data, steps: int, warmup: int = 2) -> float:
    """Median seconds per step of ``engine_or_fn(pair, direction)`` over ``steps`` synchronised steps."""
    for i in range(warmup):
        engine_or_fn(data[i % len(data)], Direction(i % 2))
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        start = time.perf_counter()
        engine_or_fn(data[i % len(data)], Direction(i % 2))
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def diagnose(preset: str, b: int, args, out: dict) -> None:
    """Where one step's time goes: GPU-busy share (profiler), SDPA backends forced one at a time,
    and a plain PyTorch loop (autocast bf16, torch fused AdamW, clipping) on the same batches."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile
    engine, kernels, _ = new_engine(preset, args.deepspeed, b, 1e-4)
    data = random_batches(engine.module.cfg, b, 2, "cuda", seed=b)
    key = f"{preset}_b{b}"
    step = functools.partial(train_step, engine)
    base = timed_steps(step, data, args.steps * args.rounds)
    out[f"{key}_engine_step_ms"] = round(base * 1e3, 1)
    print(f"[diagnose {key}] engine ({kernels['optimizer']}): {base * 1e3:.1f} ms/step", flush=True)
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("math", SDPBackend.MATH)):
        try:
            with sdpa_kernel(backend):
                t = timed_steps(step, data, args.steps)
            out[f"{key}_sdpa_{name}_step_ms"] = round(t * 1e3, 1)
            print(f"[diagnose {key}] SDPA forced to {name}: {t * 1e3:.1f} ms/step", flush=True)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            out[f"{key}_sdpa_{name}_step_ms"] = "error"
            print(f"[diagnose {key}] SDPA forced to {name}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            torch.cuda.empty_cache()
    try:
        n = 3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for i in range(n):
                step(data[i % 2], Direction(i % 2))
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / n
        busy = _gpu_busy_us(prof) / n / 1e6  # seconds per step
        out[f"{key}_gpu_busy_fraction"] = round(busy / base, 3)  # of an unprofiled step
        out[f"{key}_gpu_busy_ms"] = round(busy * 1e3, 1)
        print(f"[diagnose {key}] profiled: {wall * 1e3:.1f} ms/step wall (the profiler slows the host), GPU busy "
              f"{busy * 1e3:.1f} ms/step: {busy / base:.0%} of the unprofiled {base * 1e3:.1f} ms", flush=True)
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=18, max_name_column_width=70)
        print(table, flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=70),
              flush=True)
    except Exception as e:  # the profiler's interfaces move between torch versions: report and go on
        print(f"[diagnose {key}] profiler failed: {type(e).__name__}: {e}", flush=True)
    engine.destroy()
    del engine, step
    release()

    # The vocabulary (58003 in the paper's layout) is odd, so the three lm_head GEMMs have a leading
    # dimension cuBLAS cannot use its Hopper kernels for; the same model with the text vocabulary
    # grown to make the total a multiple of 64 shows what that costs.
    vocab = PRESETS[preset].vocab_size
    pad = -vocab % 64
    if pad:
        print(f"[diagnose {key}] {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated after the engine's release",
              flush=True)
        try:
            t = engine_step_seconds(preset, args.deepspeed, b, data, args.steps * args.rounds,
                                    text_vocab=PRESETS[preset].text_vocab + pad)
            out[f"{key}_vocab{vocab + pad}_engine_step_ms"] = round(t * 1e3, 1)
            print(f"[diagnose {key}] vocabulary {vocab} -> {vocab + pad} (a multiple of 64): {t * 1e3:.1f} ms/step "
                  f"against {base * 1e3:.1f}", flush=True)
        except torch.OutOfMemoryError:
            out[f"{key}_vocab{vocab + pad}_engine_step_ms"] = "oom"
            print(f"[diagnose {key}] vocabulary {vocab + pad}: out of memory", flush=True)
        release()

    try:
        t = plain_step_seconds(preset, data, args.steps * args.rounds)
        out[f"{key}_plain_autocast_step_ms"] = round(t * 1e3, 1)
        print(f"[diagnose {key}] plain PyTorch loop (autocast bf16, fp32 weights, torch fused AdamW, clipping): "
              f"{t * 1e3:.1f} ms/step", flush=True)
    except torch.OutOfMemoryError:
        out[f"{key}_plain_autocast_step_ms"] = "oom"
    gc.collect()
    torch.cuda.empty_cache()
    if pad:
        try:
            t = plain_step_seconds(preset, data, args.steps * args.rounds, text_vocab=PRESETS[preset].text_vocab + pad)
            out[f"{key}_vocab{vocab + pad}_plain_autocast_step_ms"] = round(t * 1e3, 1)
            print(f"[diagnose {key}] plain PyTorch loop, vocabulary {vocab + pad}: {t * 1e3:.1f} ms/step", flush=True)
        except torch.OutOfMemoryError:
            out[f"{key}_vocab{vocab + pad}_plain_autocast_step_ms"] = "oom"
        gc.collect()
        torch.cuda.empty_cache()


def engine_step_seconds(preset: str, ds_path: str, b: int, data, steps: int, **overrides) -> float:
    """Median step of a fresh engine (a config override applied), destroyed before returning."""
    engine, _, _ = new_engine(preset, ds_path, b, 1e-4, **overrides)
    t = timed_steps(functools.partial(train_step, engine), data, steps)
    engine.destroy()
    return t


def plain_step_seconds(preset: str, data, steps: int, **overrides) -> float:
    """Median step of a plain PyTorch loop on the same model and batches, without DeepSpeed."""
    torch.manual_seed(0)
    model = BiART(dataclasses.replace(PRESETS[preset], **overrides)).cuda().train()
    opt = torch.optim.AdamW(model.optim_groups(0.01), lr=1e-4, betas=(0.9, 0.95), fused=True)

    def plain(pair, direction):
        seq = build_sequence(*pair, direction, model.cfg)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, losses = model(seq[:, :-1], direction, targets=seq[:, 1:])
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return timed_steps(plain, data, steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sweep", action="append", metavar="PRESET:B1,B2,...",
                        help="a preset and its micro-batch sizes (repeatable; default biart-500m:4,8,16,32 "
                             "and biart-mini:16,64)")
    parser.add_argument("--deepspeed", default="zero2_bf16", help="ds_config of the sweep")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-flops", type=float, default=H100_BF16_DENSE,
                        help="per-GPU peak for MFU (default: H100 SXM bf16 dense, 989e12)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--diagnose", metavar="PRESET:B", default="biart-500m:16",
                        help="profile one size, force each SDPA backend, compare a plain loop ('' to skip)")
    parser.add_argument("--check-preset", default="biart-mini", choices=sorted(PRESETS))
    parser.add_argument("--check-steps", type=int, default=60)
    parser.add_argument("--check-batch", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("benchmarks/train_cuda.py needs a CUDA device (torch.cuda.is_available() is False): FusedAdam, "
                 "fp16 loss scaling, flash attention and GPU throughput exist only there; "
                 "benchmarks/train.py runs on a CPU")
    sweeps = []
    for spec in args.sweep or ["biart-500m:4,8,16,32", "biart-mini:16,64"]:
        preset, _, sizes = spec.partition(":")
        if preset not in PRESETS or not sizes:
            parser.error(f"--sweep {spec!r}: expected PRESET:B1,B2,... with PRESET one of {sorted(PRESETS)}")
        sweeps.append((preset, sorted(int(s) for s in sizes.split(","))))
    logging.basicConfig(level=logging.WARNING)

    setup_env()
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"deepspeed {deepspeed.__version__}", flush=True)
    out: dict = {}
    if not args.skip_checks:
        check_precision("fp16", "ds_configs/zero2_fp16.json", args.check_preset, args.check_steps,
                        args.check_batch, 3e-4, out)
        release()
        check_precision("bf16", "ds_configs/zero2_bf16.json", args.check_preset, args.check_steps,
                        args.check_batch, 3e-4, out)
        release()
    measured = matmul_peak()
    out["matmul_bf16_8192_tflops"] = round(measured / 1e12, 1)
    out["peak_flops_for_mfu"] = args.peak_flops
    table: list = []
    for preset, sizes in sweeps:
        sweep(preset, sizes, args, measured, out, table)
        release()
        print(f"[{preset}] after the sweep: {torch.cuda.memory_allocated() / 2**30:.2f} GiB allocated", flush=True)
    if args.diagnose:
        preset, _, b = args.diagnose.partition(":")
        diagnose(preset, int(b), args, out)
    print(f"\n{'preset':<11} {'batch':>5} {'ms/step':>8} {'tokens/s':>10} {'samples/s':>9} {'MFU':>6} "
          f"{'MFU(meas)':>9} {'mem GiB':>7}")
    for preset, b, ms, tps, sps, mfu, mfu_m, mem, _ in table:
        print(f"{preset:<11} {b:>5} {ms:>8.1f} {tps:>10,.0f} {sps:>9.1f} {mfu:>6.3f} {mfu_m:>9.3f} {mem:>7.1f}")
    if table:
        best = max(table, key=lambda r: r[5])
        out["best_mfu"] = round(best[5], 4)
        out["best_mfu_at"] = f"{best[0]}_b{best[1]}"
    print()
    for k, v in out.items():
        print(f"{k}={str(v).lower() if isinstance(v, bool) else v}")


if __name__ == "__main__":
    main()
