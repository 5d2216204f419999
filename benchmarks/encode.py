"""The encode stage's throughput against the bare AugVAE's, same weights, same machine, one run.

Writes synthetic raw shards (img2dataset's webdataset layout: ``{key}.jpg/.txt/.json``, JPEGs of
``--image-size`` pixels) and an AugVAE checkpoint (``torch.manual_seed(0)``) into a temporary
folder, then times two paths over the same images, alternating, ``--repeats`` times each:

- bare model: ``vae.encode`` on images already read, decoded and preprocessed into tensors, batched
  as the stage batches them (per shard, ``--batch-size`` at a time), after one warm-up batch;
- stage: ``run_encode`` with the local executor and 1 worker, raw shards in, token shards out (a
  fresh output folder each time), checked to hold the bare model's codes.

The stage's time per shard is the ``seconds`` of its ``{name}_stats.json`` done marker: reading the
tar, JPEG decoding and resizing, batching, the model and writing the token tar. It leaves out the
start-up (hashing and loading the checkpoint, spawning the worker, importing torch and loading the
model there), which a real run pays once per worker over thousands of shards; it keeps the
worker's first, cold forward pass in its first shard. That steady-state ratio is the last line;
the end-to-end one, start-up included, is printed above it with the start-up's seconds.

Each shard's time is the fastest of its repeats, for both paths, as ``timeit`` does: on a shared
machine other load comes and goes, and the fastest run is the least disturbed one.

    encode_pipeline_efficiency=<stage images/s (done markers) / bare model images/s>

Goal: at least 0.8.

Then the same stage end to end (start-up included) with one worker and with as many workers as
cores, each worker with its share of the threads (``core/resources.py``), alternating:

    encode_workers_scaling=<images/s with `cores` workers / images/s with 1 worker>

Goal: at least 0.95 (more workers are never slower). Give at least as many shards as cores.

Last, random crops (``--crops K``: each image encoded K + 1 times, the centre crop and K crops)
against none, the stage with 1 worker, alternating, each shard's fastest done-marker seconds:

    encode_views_per_s_crops0=<encoded views (images) a second without crops>
    encode_views_per_s_crops<K>=<encoded views (images x (K + 1)) a second with K crops>
    encode_per_view_ratio=<the second / the first>

Goal: at least 0.95 (a crop costs what an image costs, no more). Skipped with ``--crops 0``.

Usage: python benchmarks/encode.py [--preset augvae-sl] [--shards 2] [--per-shard 8]
       [--batch-size 4] [--image-size 256] [--repeats 2] [--crops 2] [--only-crops]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import numpy as np
import torch
from common import make_raw_shards

from lverse.core.images import preprocess
from lverse.core.resources import available_cores
from lverse.core.shards import iter_samples
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.pipeline.configs import MAX_CROPS, EncodeConfig
from lverse.pipeline.encode import run_encode


def shard_batches(paths: list[str], size: int, batch_size: int) -> list[list[torch.Tensor]]:
    """Every shard's preprocessed images, batched as the stage batches them."""
    out = []
    for path in paths:
        images = torch.from_numpy(np.stack([preprocess(files["jpg"], size) for files in iter_samples(path)]))
        out.append(list(images.split(batch_size)))
    return out


def time_bare_model(vae: AugVAE, batches: list[list[torch.Tensor]]) -> tuple[list[float], list[np.ndarray]]:
    """(seconds per shard, codes per shard)."""
    seconds, codes = [], []
    for shard in batches:
        start = time.perf_counter()
        codes.append(torch.cat([vae.encode(b) for b in shard]).numpy())
        seconds.append(time.perf_counter() - start)
    return seconds, codes


