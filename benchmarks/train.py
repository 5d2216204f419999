"""Training throughput on one process: the output head's options, compiled blocks, and a plain
PyTorch loop against the DeepSpeed engine (ZeRO-2); and the engine at ZeRO-1 and ZeRO-2 against
stage 0 (plain data parallel), on one process or several.

Same model size (``biart-mini`` by default: the paper's vocabulary and sequence length, 4 layers
of width 256, where the output layer is most of the work), same optimizer (AdamW with the same
groups), same precision, same random batches (captions of 5-64 pieces, PAD after), directions
alternating. The loops take turns (``--rounds`` rounds of ``--steps`` timed steps each, after
warm-up steps) so that drift of the machine hits all alike:

    full        plain loop, the full-vocabulary head with all logits at once (lverse before the
                head options: BiARTConfig(head="full", loss_chunk=0))
    default     plain loop, BiARTConfig's defaults (restricted head, chunked loss)
    compiled    plain loop, the defaults with ``compile_blocks`` (torch.compile per block)
    engine      the defaults under ``wrap`` (DeepSpeed ZeRO-2)
    zero1       the same engine at ZeRO stage 1
    ddp         the same engine at stage 0 (plain data parallel, ``ds_configs/ddp_*.json``)

The three engines are the ``--deepspeed`` config with only ``zero_optimization`` changed (stage 1:
``{"stage": 1}``, stage 0: ``{"stage": 0}``), so precision and everything else are alike. Under
torchrun (``python -m torch.distributed.run --nproc_per_node 2 benchmarks/train.py``) only the
three engines run, each rank on its own slice of threads, gradients all-reduced over gloo (the
plain loops would not be comparable: they never communicate); rank 0 prints. Each loop's time is
wall-clock and this process's CPU time (all its threads): CPU time counts less of a shared
machine's load (not none: threads that wait for a descheduled one spin), and each stage's ratio
is also given round by round (min, median).

The last lines are name=value:

    step_speedup_restricted_head=<step time of full / step time of default>      (goal: >= 1.5)
    loss_peak_memory_ratio=<peak memory of the loss, default / full>              (goal: <= 0.3)
    compile_speedup=<step time of default / step time of compiled>
    engine_overhead=<tokens/s of the plain loop (default) / tokens/s under the engine>  (goal: <= 1.10)
    ddp_engine_overhead=<the same against the stage-0 engine>
    engine_overhead_cpu_time, ddp_engine_overhead_cpu_time=<CPU time under the engine / of the plain loop>
    cpu_flops_utilization=<model FLOPs/s under the engine / FLOPs/s of a large fp32 matmul>
    zero1_over_ddp_step_time=<step time at ZeRO-1 / step time at stage 0>
    zero2_over_ddp_step_time=<step time at ZeRO-2 / step time at stage 0>
    zero1_over_ddp_cpu_time, zero2_over_ddp_cpu_time=<the same in CPU time>

(under torchrun only the last four, after the round-by-round lines).

Peak memory of the loss: from the hidden states (given, requiring grad) through the output layer,
the loss and its backward down to the hidden states' and lm_head's gradients, the most bytes the
CPU allocator held above what it held at the start. ``torch.profiler`` with ``profile_memory``
records every allocation and free with the allocator's running total ("Total Allocated", from 0 at
the profile's start); the peak is its maximum. The transformer blocks are left out: they are the
same in both.

Model FLOPs per token are ``BiART.flops_per_token`` (6N + 12 L d T; the head's rows as the head
option scores them). On a GPU run it with ``--deepspeed ds_configs/zero2_bf16.json`` and the ratio
reads as MFU against the measured bf16 matmul peak.

Usage: python benchmarks/train.py [--preset biart-mini] [--batch 2] [--steps 4] [--rounds 3]
       python -m torch.distributed.run --nproc_per_node 2 benchmarks/train.py   (the stages only)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import tempfile
import time

import torch
from common import build_engine, deepspeed_config, micro_step, random_batches

from lverse.model.biart import PRESETS, BiART, Direction, build_sequence
from lverse.pipeline.configs import OptimConfig
from lverse.runtime.deepspeed import build_optimizer, compile_blocks, precision
from lverse.runtime.distributed import setup_env
from lverse.runtime.trainer import measure_peak_flops

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def plain_step(model, opt, text, image, direction, dtype, device):
    seq = build_sequence(text, image, direction, model.cfg)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(seq[:, :-1], direction, targets=seq[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def timed(fn, data, steps: int, device) -> tuple[float, float]:
    """(wall-clock seconds, CPU seconds of this process) of ``steps`` steps ``fn(text, image, direction)``."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(steps):
        fn(*data[i % len(data)], Direction(i % 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def at_stage(ds: dict, stage: int) -> dict:
    """``ds`` with only the ZeRO stage changed (stage 1 and 0 take no stage-2 settings)."""
    out = copy.deepcopy(ds)
    out["zero_optimization"] = {"stage": stage}
    return out


def loss_peak_bytes(model, text, image, direction) -> int:
    """Peak CPU allocator bytes of the output layer + loss, forward and backward (module doc)."""
    seq = build_sequence(text, image, direction, model.cfg)
    with torch.no_grad():
        x = model.hidden_states(seq[:, :-1], direction)
    x.requires_grad_(True)
    model.zero_grad(set_to_none=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        if model.cfg.loss_chunk:
            losses = model.chunked_loss(x, seq[:, 1:], direction)
        else:
            losses = model.loss(model.logits(x), seq[:, 1:], direction)
        losses["loss"].backward()
    with tempfile.TemporaryDirectory() as tmp:
        prof.export_chrome_trace(os.path.join(tmp, "trace.json"))
        with open(os.path.join(tmp, "trace.json")) as f:
            events = json.load(f)["traceEvents"]
    return max(e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="biart-mini", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per round and loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first (compiles)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--deepspeed", default="zero2_fp32",
                        help="a ZeRO-2 ds_config; its precision is used for every loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    info = setup_env()
    import deepspeed
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device(f"cuda:{info.local_rank}" if cuda else "cpu")
    ds = deepspeed_config(args.deepspeed, args.batch, info.world_size)
    if ds.get("zero_optimization", {}).get("stage") != 2:
        parser.error(f"{args.deepspeed} is not a ZeRO-2 config")
    dtype = DTYPES[precision(ds)]
    optim = OptimConfig(fused=cuda)  # on the CPU every loop uses torch AdamW(foreach)

    default = PRESETS[args.preset]
    full = dataclasses.replace(default, head="full", loss_chunk=0)
    loops = {}
    if info.world_size == 1:
        for name, bcfg in (("full", full), ("default", default), ("compiled", default)):
            torch.manual_seed(0)
            model = BiART(bcfg).to(device).train()
            if name == "compiled":
                compile_blocks(model)
            opt, _ = build_optimizer(model, optim, dict(ds), 1e-4)  # the engine's optimizer choice
            loops[name] = lambda t, i, d, m=model, o=opt: plain_step(m, o, t, i, d, dtype, device)
    engines, kernels = {}, {}
    for name, config in (("engine", ds), ("zero1", at_stage(ds, 1)), ("ddp", at_stage(ds, 0))):
        torch.manual_seed(0)
        engines[name], kernels[name] = build_engine(BiART(default), config, 1e-4, device, fused=optim.fused)
        engines[name].train()
        loops[name] = lambda t, i, d, e=engines[name]: micro_step(e, t, i, d)
    data = random_batches(default, args.batch, 4, device)
    load_before = os.getloadavg()
    for fn in loops.values():
        timed(fn, data, args.warmup, device)
    rounds = {name: [] for name in loops}  # (wall, CPU) seconds of each round
    for _ in range(args.rounds):
        for name, fn in loops.items():
            rounds[name].append(timed(fn, data, args.steps, device))
    wall = {name: sum(w for w, _ in r) for name, r in rounds.items()}
    cpu = {name: sum(c for _, c in r) for name, r in rounds.items()}
    load_after = os.getloadavg()
    if info.rank:
        return
    steps = args.rounds * args.steps
    tokens = steps * args.batch * (default.seq_len - 1) * info.world_size
    tps = {name: tokens / seconds for name, seconds in wall.items()}
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({os.cpu_count()} cores), torch "
          f"{torch.__version__}, deepspeed {deepspeed.__version__}, {info.world_size} ranks x "
          f"{torch.get_num_threads()} threads, preset {args.preset}, batch {args.batch} per rank, {args.deepspeed}, "
          f"head {default.head}, loss_chunk {default.loss_chunk}")
    print(f"load average (1, 5, 15 min): before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"kernels (ZeRO-2): {kernels['engine']}")
    print("tokens/s (all ranks): " + ", ".join(f"{name} {v:.0f}" for name, v in tps.items()))
    print("per step, wall / CPU (rank 0) ms: " + ", ".join(
        f"{name} {1e3 * wall[name] / steps:.0f} / {1e3 * cpu[name] / steps:.0f}" for name in loops))
    if info.world_size == 1:
        memory = {name: max(loss_peak_bytes(BiART(bcfg).to(device), *data[0], d) for d in Direction)
                  for name, bcfg in (("full", full), ("default", default))}
        peak = measure_peak_flops(device, dtype if cuda else torch.float32, n=4096 if cuda else 2048)
        model_flops = engines["engine"].module.flops_per_token() * tps["engine"]
        print(f"loss peak memory: full {memory['full'] / 2**20:.0f} MiB, default {memory['default'] / 2**20:.0f} MiB")
        print(f"model: {engines['engine'].module.flops_per_token() / 1e6:.1f} MFLOP per token -> "
              f"{model_flops / 1e9:.2f} GFLOP/s; matmul peak {peak / 1e9:.1f} GFLOP/s")
        print(f"step_speedup_restricted_head={wall['full'] / wall['default']:.3f}")
        print(f"loss_peak_memory_ratio={memory['default'] / memory['full']:.3f}")
        print(f"compile_speedup={wall['default'] / wall['compiled']:.3f}")
        print(f"engine_overhead={tps['default'] / tps['engine']:.3f}")
        print(f"ddp_engine_overhead={tps['default'] / tps['ddp']:.3f}")
        print(f"engine_overhead_cpu_time={cpu['engine'] / cpu['default']:.3f}")
        print(f"ddp_engine_overhead_cpu_time={cpu['ddp'] / cpu['default']:.3f}")
        print(f"cpu_flops_utilization={model_flops / peak:.3f}")
    for name in ("zero1", "engine"):  # round by round: min and median, which a passing load spoils less
        for kind, i in (("wall", 0), ("CPU", 1)):
            ratios = sorted(a[i] / b[i] for a, b in zip(rounds[name], rounds["ddp"]))
            print(f"{name} / ddp per round, {kind}: min {ratios[0]:.3f}, median {ratios[len(ratios) // 2]:.3f}")
    print(f"zero1_over_ddp_step_time={wall['zero1'] / wall['ddp']:.3f}")
    print(f"zero2_over_ddp_step_time={wall['engine'] / wall['ddp']:.3f}")
    print(f"zero1_over_ddp_cpu_time={cpu['zero1'] / cpu['ddp']:.3f}")
    print(f"zero2_over_ddp_cpu_time={cpu['engine'] / cpu['ddp']:.3f}")

if __name__ == "__main__":
    main()
