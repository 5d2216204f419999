"""Training throughput: a plain PyTorch loop against the DeepSpeed engine (ZeRO-2), one process.

Same model (``biart-mini`` by default: the paper's vocabulary and sequence length, 4 layers of
width 256), same optimizer (AdamW with the same groups), same precision, same random batches,
directions alternating. The two loops take turns (``--rounds`` rounds of ``--steps`` timed steps
each, after warm-up steps) so that drift of the machine hits both alike. The last lines are

    engine_overhead=<tokens/s of the plain loop / tokens/s under the engine>   (goal: at most 1.10)
    cpu_flops_utilization=<model FLOPs/s under the engine / FLOPs/s of a large fp32 matmul>

Model FLOPs per token are ``train.flops_per_token`` (6N + 12 L d T). On a GPU run it with
``--deepspeed ds_configs/zero2_bf16.json`` and the ratio reads as MFU against the measured bf16
matmul peak.

Usage: python benchmarks/train.py [--preset biart-mini] [--batch 2] [--steps 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from lverse.model.biart import PRESETS, BiART, Direction
from lverse.pipeline.train import (
    TrainConfig,
    build_optimizer,
    flops_per_token,
    load_ds_config,
    measure_peak_flops,
    precision,
    wrap,
)
from lverse.runtime.distributed import setup_env

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def batches(cfg, batch: int, n: int, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(cfg.image_vocab, (batch, cfg.seq_len), generator=g).to(device) for _ in range(n)]


def plain_step(model, opt, seq, direction, dtype, device):
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        _, loss = model(seq[:, :-1], direction, targets=seq[:, 1:])
    opt.zero_grad(set_to_none=True)
    loss["loss"].backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def engine_step(engine, seq, direction):
    _, loss = engine(seq[:, :-1], direction, targets=seq[:, 1:])
    engine.backward(loss["loss"])
    engine.step()


def timed(fn, data, steps: int, device) -> float:
    start = time.perf_counter()
    for i in range(steps):
        fn(data[i % len(data)], Direction(i % 2))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="biart-mini", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round and loop")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per loop first")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    parser.add_argument("--deepspeed", default="zero2_fp32",
                        help="a ZeRO-2 ds_config; its precision is used for both loops")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    setup_env()
    import deepspeed
    cuda = torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
    device = torch.device("cuda" if cuda else "cpu")
    cfg = TrainConfig(micro_batch_size=args.batch)
    ds = load_ds_config(args.deepspeed, cfg, world_size=1)
    if ds.get("zero_optimization", {}).get("stage") != 2:
        parser.error(f"{args.deepspeed} is not a ZeRO-2 config")
    dtype = DTYPES[precision(ds)]
    if not cuda:
        cfg.optim.fused = False  # both loops use torch AdamW(foreach) on the CPU

    torch.manual_seed(0)
    plain = BiART(PRESETS[args.preset]).to(device).train()
    opt, _ = build_optimizer(plain, cfg.optim, dict(ds), 1e-4)  # the engine's optimizer choice
    torch.manual_seed(0)
    engine, kernels = wrap(BiART(PRESETS[args.preset]), cfg, ds, 1e-4, device)
    engine.train()
    data = batches(plain.cfg, args.batch, 4, device)
    run_plain = lambda seq, d: plain_step(plain, opt, seq, d, dtype, device)  # noqa: E731
    run_engine = lambda seq, d: engine_step(engine, seq, d)  # noqa: E731
    timed(run_plain, data, args.warmup, device)
    timed(run_engine, data, args.warmup, device)
    t_plain = t_engine = 0.0
    for _ in range(args.rounds):
        t_plain += timed(run_plain, data, args.steps, device)
        t_engine += timed(run_engine, data, args.steps, device)
    tokens = args.rounds * args.steps * args.batch * (plain.cfg.seq_len - 1)
    plain_tps, engine_tps = tokens / t_plain, tokens / t_engine
    peak = measure_peak_flops(device, dtype if cuda else torch.float32, n=4096 if cuda else 2048)
    model_flops = flops_per_token(plain) * engine_tps
    print(f"device: {torch.cuda.get_device_name() if cuda else 'cpu'} ({os.cpu_count()} cores), "
          f"torch threads {torch.get_num_threads()}, preset {args.preset}, batch {args.batch}, {args.deepspeed}")
    print(f"kernels: {kernels}")
    print(f"plain loop: {plain_tps:.0f} tokens/s; DeepSpeed ZeRO-2: {engine_tps:.0f} tokens/s")
    print(f"model: {flops_per_token(plain) / 1e6:.1f} MFLOP per token -> {model_flops / 1e9:.2f} GFLOP/s; "
          f"matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"engine_overhead={plain_tps / engine_tps:.3f}")
    print(f"cpu_flops_utilization={model_flops / peak:.3f}")


if __name__ == "__main__":
    main()