def time_parts(paths: list[str], size: int, codes: list[np.ndarray]) -> dict[str, float]:
    """Seconds of the stage's non-model work, one thread, in this process: tar reading, JPEG
    decoding + resizing, and writing the token tar (to memory)."""
    start = time.perf_counter()
    samples = [s for path in paths for s in iter_samples(path)]
    read = time.perf_counter() - start
    start = time.perf_counter()
    for files in samples:
        preprocess(files["jpg"], size)
    decode = time.perf_counter() - start
    start = time.perf_counter()
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as out:
        rows = (row for shard in codes for row in shard)
        for files, row in zip(samples, rows):
            key = files["__key__"]
            buf = io.BytesIO()
            np.save(buf, row.astype(np.uint16))
            meta = json.dumps({"key": key, "url": None, "vae": "0" * 64}, sort_keys=True).encode()
            for name, data in ((f"{key}.codes.npy", buf.getvalue()), (f"{key}.txt", files["txt"]),
                               (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                out.addfile(info, io.BytesIO(data))
    return {"read tar": read, "decode + resize": decode, "write tar": time.perf_counter() - start}


def run_stage(raw: str, vae_path: str, output: str, batch_size: int, workers: int = 1,
              crops: int = 0) -> tuple[float, list[float], list[np.ndarray]]:
    """Encode every raw shard with ``run_encode`` (local executor, ``workers`` processes, each its
    share of the cores; ``crops`` random crops an image).

    Returns (wall seconds, the done markers' seconds per shard, the token shards' codes per shard).
    """
    start = time.perf_counter()
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=output, batch_size=batch_size,
                            executor="local", workers=workers, crops=crops))
    wall = time.perf_counter() - start
    names = sorted(n.removesuffix("_stats.json") for n in os.listdir(output) if n.endswith("_stats.json"))
    seconds = []
    for name in names:
        with open(os.path.join(output, f"{name}_stats.json")) as f:
            seconds.append(json.load(f)["seconds"])
    codes = [np.stack([np.load(io.BytesIO(files["codes.npy"]))
                       for files in iter_samples(os.path.join(output, f"{n}.tar"))]) for n in names]
    return wall, seconds, codes


def encode_throughput(folder: str, preset: str, shards: int, per_shard: int, image_size: int) -> dict[str, float]:
    """The stage end to end from JPEG shards: ``shards`` raw shards of ``per_shard`` JPEGs of
    ``image_size`` px written into ``folder``, an AugVAE ``preset`` with random weights, then
    ``run_stage`` with the stage's own batch size and one worker (one model replica, on the GPU
    when there is one). ``encode_images_per_s``: images over the done markers' seconds (reading,
    decoding, the model, writing; the worker's first, cold batch included); ``..._end_to_end``:
    over the wall clock, the start-up (loading, spawning the worker) included."""
    raw = os.path.join(folder, "raw")
    make_raw_shards(raw, shards, per_shard, image_size)
    vae_path = os.path.join(folder, "vae.safetensors")
    torch.manual_seed(0)
    save_model(AugVAE(PRESETS[preset]), vae_path)
    batch_size = EncodeConfig.__dataclass_fields__["batch_size"].default
    wall, seconds, codes = run_stage(raw, vae_path, os.path.join(folder, "tokens"), batch_size)
    images = sum(len(c) for c in codes)
    assert images == shards * per_shard, f"{images} images encoded of {shards * per_shard}"
    return {"encode_images_per_s": images / sum(seconds), "encode_images_per_s_end_to_end": images / wall,
            "encode_batch_size": batch_size}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="augvae-sl", choices=sorted(PRESETS))
    parser.add_argument("--shards", type=int, default=2, help="raw shards")
    parser.add_argument("--per-shard", type=int, default=8, help="images per raw shard")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass, both paths")
    parser.add_argument("--image-size", type=int, default=256,
                        help="side of the served JPEGs (at least the preset's image_size)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each path, alternating")
    parser.add_argument("--crops", type=int, default=2, help="random crops an image against none (0: skip that part)")
    parser.add_argument("--only-crops", action="store_true", help="only the part on random crops")
    args = parser.parse_args(argv)
    size = PRESETS[args.preset].image_size
    if min(args.shards, args.per_shard, args.batch_size, args.repeats) < 1:
        parser.error("--shards, --per-shard, --batch-size and --repeats must be at least 1")
    if not 0 <= args.crops <= MAX_CROPS:
        parser.error(f"--crops must be between 0 and {MAX_CROPS}")
    if args.image_size < size:
        parser.error(f"--image-size {args.image_size} is below {args.preset}'s image_size {size}")

    with tempfile.TemporaryDirectory(prefix="lverse-encode-bench-") as tmp:
        raw = os.path.join(tmp, "raw")
        paths = make_raw_shards(raw, args.shards, args.per_shard, args.image_size)
        vae_path = os.path.join(tmp, "vae.safetensors")
        torch.manual_seed(0)
        save_model(AugVAE(PRESETS[args.preset]), vae_path)
        vae = AugVAE.from_pretrained(vae_path).eval().float().requires_grad_(False)  # as load_vae does
        print(f"preset {args.preset}: {sum(p.numel() for p in vae.parameters()) / 1e6:.1f}M parameters, "
              f"{size}px model input from {args.image_size}px JPEGs, {args.shards} shards x {args.per_shard} "
              f"images, batch {args.batch_size}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs")
        if not args.only_crops:
            compare_paths(args, raw, paths, vae_path, vae, tmp)
        if args.crops:
            compare_crops(args, raw, vae_path, tmp)


