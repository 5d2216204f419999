"""Text-to-image throughput: the generate task (``PromptGenerator``, in this process) with random
``--preset`` weights on ``--device``, ``--candidates`` images sampled per prompt (every one of its
image tokens), decoded by the AugVAE in FP32, reranked by CLIP (``--clip``) and written as PNGs,
after a warm-up prompt. Prints, as ``name=value`` lines:

    generate_prompts_per_s=<prompts done a second: each one best image of --candidates>
    generate_images_per_s=<candidate images a second: prompts/s x candidates>
    generate_peak_memory_mib=<CUDA's allocator on a GPU, else the process's resident set>

On a CPU the default is the ``debug`` preset (64 image tokens, a 64 px AugVAE): a check that the
script runs, not a figure to quote. On a GPU: ``--preset biart-500m --device cuda --precision bf16
--clip ViT-B-32`` (1024 tokens a candidate, the AugVAE-SL at 256 px).

Usage: python benchmarks/generate.py [--preset debug] [--device cpu] [--precision auto]
       [--prompts 2] [--candidates 64] [--decode-batch 16] [--clip lverse-tiny] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
from common import PeakMemory, captions, model_files, vocabulary

from lverse.pipeline.configs import GenerateConfig
from lverse.pipeline.generate import PromptGenerator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="debug")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--prompts", type=int, default=2, help="timed prompts")
    parser.add_argument("--candidates", type=int, default=64, help="images per prompt (the paper: 64)")
    parser.add_argument("--decode-batch", type=int, default=16, help="candidates decoded by the AugVAE at once")
    parser.add_argument("--clip", default="lverse-tiny", help="open_clip architecture (random weights)")
    parser.add_argument("--dir", default=None, help="keep (and reuse) the model files here")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="lverse-generate-bench-")
    try:
        print(f"{args.preset}, {args.device}, precision {args.precision}, {args.candidates} candidates, "
              f"CLIP {args.clip}", flush=True)
        figures = generate_throughput(folder, args.preset, args.device, args.precision, args.clip, args.prompts,
                                      candidates=args.candidates, decode_batch=args.decode_batch)
        print(f"generate_prompts_per_s={figures['generate_prompts_per_s']:.4f}")
        print(f"generate_images_per_s={figures['generate_images_per_s']:.3f}")
        print(f"generate_peak_memory_mib={figures['generate_peak_memory_mib']:.0f}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


def generate_throughput(folder: str, preset: str, device: str, precision: str, clip: str, prompts: int,
                        **generate: object) -> dict[str, float]:
    """The generate task (``PromptGenerator``, in this process) on ``prompts`` prompts after a
    warm-up prompt, random ``preset`` weights (model files kept in ``folder``), ``generate``'s
    ``GenerateConfig`` fields over the stage's defaults; returns ``generate_prompts_per_s``,
    ``generate_images_per_s`` (candidates a second) and ``generate_peak_memory_mib``."""
    os.makedirs(folder, exist_ok=True)
    files = model_files(folder, preset)
    rng = np.random.default_rng(2)
    texts = tuple(captions(rng, vocabulary(rng, 1000), prompts + 1))
    out = os.path.join(folder, "out")
    shutil.rmtree(out, ignore_errors=True)
    cfg = GenerateConfig(prompts="", output=out, **files, device=device, precision=precision, clip=clip, **generate)
    task = PromptGenerator(cfg, texts)
    assert task(range(0, 1)).ok  # loads the models, warms the kernels
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        result = task(range(1, 1 + prompts))
        seconds = time.perf_counter() - start
    assert result.ok and result.stats["generated"] == prompts, result
    return {"generate_prompts_per_s": prompts / seconds, "generate_images_per_s": prompts * cfg.candidates / seconds,
            "generate_peak_memory_mib": memory.mib}

if __name__ == "__main__":
    main()
