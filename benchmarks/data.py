"""BiART's training data loader alone: token batches per second from the token index.

Builds a data set in the real format into ``--dir`` (a temporary folder by default; a folder given
is reused when it holds the same set-up):

- token shards as ``lverse encode`` writes them (``pipeline/encode.py``: ``{key}.codes.npy``,
  ``{key}.txt``, ``{key}.json`` members through its own tar writer, then ``{name}_stats.json``),
  ``--per-shard`` samples each, ``--samples`` in all, each with 1024 AugVAE-SL codes below 8192
  (uniformly random: what the loader does with a code does not depend on its value);
- captions of CC3M-like length (10.5 words, 59 characters, mean), drawn from a Zipf law over a
  vocabulary of 143 common English caption words and made-up words of English-like syllables,
  100,000 words in all (no caption data is available offline);
- the caption tokenizer fitted on those captions with ``CaptionTokenizer.fit`` at the paper's
  49,808 pieces (``--vocab``);
- the token index (``build_index``, as ``lverse index`` builds it).

Then reads every index file once (the page cache is warm: the figure is the loader's, not the
disk's) and times the training DataLoader exactly as ``pipeline/train.py`` ``data_loader`` builds
it: ``open_samples`` -> ``GlobalOrder`` -> ``TokenBatch`` (text_len 64, image_len 1024,
text_offset 8192, BPE-dropout 0.1) -> ``GlobalBatches`` (rank 0 of 1, micro-batch ``--batch``,
``handover_chunk`` micro-batches an item) -> ``batch_loader`` (W workers, ``ignore_stop_signals``)
-> ``micro_batches``, for
each W of ``--workers``: batches are taken for ``--warmup`` seconds (workers start, tokenizers
load, and each worker's tokenizer fills its cache of words' plain BPE: the rate of a long run
comes after that), then counted for ``--seconds``. Figures, as ``name=value`` lines:

    loader_first_seconds_samples_per_s_workersW=<samples/s during the warm-up seconds>
    loader_samples_per_s_workersW=<samples/s with W workers>
    loader_cpu_us_per_sample_workersW=<CPU microseconds per sample, this process and its workers
                                       together (from /proc): what the rate would be per free core>
    loader_samples_per_s=<the best rate>   (goal: at least 20,000 on 2 cores)
    loader_best_workers=<its W>
    loader_bytes_per_sample=<bytes of the index a sample is read from: its 2 x 1024 bytes of codes,
                             its caption's and its key's bytes (the mean) and the 2 x 16 bytes of
                             its caption and key offsets>
    batch_bytes_per_sample=<bytes of the batch tensors a sample makes: its text and image ids, as
                            narrow as they fit (uint16 for BiART's ids; ``TokenBatch``)>

Before them, to see where the time goes: the mean caption (``caption_chars``, ``caption_words``,
``caption_pieces`` without dropout) and microseconds per sample of the loader's parts one after
another in this process (``read_us_per_sample``: ``TokenSamples.take`` a micro-batch at a time;
``sample_seed_us_per_sample``; ``make_batch_us_per_sample``: ``TokenBatch``, BPE-dropout most of
it). The worker processes add the DataLoader's cost of handing each batch over, a fixed cost per
batch: compare ``--batch 8`` with ``--batch 32``. On a shared machine the rates move with the
other load; the CPU figures much less.

Usage: python benchmarks/data.py [--samples 100000] [--per-shard 10000] [--batch 8] [--seconds 10]
       [--warmup 30] [--workers 0 1 2] [--vocab 49808] [--dir DIR]
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import tempfile
import time

import numpy as np
from common import BPE_DROPOUT, IMAGE_LEN, IMAGE_VOCAB, TEXT_LEN, VAE, captions, make_token_shards, vocabulary

from lverse.core.files import atomic_write_json, read_json
from lverse.core.vocab import VOCAB_SIZE
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.data import (
    GlobalBatches,
    GlobalOrder,
    TokenBatch,
    batch_loader,
    handover_chunk,
    micro_batches,
    sample_seed,
)
from lverse.runtime.token_index import FILES, index_path, open_samples
from lverse.runtime.token_index_build import build_index
from lverse.runtime.trainer import ignore_stop_signals


def prepare(folder: str, samples: int, per_shard: int, vocab: int) -> tuple[list[str], str]:
    """(shards, tokenizer .model) in ``folder``, made unless it holds this set-up."""
    # version: of the files made here
    setup = {"samples": samples, "per_shard": per_shard, "vocab": vocab, "version": 2}
    marker, tokens = os.path.join(folder, "setup.json"), os.path.join(folder, "tokens")
    tokenizer = os.path.join(folder, "tokenizer.model")
    if os.path.isfile(marker) and read_json(marker) == setup:
        return sorted(glob.glob(os.path.join(tokens, "*.tar"))), tokenizer
    shutil.rmtree(tokens, ignore_errors=True)
    rng = np.random.default_rng(0)
    texts = captions(rng, vocabulary(rng), samples)
    start = time.perf_counter()
    shards = make_token_shards(tokens, samples, per_shard, texts)
    print(f"# {len(shards)} token shards in {time.perf_counter() - start:.1f} s", flush=True)
    start = time.perf_counter()
    CaptionTokenizer.fit(texts, tokenizer[:-len(".model")], vocab_size=vocab)
    print(f"# tokenizer of {vocab} pieces fitted in {time.perf_counter() - start:.1f} s", flush=True)
    summary = build_index(tokens, progress=False)
    print(f"# token index: {summary['samples']} samples, {summary['bytes'] / 1e6:.1f} MB, "
          f"{summary['seconds']:.1f} s", flush=True)
    atomic_write_json(marker, setup)
    return shards, tokenizer


def warm(tokens: str) -> int:
    """Read every file of the index once (into the page cache); returns the bytes read."""
    total = 0
    for name in FILES:
        with open(os.path.join(index_path(tokens), name), "rb") as f:
            while chunk := f.read(1 << 24):
                total += len(chunk)
    return total


def loader(shards: list[str], tokenizer: str, batch: int, workers: int, seed: int = 0):
    """The training DataLoader as ``pipeline/train.py`` ``data_loader`` builds it (rank 0 of 1,
    from sample 0)."""
    samples = open_samples(shards, VAE)
    order = GlobalOrder(len(samples), seed, False)
    make_batch = TokenBatch(tokenizer, IMAGE_VOCAB, TEXT_LEN, IMAGE_LEN, IMAGE_VOCAB, BPE_DROPOUT)
    batches = GlobalBatches(samples, order, make_batch, batch, 0, 1, workers, 0, handover_chunk(batch, workers))
    items = batch_loader(batches, workers, ignore_stop_signals)
    return micro_batches(items, batch), [w.pid for w in getattr(items, "_workers", [])]


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) the processes ``pids`` have used so far (Linux)."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def time_loader(shards, tokenizer, batch: int, workers: int, warmup: float, seconds: float,
                ) -> tuple[float, float, float]:
    """(samples/s, CPU microseconds per sample of this process and the workers together) of the
    loader with ``workers`` workers, after ``warmup`` seconds of batches; and the samples/s of
    those first seconds (worker start-up and the tokenizers' word caches filling)."""
    it, pids = loader(shards, tokenizer, batch, workers)
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < warmup:
        count += len(next(it)["image"])
    cold = count / elapsed
    count, start, cpu = 0, time.perf_counter(), time.process_time() + cpu_seconds(pids)
    while (elapsed := time.perf_counter() - start) < seconds:
        count += len(next(it)["image"])
    cpu = time.process_time() + cpu_seconds(pids) - cpu
    del it  # ends the workers
    return count / elapsed, cpu / count * 1e6, cold


def parts(shards, tokenizer, batch: int, n: int = 4000) -> dict:
    """Microseconds per sample of the loader's parts, one after another in this process, on the
    order's first ``n`` samples: reading them from the index (a batch at a time, as
    ``GlobalBatches`` does), making their seeds (``sample_seed``), and ``TokenBatch`` (the first
    batch, which loads the tokenizer, not counted)."""
    samples = open_samples(shards, VAE)
    n = min(n, len(samples)) // batch * batch
    order = [int(i) for i in GlobalOrder(len(samples), 0).epoch(0)[:n]]
    take = getattr(samples, "take", None) or (lambda indices: [samples[i] for i in indices])
    start = time.perf_counter()
    read = [s for i in range(0, n, batch) for s in take(order[i:i + batch])]
    read_us = (time.perf_counter() - start) / n * 1e6
    start = time.perf_counter()
    seeds = [sample_seed(0, 0, s["__key__"]) for s in read]
    seed_us = (time.perf_counter() - start) / n * 1e6
    make_batch = TokenBatch(tokenizer, IMAGE_VOCAB, TEXT_LEN, IMAGE_LEN, IMAGE_VOCAB, BPE_DROPOUT)
    make_batch(read[:batch], seeds[:batch])  # loads the tokenizer
    start = time.perf_counter()
    for i in range(0, n, batch):
        make_batch(read[i:i + batch], seeds[i:i + batch])
    return {"read_us_per_sample": read_us, "sample_seed_us_per_sample": seed_us,
            "make_batch_us_per_sample": (time.perf_counter() - start) / n * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--per-shard", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=8, help="micro-batch (configs/train_cc3m.yaml: 8)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=30.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    parser.add_argument("--dir", default=None, help="keep (and reuse) the data set here")
    args = parser.parse_args()
    folder = args.dir or tempfile.mkdtemp(prefix="lverse-data-bench-")
    try:
        os.makedirs(folder, exist_ok=True)
        shards, tokenizer = prepare(folder, args.samples, args.per_shard, args.vocab)
        tokens = os.path.dirname(shards[0])
        print(f"# page cache warmed with {warm(tokens) / 1e6:.1f} MB", flush=True)
        tok = CaptionTokenizer(tokenizer, offset=IMAGE_VOCAB)
        samples = open_samples(shards, VAE)
        some = [samples[i]["txt"].decode() for i in range(min(2000, len(samples)))]
        print(f"caption_chars={np.mean([len(t) for t in some]):.1f}")
        print(f"caption_words={np.mean([len(t.split()) for t in some]):.2f}")
        print(f"caption_pieces={np.mean([len(tok.pieces(t)) for t in some]):.2f}")
        for name, value in parts(shards, tokenizer, args.batch).items():
            print(f"{name}={value:.1f}", flush=True)
        rates = {}
        for workers in args.workers:
            rates[workers], cpu_us, cold = time_loader(shards, tokenizer, args.batch, workers, args.warmup,
                                                       args.seconds)
            print(f"loader_first_seconds_samples_per_s_workers{workers}={cold:.0f}", flush=True)
            print(f"loader_samples_per_s_workers{workers}={rates[workers]:.0f}", flush=True)
            print(f"loader_cpu_us_per_sample_workers{workers}={cpu_us:.0f}", flush=True)
        best = max(rates, key=rates.get)
        print(f"loader_samples_per_s={rates[best]:.0f}")
        print(f"loader_best_workers={best}")
        index = index_path(tokens)
        blobs = sum(os.path.getsize(os.path.join(index, name)) for name in ("codes.u16", "captions.bin", "keys.bin"))
        sample_bytes = blobs / args.samples + 2 * 16
        print(f"loader_bytes_per_sample={sample_bytes:.0f}")
        batch = TokenBatch(tokenizer, IMAGE_VOCAB, TEXT_LEN, IMAGE_LEN, IMAGE_VOCAB, BPE_DROPOUT)(
            [samples[0]], [sample_seed(0, 0, samples[0]["__key__"])])
        print(f"batch_bytes_per_sample={sum(t.nbytes for t in batch.values())}")
    finally:
        if args.dir is None:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
