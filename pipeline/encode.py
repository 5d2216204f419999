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
import hashlib
import io
import json
import logging
import os
import re
import tarfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from lverse.files import atomic_output, atomic_write_json, remove_stale_temporaries

from .executors import TaskResult, finish_stage, run_tasks
from .resources import default_workers, resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeConfig:
    shards: str  # a folder, a glob ("raw/*.tar") or a range ("raw/{00000..00099}.tar")
    vae: str  # AugVAE checkpoint: lverse .safetensors or the official .ckpt
    output: str  # folder for token shards and _summary.json
    batch_size: int = 32  # images per forward pass
    decode_threads: int | None = None  # JPEG decode + resize threads per worker (None: its thread share)
    executor: str = "local"  # local processes or Ray actors
    workers: int | None = None  # model replicas, local processes or Ray actors (None: one per GPU, else 1)
    threads: int | None = None  # compute threads per worker (None: its share of the cores; resources.py)
    retries: int = 1  # times a failed shard is tried again
    ray_address: str | None = None  # Ray cluster to join (None: start a local one)
    device: str = "auto"  # cuda when available, else cpu
    task_index: int | None = None  # as array task i of num_tasks: only its block of shards
    num_tasks: int = 1


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a folder, a glob, or a ``{00000..00099}`` range, sorted."""
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        width, lo, hi = len(m.group(1)), int(m.group(1)), int(m.group(2))
        paths = [spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():] for i in range(lo, hi + 1)]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shards of {spec} do not exist, e.g. {missing[0]}")
        return paths
    return sorted(glob.glob(spec))


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_MODELS: dict[tuple[str, str], object] = {}  # one model per worker process, kept between shards


def load_vae(path: str, device: str = "cpu"):
    """The AugVAE of a checkpoint, eval mode, FP32, cached per process."""
    if (path, device) not in _MODELS:
        from lverse.model.augvae import AugVAE
        vae = AugVAE.from_pretrained(path) if path.endswith(".safetensors") else AugVAE.from_official_checkpoint(path)
        if vae.cfg.codebook_size > 1 << 16:
            raise ValueError(f"{vae.cfg.codebook_size} codes do not fit the token shards' uint16")
        _MODELS[(path, device)] = vae.eval().float().requires_grad_(False).to(device)
    return _MODELS[(path, device)]


def check_complete_tar(path: str) -> None:
    """Raise ValueError unless the tar ends with its end-of-archive marker (two zero blocks).

    Python's tarfile takes an end of file at a member boundary for the end of the archive, so a
    tar cut short there (a killed writer, a partial copy) would otherwise read as a smaller shard.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size < 1024 or size % 512 or tail.count(0) != 1024:
        raise ValueError(f"{path} is truncated (no end-of-archive marker; {size} bytes)")


