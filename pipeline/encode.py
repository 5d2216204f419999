"""The encode stage: image shards -> token shards through a frozen AugVAE in FP32.

One raw shard (img2dataset's webdataset tar) in, one token shard of the same name out, a
webdataset tar whose samples hold:

    {key}.codes.npy   uint16 AugVAE codes, (num_tokens,), row-major
    {key}.txt         the raw caption (tokenised at training time, for BPE-dropout)
    {key}.json        {"key", "url", "vae"}: "vae" is the sha256 of the AugVAE checkpoint file

The tar is written under a temporary name and renamed into place, then ``{name}_stats.json``
(the done marker) is written; a rerun skips shards that have one. Its bytes depend only on the
input shard and the checkpoint (fixed member order, times and owners, and fixed batches: conv
kernels round differently for other batch sizes, which can flip a near-tie code), so a shard
encoded after a crash is byte-identical to one from an uninterrupted run. A sample whose image does not decode
is skipped and counted; a shard that cannot be read fails alone, with its reason, and is retried.

Workers (Ray actors, or local processes) load the model once and keep it. JPEG decoding and
resizing run on a thread pool while the model encodes the previous batch. Each worker runs its
share of the cores (``resources.py``).
"""

from __future__ import annotations

import collections
import glob
import io
import json
import logging
import os
import socket
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lverse.core.files import atomic_output, atomic_write_json, read_json, remove_stale_temporaries
from lverse.core.images import preprocess
from lverse.core.resources import resolve_device
from lverse.core.shards import check_vae, expand_shards, file_sha256, iter_samples, sample_meta, shard_name
from lverse.model.cache import load_vae
from lverse.runtime.executors import TaskResult
from lverse.runtime.stage import ModelExecution, rate, run_shard_stage

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class EncodeConfig(ModelExecution):
    shards: str  # a folder, a glob ("raw/*.tar") or a range ("raw/{00000..00099}.tar")
    vae: str  # AugVAE checkpoint: lverse .safetensors or the official .ckpt
    output: str  # folder for token shards and _summary.json
    batch_size: int = 32  # images per forward pass
    decode_threads: int | None = None  # JPEG decode + resize threads per worker (None: its thread share)


def _ordered_prefetch(pool: ThreadPoolExecutor, fn, items, window: int):
    """``pool.map`` with at most ``window`` results in flight (bounded memory), in order."""
    pending = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            item0, fut = pending.popleft()
            yield item0, fut.result()
    while pending:
        item0, fut = pending.popleft()
        yield item0, fut.result()


@dataclass(frozen=True)
class ShardEncoder:
    """The per-shard task: picklable; the model is loaded once per worker process."""

    vae: str
    vae_hash: str
    output: str
    batch_size: int = 32
    decode_threads: int | None = None  # None: as many as the worker's compute threads
    device: str = "auto"

    def __call__(self, shard: str) -> TaskResult:
        name = shard_name(shard)
        done = os.path.join(self.output, f"{name}_stats.json")
        if os.path.exists(done):
            return TaskResult(name, ok=True, skipped=True)
        device = resolve_device(self.device)
        vae = load_vae(self.vae, device)
        start, stats = time.time(), {"samples": 0, "corrupt": 0, "bad_json": 0, "no_extension": 0}
        target = os.path.join(self.output, f"{name}.tar")
        remove_stale_temporaries(target)
        try:
            with atomic_output(target) as tmp, tarfile.open(tmp, "w") as out:
                self._encode(shard, vae, device, out, stats)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            return TaskResult(name, ok=False, reason=f"{shard}: {type(e).__name__}: {e}")
        stats.update(source=os.path.abspath(shard), vae=self.vae_hash, seconds=round(time.time() - start, 2),
                     node=socket.gethostname())
        atomic_write_json(done, stats)  # last: the shard is done
        return TaskResult(name, ok=True, stats=stats)

    def _encode(self, shard, vae, device, out, stats):
        import torch
        size = vae.cfg.image_size
        decode = lambda s: preprocess(s[1].get("jpg", b""), size)  # noqa: E731
        batch = []
        # Decoding overlaps the model's previous batch: both use the worker's share of the cores.
        skipped = collections.Counter()
        with ThreadPoolExecutor(self.decode_threads or torch.get_num_threads()) as pool:
            for (key, files), image in _ordered_prefetch(pool, decode, _by_key(shard, skipped), 2 * self.batch_size):
                if image is None:
                    stats["corrupt"] += 1
                    log.warning("%s: sample %s does not decode; skipped", shard, key)
                    continue
                batch.append((key, files, image))
                if len(batch) == self.batch_size:
                    self._write(batch, vae, device, out, stats, torch)
                    stats["samples"] += len(batch)
                    batch = []
            if batch:
                self._write(batch, vae, device, out, stats, torch)
                stats["samples"] += len(batch)
        stats["no_extension"] = skipped["no_extension"]
        if stats["samples"] == 0 and (stats["corrupt"] or stats["no_extension"]):  # not done: a rerun retries it
            raise ValueError(f"no usable sample ({stats['corrupt']} images do not decode, {stats['no_extension']} "
                             "members have no extension)")

    def _write(self, batch, vae, device, out, stats, torch):
        images = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
        codes = vae.encode(images).cpu().numpy().astype(np.uint16)
        for (key, files, _), row in zip(batch, codes):
            meta = sample_meta(files)
            if meta is None:  # the image is good; only its url is lost
                log.warning("sample %s: its .json is not a JSON object; url left empty", key)
                stats["bad_json"] += 1
                meta = {}
            buf = io.BytesIO()
            np.save(buf, row)
            _add(out, f"{key}.codes.npy", buf.getvalue())
            _add(out, f"{key}.txt", files.get("txt", b""))
            _add(out, f"{key}.json", json.dumps({"key": key, "url": meta.get("url"), "vae": self.vae_hash},
                                                sort_keys=True).encode())


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)  # fixed time and owner: the same input gives the same bytes
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _by_key(shard: str, skipped: collections.Counter):
    for sample in iter_samples(shard, skipped):
        yield sample.pop("__key__"), sample


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode every shard not yet done; returns (and writes) the summary."""
    shards = expand_shards(cfg.shards)
    if not shards:
        raise FileNotFoundError(f"no shards match {cfg.shards}")
    if not os.path.isfile(cfg.vae):
        raise FileNotFoundError(f"AugVAE checkpoint {cfg.vae} does not exist")
    vae_hash = file_sha256(cfg.vae)
    done = sorted(glob.glob(os.path.join(glob.escape(cfg.output), "*_stats.json")))
    check_vae([(path, read_json(path)) for path in done], vae_hash, other_vae="encode into a new --output folder",
              image_shards="lverse encode did not write it (image shards?); encode into a new --output folder")
    load_vae(cfg.vae)  # a bad checkpoint fails here, once, with its message
    os.makedirs(cfg.output, exist_ok=True)
    task = ShardEncoder(cfg.vae, vae_hash, cfg.output, cfg.batch_size, cfg.decode_threads, cfg.device)

    def totals(results, seconds):
        encoded = sum(r.stats.get("samples", 0) for r in results if not r.skipped)
        return {"samples": encoded, "corrupt_samples": sum(r.stats.get("corrupt", 0) for r in results),
                "bad_json_samples": sum(r.stats.get("bad_json", 0) for r in results),
                "members_without_extension": sum(r.stats.get("no_extension", 0) for r in results),
                "vae": vae_hash, "images_per_second": rate(encoded, seconds)}
    return run_shard_stage("encode", task, shards, [shard_name(s) for s in shards], cfg.output, cfg,
                           totals=totals)