def compare_paths(args: argparse.Namespace, raw: str, paths: list[str], vae_path: str, vae: AugVAE, tmp: str) -> None:
    """The stage against the bare model, then 1 worker against ``cores`` workers."""
    size, n = PRESETS[args.preset].image_size, args.shards * args.per_shard
    batches = shard_batches(paths, size, args.batch_size)
    start = time.perf_counter()
    vae.encode(batches[0][0])
    print(f"bare model warm-up (first batch): {time.perf_counter() - start:.2f}s")

    bare, stage, walls, equal = [], [], [], True
    for r in range(args.repeats):
        seconds, codes = time_bare_model(vae, batches)
        bare.append(seconds)
        wall, seconds, stage_codes = run_stage(raw, vae_path, os.path.join(tmp, f"tokens{r}"), args.batch_size)
        stage.append(seconds)
        walls.append(wall)
        equal &= len(stage_codes) == len(codes) and all(map(np.array_equal, stage_codes, codes))
        print(f"run {r + 1}: bare model " + ", ".join(f"{s:.2f}s" for s in bare[-1]) +
              "; stage (done markers) " + ", ".join(f"{s:.2f}s" for s in seconds) + f", end to end {wall:.2f}s")
    bare_s, stage_s = sum(map(min, zip(*bare))), sum(map(min, zip(*stage)))
    startup = min(w - sum(s) for w, s in zip(walls, stage))
    print(f"bare model: {n / bare_s:.3f} images/s ({bare_s:.2f}s for {n} images, fastest per shard)")
    print(f"stage: {n / stage_s:.3f} images/s ({stage_s:.2f}s, fastest per shard); end to end with "
          f"start-up {n / min(walls):.3f} images/s ({min(walls):.2f}s, of which start-up {startup:.2f}s: "
          f"hash and load the checkpoint, spawn the worker, import torch and load the model there)")
    parts = time_parts(paths, size, codes)
    print("stage work besides the model, one thread: " +
          ", ".join(f"{k} {v * 1000 / n:.1f} ms/image" for k, v in parts.items()) +
          f"; the model {bare_s * 1000 / n:.0f} ms/image")
    print(f"codes_equal={str(equal).lower()}")
    print(f"encode_pipeline_efficiency_end_to_end={bare_s / min(walls):.2f}")
    print(f"encode_pipeline_efficiency={bare_s / stage_s:.2f}")

    cores = available_cores()
    one, many = [], []
    for r in range(args.repeats):
        one.append(run_stage(raw, vae_path, os.path.join(tmp, f"one{r}"), args.batch_size, 1)[0])
        many.append(run_stage(raw, vae_path, os.path.join(tmp, f"many{r}"), args.batch_size, cores)[0])
        print(f"run {r + 1}: 1 worker x {cores} threads {one[-1]:.2f}s, {cores} workers x 1 thread "
              f"{many[-1]:.2f}s (end to end)")
    print(f"encode_workers_scaling={min(one) / min(many):.2f}")


def compare_crops(args: argparse.Namespace, raw: str, vae_path: str, tmp: str) -> None:
    """Encoded views a second without crops and with ``args.crops`` (1 worker, done markers,
    each shard's fastest of ``args.repeats`` alternating runs)."""
    n, k = args.shards * args.per_shard, args.crops
    plain, cropped = [], []
    for r in range(args.repeats):
        plain.append(run_stage(raw, vae_path, os.path.join(tmp, f"crops0_{r}"), args.batch_size)[1])
        cropped.append(run_stage(raw, vae_path, os.path.join(tmp, f"crops{k}_{r}"), args.batch_size, crops=k)[1])
        print(f"run {r + 1}: crops 0 " + ", ".join(f"{s:.2f}s" for s in plain[-1]) + f"; crops {k} " +
              ", ".join(f"{s:.2f}s" for s in cropped[-1]) + " (done markers)")
    plain_rate = n / sum(map(min, zip(*plain)))
    cropped_rate = n * (k + 1) / sum(map(min, zip(*cropped)))
    print(f"encode_views_per_s_crops0={plain_rate:.3f}")
    print(f"encode_views_per_s_crops{k}={cropped_rate:.3f}")
    print(f"encode_per_view_ratio={cropped_rate / plain_rate:.2f}")


if __name__ == "__main__":
    main()