def read_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) of a webdataset tar, members grouped by key in file order."""
    check_complete_tar(path)
    with tarfile.open(path, "r|") as tar:
        key, files = None, {}
        for member in tar:
            if not member.isfile():
                continue
            k, ext = member.name.split(".", 1)
            if k != key and files:
                yield key, files
                files = {}
            key = k
            files[ext] = tar.extractfile(member).read()
        if files:
            yield key, files


def preprocess(jpg: bytes, size: int) -> np.ndarray | None:
    """JPEG bytes -> (3, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.
    None when the image does not decode."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


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
        name = os.path.basename(shard).removesuffix(".tar")
        done = os.path.join(self.output, f"{name}_stats.json")
        if os.path.exists(done):
            return TaskResult(name, ok=True, skipped=True)
        device = resolve_device(self.device)
        vae = load_vae(self.vae, device)
        start, stats = time.time(), {"samples": 0, "corrupt": 0}
        target = os.path.join(self.output, f"{name}.tar")
        remove_stale_temporaries(target)
        try:
            with atomic_output(target) as tmp, tarfile.open(tmp, "w") as out:
                self._encode(shard, vae, device, out, stats)
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            return TaskResult(name, ok=False, reason=f"unreadable shard {shard}: {type(e).__name__}: {e}")
        stats.update(source=os.path.abspath(shard), vae=self.vae_hash, seconds=round(time.time() - start, 2))
        atomic_write_json(done, stats)  # last: the shard is done
        return TaskResult(name, ok=True, stats=stats)

    def _encode(self, shard, vae, device, out, stats):
        import torch
        size = vae.cfg.image_size
        decode = lambda s: preprocess(s[1].get("jpg", b""), size)  # noqa: E731
        batch = []
        # Decoding overlaps the model's previous batch: both use the worker's share of the cores.
        with ThreadPoolExecutor(self.decode_threads or torch.get_num_threads()) as pool:
            for (key, files), image in _ordered_prefetch(pool, decode, read_samples(shard), 2 * self.batch_size):
                if image is None:
                    stats["corrupt"] += 1
                    log.warning("%s: sample %s does not decode; skipped", shard, key)
                    continue
                batch.append((key, files, image))
                if len(batch) == self.batch_size:
                    self._write(batch, vae, device, out, torch)
                    stats["samples"] += len(batch)
                    batch = []
            if batch:
                self._write(batch, vae, device, out, torch)
                stats["samples"] += len(batch)

    def _write(self, batch, vae, device, out, torch):
        images = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
        codes = vae.encode(images).cpu().numpy().astype(np.uint16)
        for (key, files, _), row in zip(batch, codes):
            meta = json.loads(files.get("json", b"{}") or b"{}")
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


def run_encode(cfg: EncodeConfig) -> dict:
    """Encode every shard not yet done; returns (and writes) the summary."""
    shards = expand_shards(cfg.shards)
    if not shards:
        raise FileNotFoundError(f"no shards match {cfg.shards}")
    if not os.path.isfile(cfg.vae):
        raise FileNotFoundError(f"AugVAE checkpoint {cfg.vae} does not exist")
    vae_hash = file_sha256(cfg.vae)
    _refuse_other_vae(cfg.output, vae_hash)
    load_vae(cfg.vae)  # a bad checkpoint fails here, once, with its message
    os.makedirs(cfg.output, exist_ok=True)
    summary_name = "_summary.json"
    if cfg.task_index is not None:  # one SLURM array task: its own block, its own summary
        from .slurm import array_block
        shards = [shards[i] for i in array_block(len(shards), cfg.task_index, cfg.num_tasks)]
        summary_name = f"_summary.task{cfg.task_index:05d}.json"
    task = ShardEncoder(cfg.vae, vae_hash, cfg.output, cfg.batch_size, cfg.decode_threads, cfg.device)
    names = [os.path.basename(s).removesuffix(".tar") for s in shards]
    start = time.time()
    if cfg.executor == "ray":  # the cluster's GPUs, not this machine's
        gpus = _cluster_gpus(cfg.ray_address)
        workers = cfg.workers or gpus or 1
        kwargs = {"actors": workers, "num_gpus": 1 if gpus else 0}
    else:
        workers, kwargs = cfg.workers or default_workers(cfg.device), {}
    results = run_tasks(task, shards, names, executor=cfg.executor, workers=workers, retries=cfg.retries,
                        desc="encode", ray_address=cfg.ray_address, threads=cfg.threads, **kwargs)
    seconds = time.time() - start
    encoded = sum(r.stats.get("samples", 0) for r in results if not r.skipped)
    summary = {"shards": len(results), "encoded": sum(r.ok and not r.skipped for r in results),
               "encoded_shards": [r.name for r in results if r.ok and not r.skipped],
               "skipped": sum(r.skipped for r in results),
               "failed": [{"shard": r.name, "reason": r.reason} for r in results if not r.ok],
               "samples": encoded, "corrupt_samples": sum(r.stats.get("corrupt", 0) for r in results),
               "vae": vae_hash, "seconds": round(seconds, 1),
               "images_per_second": round(encoded / max(seconds, 1e-9), 1)}
    return finish_stage("encode", os.path.join(cfg.output, summary_name), summary)


def _refuse_other_vae(output: str, vae_hash: str) -> None:
    for marker in glob.glob(os.path.join(output, "*_stats.json")):
        with open(marker) as f:
            other = json.load(f).get("vae")
        if other is None:  # e.g. img2dataset's own stats: --output points at the image shards
            raise ValueError(f"{output} holds {os.path.basename(marker)}, which lverse encode did not "
                             "write; encode into a new --output folder")
        if other != vae_hash:
            raise ValueError(f"{output} holds token shards of another AugVAE ({other[:12]}..., now "
                             f"{vae_hash[:12]}...); encode into a new --output folder")


def _cluster_gpus(address: str | None) -> int:
    from .executors import _init_ray
    return int(_init_ray(address).cluster_resources().get("GPU", 0))
