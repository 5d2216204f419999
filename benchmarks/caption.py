"""Batched KV-cache captioning against one image at a time without a cache, same model and candidates.

The captioner's sampling function (``pipeline.caption.sample_captions``) runs twice on the same
images: batched (``--batch`` images at once, the KV cache, each image's prompt run once and shared
by its candidates) and one image at a time with the cache off (every step recomputes the whole
sequence of all its candidates). The model is ``biart-mini``'s transformer (4 layers, width 256,
1024 image tokens, 64 text tokens) with the vocabulary of a small caption tokenizer fitted on
synthetic captions; weights are random, so captions run to ``--max-tokens``, the worst case.
CLIP reranking is left out of both: it costs the same either way. The last line is

    batched_caption_speedup=<images/s batched with cache / images/s one at a time without>  (goal: 10)

Then ``run_caption`` on image shards (debug BiART and AugVAE, random weights, 8 candidates, a random
tiny CLIP) end to end with one worker and with as many workers as cores, alternating:

    caption_workers_scaling=<images/s with `cores` workers / images/s with 1 worker>  (goal: 0.95)

Then throughput, the captioning task itself (``ShardCaptioner`` on a token shard, in this process:
reading, CLIP's view of each image through the AugVAE, sampling, reranking, the parquet) with
random ``--preset`` weights on ``--device``, after a warm-up shard, for greedy single captions and
for ``--rerank-candidates`` candidates (top-p 0.9) reranked by CLIP (``--clip``), each batched and
one image at a time (``--throughput-batch`` and 1 images per generation batch; ``--max-tokens``
a candidate, all of them sampled):

    caption_images_per_s_greedy=<images/s>   caption_images_per_s_greedy_one_image=<...>
    caption_images_per_s_rerank=<images/s>   caption_images_per_s_rerank_one_image=<...>
    caption_peak_memory_mib_greedy=<...>     caption_peak_memory_mib_rerank=<...>

(memory: CUDA's allocator on a GPU, the process's resident set on a CPU). The goals, on one
H100-class GPU with ``--preset biart-500m --device cuda --precision bf16 --clip ViT-B-32``:
300 images/s greedy, 30 images/s with 64 candidates and reranking.

Usage: python benchmarks/caption.py [--images 4] [--candidates 8] [--max-tokens 32] [--batch 4]
       [--shards 4] [--per-shard 8] [--repeats 2] [--throughput-only] [--preset biart-mini]
       [--device cpu] [--precision auto] [--throughput-images 8] [--throughput-batch 8]
       [--rerank-candidates 64] [--rerank-batch 4] [--clip lverse-tiny] [--dir DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time

import numpy as np
import torch
from common import PeakMemory, make_raw_shards, model_files, token_shard

from lverse.core.resources import available_cores
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS as VAE_PRESETS
from lverse.model.biart import PRESETS, BiART
from lverse.pipeline.caption import ShardCaptioner, run_caption, sample_captions
from lverse.pipeline.configs import CaptionConfig
from lverse.preprocessing.synthetic import draw_sample
from lverse.preprocessing.text_tokenizer import CaptionTokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=8, help="captions per image (the paper: 64)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=4, help="images per batch on the batched path")
    parser.add_argument("--shards", type=int, default=4, help="image shards of the workers scaling run")
    parser.add_argument("--per-shard", type=int, default=8, help="images per shard of the workers scaling run")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each worker count, alternating")
    parser.add_argument("--throughput-only", action="store_true", help="only the throughput figures")
    parser.add_argument("--preset", default="biart-mini", help="BiART size of the throughput figures")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--throughput-images", type=int, default=8, help="images of the timed shard")
    parser.add_argument("--throughput-batch", type=int, default=8, help="images per batch, greedy")
    parser.add_argument("--rerank-candidates", type=int, default=64, help="candidates per image (the paper: 64)")
    parser.add_argument("--rerank-batch", type=int, default=4, help="images per batch, with candidates")
    parser.add_argument("--clip", default="lverse-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--dir", default=None, help="keep (and reuse) the model files here")
    args = parser.parse_args(argv)
    if args.throughput_only:
        throughput(args)
        return

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = CaptionTokenizer.fit([draw_sample(rng, 32)[1] for _ in range(500)], os.path.join(tmp, "tok"),
                                   vocab_size=128, offset=PRESETS["biart-mini"].image_vocab)
    torch.manual_seed(0)
    model = BiART(dataclasses.replace(PRESETS["biart-mini"], text_vocab=tok.vocab_size)).eval()
    codes = torch.randint(model.cfg.image_vocab, (args.images, model.cfg.image_len), generator=torch.Generator()
                          .manual_seed(0))
    kw = dict(candidates=args.candidates, max_tokens=args.max_tokens, temperature=1.0, top_p=0.9)

    start = time.perf_counter()
    batched = []
    for i in range(0, args.images, args.batch):
        batched += sample_captions(model, tok, codes[i:i + args.batch], generator=torch.Generator().manual_seed(i),
                                   **kw)
    t_batched = time.perf_counter() - start

    start = time.perf_counter()
    single = []
    for i in range(args.images):
        single += sample_captions(model, tok, codes[i:i + 1], use_cache=False,
                                  generator=torch.Generator().manual_seed(i), **kw)
    t_single = time.perf_counter() - start

    assert len(batched) == len(single) == args.images and all(len(c) == args.candidates for c in batched)
    print(f"device: cpu ({os.cpu_count()} cores), torch threads {torch.get_num_threads()}; biart-mini transformer, "
          f"text vocab {tok.vocab_size}; {args.images} images x {args.candidates} candidates x "
          f"{args.max_tokens} tokens")
    print(f"batched, KV cache (batch {args.batch}): {t_batched:.2f} s ({args.images / t_batched:.3f} images/s)")
    print(f"one image at a time, no cache: {t_single:.2f} s ({args.images / t_single:.3f} images/s)")
    print(f"example caption: {batched[0][0]!r}")
    print(f"batched_caption_speedup={t_single / t_batched:.1f}")
    workers_scaling(args.shards, args.per_shard, args.repeats)
    throughput(args)


def throughput(args) -> None:
    """Images/s of the captioning task, greedy and reranked, batched and one image at a time."""
    folder = args.dir or tempfile.mkdtemp(prefix="lverse-caption-bench-")
    try:
        greedy = dict(candidates=1, temperature=0.0, top_p=None, batch_size=args.throughput_batch)
        rerank = dict(candidates=args.rerank_candidates, top_p=0.9, batch_size=args.rerank_batch)
        modes = {"greedy": greedy, "greedy_one_image": {**greedy, "batch_size": 1},  # greedy first: on a CPU
                 "rerank": rerank, "rerank_one_image": {**rerank, "batch_size": 1}}  # the resident set only grows
        print(f"throughput: {args.preset}, {args.device}, precision {args.precision}, {args.throughput_images} "
              f"images x {args.max_tokens} tokens, CLIP {args.clip}", flush=True)
        figures = caption_throughput(folder, args.preset, args.device, args.precision, args.clip,
                                     args.throughput_images, modes, max_tokens=args.max_tokens)
        for name, mode in modes.items():
            print(f"caption_images_per_s_{name}={figures[f'caption_images_per_s_{name}']:.3f}"
                  f"  # batch {mode['batch_size']}, {mode['candidates']} candidates", flush=True)
            if not name.endswith("_one_image"):
                print(f"caption_peak_memory_mib_{name}={figures[f'caption_peak_memory_mib_{name}']:.0f}", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def caption_throughput(folder: str, preset: str, device: str, precision: str, clip: str, images: int,
                       modes: dict[str, dict], **caption: object) -> dict[str, float]:
    """The captioning task itself (``ShardCaptioner`` on a token shard of ``images``, in this
    process) with random ``preset`` weights (model files kept in ``folder``), once per mode
    (``CaptionConfig`` fields over ``caption``'s and the stage's defaults), each after a warm-up
    shard that loads the models; returns ``caption_images_per_s_<mode>`` and
    ``caption_peak_memory_mib_<mode>`` (``PeakMemory``: measure the smaller modes first on a CPU)."""
    os.makedirs(folder, exist_ok=True)
    files = model_files(folder, preset)
    shard = token_shard(folder, preset, images)
    warm = token_shard(os.path.join(folder, "warm"), preset, 2)
    base = CaptionConfig(shards="", output="", **files, device=device, precision=precision, clip=clip, **caption)
    figures = {}
    for name, mode in modes.items():
        cfg = dataclasses.replace(base, **mode)
        out = os.path.join(folder, f"out-{name}")
        for path in (out, out + "-warm"):
            shutil.rmtree(path, ignore_errors=True)
        ShardCaptioner(dataclasses.replace(cfg, output=out + "-warm"))(warm)  # loads the models
        with PeakMemory(device) as memory:
            result = ShardCaptioner(dataclasses.replace(cfg, output=out))(shard)
        assert result.ok and result.stats["failed"] == 0, result
        figures[f"caption_images_per_s_{name}"] = result.stats["images"] / result.stats["seconds"]
        figures[f"caption_peak_memory_mib_{name}"] = memory.mib
    return figures


def workers_scaling(shards: int, per_shard: int, repeats: int) -> None:
    """``run_caption`` end to end (start-up included) with 1 worker and with as many as cores,
    alternating; each worker runs its share of the threads (``core/resources.py``)."""
    cores = available_cores()
    rng = np.random.default_rng(1)
    with tempfile.TemporaryDirectory() as tmp:
        tok = CaptionTokenizer.fit([draw_sample(rng, 32)[1] for _ in range(500)], os.path.join(tmp, "tok"),
                                   vocab_size=128, offset=PRESETS["debug"].image_vocab)
        torch.manual_seed(0)
        vae, biart = os.path.join(tmp, "vae.safetensors"), os.path.join(tmp, "biart.safetensors")
        save_model(AugVAE(VAE_PRESETS["debug-sl"]), vae)  # 64px, 64 tokens, 512 codes: the debug BiART's
        save_model(BiART(dataclasses.replace(PRESETS["debug"], text_vocab=tok.vocab_size, text_len=24)), biart)
        raw = os.path.join(tmp, "raw")
        make_raw_shards(raw, shards, per_shard, 64)
        base = CaptionConfig(shards=raw, checkpoint=biart, vae=vae, tokenizer=os.path.join(tmp, "tok.model"),
                             output="", candidates=8, max_tokens=16, batch_size=4, clip="lverse-tiny")
        one, many = [], []
        for r in range(repeats):
            for n, times in ((1, one), (cores, many)):
                start = time.perf_counter()
                run_caption(dataclasses.replace(base, output=os.path.join(tmp, f"out{n}-{r}"), workers=n))
                times.append(time.perf_counter() - start)
            print(f"run {r + 1}: 1 worker x {cores} threads {one[-1]:.2f}s, {cores} workers x 1 thread "
                  f"{many[-1]:.2f}s ({shards} shards x {per_shard} images, debug BiART, 8 candidates, end to end)")
    print(f"caption_workers_scaling={min(one) / min(many):.2f}")


if __name__ == "__main__":
    main()
