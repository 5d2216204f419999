"""KV-cache generation against full recomputation, same weights, greedy, on the CPU.

Generates the 1024 image tokens of text->image and 32 text tokens of image->text on a mid-size
preset (``biart-mini``: the paper's vocabulary and sequence lengths, 4 layers of width 256), once
with the KV cache and once recomputing the whole sequence at every step. The last two lines are

    kv_cache_speedup=<seconds without cache / seconds with cache, both directions>
    kv_cache_equal=<true if both paths produced the same tokens>

Usage: python benchmarks/sampling.py [--preset biart-mini] [--batch 1] [--text-tokens 32]
"""

from __future__ import annotations

import argparse
import time

import torch

from lverse.model.biart import PRESETS, BiART, Direction, prompt_for


def timed_generate(model: BiART, prompt: torch.Tensor, direction: Direction, n: int, use_cache: bool):
    start = time.perf_counter()
    out = model.generate(prompt, direction, n, temperature=0, use_cache=use_cache)
    return out, time.perf_counter() - start


def cached_decode_step(model: BiART, batch: int, short: int = 64, long: int = 256) -> dict[str, float]:
    """One cached text->image decode step of ``batch`` sequences (greedy, random prompts): its
    seconds, the difference of generating ``long`` and ``short`` tokens over ``long - short`` (the
    prompt's prefill cancels out; fastest of 2), and the bytes it moves: the weights a step reads
    (blocks, final norm, the image rows of the head, in the model's dtype) and the KV cache at the
    mean length of the steps timed (read), plus one position's keys and values (written)."""
    cfg = model.cfg
    device = next(model.parameters()).device
    prompt = prompt_for(torch.randint(cfg.text_offset, cfg.pad_id, (batch, cfg.text_len), device=device),
                        Direction.T2I, cfg)

    def seconds(n: int) -> float:
        best = float("inf")
        for _ in range(2):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model.generate(prompt, Direction.T2I, n, temperature=0)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - start)
        return best
    seconds(short)  # warm-up
    step = (seconds(long) - seconds(short)) / (long - short)
    size = next(model.parameters()).element_size()
    weights = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("blocks.", "ln_f.")))
    weights += cfg.image_vocab * cfg.n_embd  # the head rows generation reads (BiART.generate)
    mean_len = prompt.shape[1] + (short + long) / 2
    kv = 2 * cfg.n_layer * batch * cfg.n_embd * (mean_len + 1)
    return {"kv_decode_step_s": step, "kv_decode_bytes_per_step": (weights + kv) * size,
            "kv_decode_bytes_per_s": (weights + kv) * size / step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="biart-mini", choices=sorted(PRESETS))
    parser.add_argument("--batch", type=int, default=1, help="sequences generated together")
    parser.add_argument("--text-tokens", type=int, default=32, help="image->text tokens")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    model = BiART(PRESETS[args.preset]).eval()
    cfg = model.cfg
    text = torch.randint(cfg.text_offset, cfg.pad_id, (args.batch, cfg.text_len))
    image = torch.randint(0, cfg.image_vocab, (args.batch, cfg.image_len))
    # A random model would end text rows at a sampled PAD at random; the benchmark wants all
    # 32 text tokens, so PAD is made unlikely (the mask keeps it a legal end-of-text).
    with torch.no_grad():
        model.lm_head.weight[cfg.pad_id].zero_()
    jobs = [(Direction.T2I, prompt_for(text, Direction.T2I, cfg), cfg.image_len),
            (Direction.I2T, prompt_for(image, Direction.I2T, cfg), args.text_tokens)]
    print(f"preset {args.preset}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"batch {args.batch}, {torch.get_num_threads()} threads")
    totals, equal = {True: 0.0, False: 0.0}, True
    for direction, prompt, n in jobs:
        outs = {}
        for use_cache in (True, False):
            outs[use_cache], seconds = timed_generate(model, prompt, direction, n, use_cache)
            totals[use_cache] += seconds
            print(f"{direction.name} {n} tokens, cache={use_cache}: {seconds:.2f}s "
                  f"({n * args.batch / seconds:.1f} tokens/s)")
        equal &= torch.equal(outs[True], outs[False])
    print(f"kv_cache_speedup={totals[False] / totals[True]:.1f}")
    print(f"kv_cache_equal={str(equal).lower()}")


if __name__ == "__main__":
    main()
