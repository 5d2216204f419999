"""How much the demo's outcome moves with the seed and the CPU's kernels, measured run by run.

Two measurements (docs/demo.md reports both):

- ``--stage vae``: the demo's AugVAE stage alone (its own train-vae config, ``Demo.vae_values``)
  on one downloaded training set, once per (seed, thread count). Threads change the summation
  order of the kernels much as another CPU does. Each run's held-out reconstructions are judged by
  ``vae_quality``: mean PSNR and the share of shapes whose colour survives. Runs are sequential, so
  the seconds are those of a machine doing nothing else.
- ``--stage demo``: ``lverse demo --seed N`` from start to end for each seed (each seed draws its
  own synthetic data, weights and samples), one after another; its ``demo_results.json``.

Each run prints ``name=value`` lines prefixed by its seed (and threads), then min / median / max:

    seed1_threads2_vae_psnr=24.59 ... vae_psnr_min=... vae_color_kept_min=...
    seed3_caption_accuracy=0.910 ... caption_accuracy_min=... t2i_color_accuracy_min=... seconds_max=...

Usage: python benchmarks/demo_spread.py --stage vae --seeds 0 1 2 3 4 --threads 1 2 [--output runs/spread]
       python benchmarks/demo_spread.py --stage demo --seeds 0 1 2 3 4 [--output runs/spread]
A rerun keeps finished runs (each is a demo folder with its done markers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

from lverse.demo import Demo, DemoConfig, vae_quality


def vae_spread(output: str, seeds: list[int], threads: list[int]) -> list[dict]:
    data = Demo(DemoConfig(output=os.path.join(output, "data")))
    os.makedirs(data.out, exist_ok=True)
    tsv = {split: data.path("data", f"{split}.tsv") for split in ("train", "heldout")}
    args = ["--image-size", str(data.cfg.image_size), "--resize-mode", "center_crop", "--workers", "2"]
    with data.server(tsv) or nullcontext():
        data.stage("download", ["download", "--input", tsv["train"], "--output", data.path("images"), *args])
        data.stage("download-heldout", ["download", "--input", tsv["heldout"], "--output",
                                        data.path("heldout", "images"), *args])
    runs = []
    for seed in seeds:
        for n in threads:
            run = Demo(DemoConfig(output=os.path.join(output, f"vae-seed{seed}-threads{n}"), seed=seed))
            values = {**run.vae_values(), "shards": data.path("images"),
                      "eval_shards": data.path("images", "00000.tar")}
            config = run.path("augvae.yaml")
            env = {**os.environ, "OMP_NUM_THREADS": str(n)}
            t0 = time.time()
            run.stage("train-vae", ["train-vae", "--config", config], (config, values), env=env)
            quality = vae_quality(run.path("augvae", "augvae-sl.safetensors"), data.path("heldout", "images"))
            runs.append({"name": f"seed{seed}_threads{n}", **quality, "seconds": round(time.time() - t0)})
    return runs


def demo_spread(output: str, seeds: list[int]) -> list[dict]:
    runs = []
    for seed in seeds:
        folder = os.path.join(output, f"demo-seed{seed}")
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "lverse.cli", "demo", "--output", folder, "--seed", str(seed),
                        "--min-accuracy", "0"], check=True)
        with open(os.path.join(folder, "demo_results.json")) as f:
            results = json.load(f)
        runs.append({"name": f"seed{seed}", **{k: results[k] for k in (
            "caption_accuracy", "caption_accuracy_first_candidate", "t2i_color_accuracy",
            "t2i_color_accuracy_first_candidate", "vae_psnr", "vae_color_kept")},
            "seconds": results["seconds"], "wall_seconds": round(time.time() - t0)})
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=("vae", "demo"), default="demo")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="OMP_NUM_THREADS of --stage vae")
    ap.add_argument("--output", default="runs/spread")
    args = ap.parse_args()
    runs = (vae_spread(args.output, args.seeds, args.threads) if args.stage == "vae"
            else demo_spread(args.output, args.seeds))
    for run in runs:
        print(" ".join(f"{run['name']}_{k}={v:.4g}" for k, v in run.items() if k != "name"))
    for key in (k for k in runs[0] if k != "name"):
        values = [run[key] for run in runs]
        print(f"{key}_min={min(values):.4g} {key}_median={statistics.median(values):.4g} {key}_max={max(values):.4g}")


if __name__ == "__main__":
    main()
