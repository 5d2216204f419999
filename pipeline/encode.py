"""The encode stage: image shards -> token shards through a frozen AugVAE in FP32.

One raw shard (img2dataset's webdataset tar) in, one token shard of the same name out, a
webdataset tar whose samples hold, in this order:

    {key}.codes.npy   uint16 AugVAE codes of the centre crop, (num_tokens,), row-major
    {key}.crops.npy   with ``crops`` K > 0 only: uint16 codes of K random crops, (K, num_tokens)
    {key}.txt         the raw caption (tokenised at training time, for BPE-dropout)
    {key}.json        {"key", "url", "vae"}: "vae" is the sha256 of the AugVAE checkpoint file;
                      with K > 0 also "crops": K boxes [left, top, right, bottom], pixels of the
                      source JPEG (right and bottom exclusive), crop j's codes in row j

The centre crop is ``core/images.centre_crop``: shorter side to the model's input size, centre
square. Random crops (``--crops K``) are the paper's augmentation for BiART (random crops of
ratio 0.75 of the side, at 256 x 256), drawn at encode time since training sees only codes: each
is a square of ``CROP_RATIO`` of the source's shorter side, placed from the SHA-256 of the
sample's key and the crop's number (``crop_boxes``), resized to the model's input size (bicubic,
Pillow reading the pixels around the box that the filter needs) and encoded by the same AugVAE,
``batch_size`` crops a forward pass. Training reads one of a sample's K + 1 views per
visit (``runtime/data.py``). With K = 0 a sample holds no ``crops.npy`` and its json no ``crops``.
A folder holds one K (its stats files record it): a rerun with another ``--crops`` is refused.

The tar is written under a temporary name and renamed into place, then ``{name}_stats.json``
(the done marker, with the token shard format ``core/formats.TOKEN_SHARD_FORMAT``: readers refuse
shards of another) is written; a rerun skips shards that have one. Its bytes depend only on the
input shard and the checkpoint (fixed member order, times and owners, and fixed batches: conv
kernels round differently for other batch sizes, which can flip a near-tie code), so a shard
encoded after a crash is byte-identical to one from an uninterrupted run; the crops are placed
from the key alone, so they are too. A sample whose image does not decode
is skipped and counted; a shard that cannot be read fails alone, with its reason, and is retried.

Workers (Ray actors, or local processes) load the model once and keep it. JPEG decoding and
resizing run on a thread pool while the model encodes the previous batch. Each worker runs its
share of the cores (``resources.py``).
"""

from __future__ import annotations

import collections
import hashlib
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

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json, read_json, remove_stale_temporaries
from lverse.core.formats import TOKEN_SHARD_FORMAT
from lverse.core.images import centre_crop, decode, to_model_input
from lverse.core.resources import resolve_device
from lverse.core.shards import add_to_tar, check_vae, expand_shards, file_sha256, iter_samples, sample_meta, shard_name
from lverse.pipeline.configs import EncodeConfig
from lverse.runtime.model_cache import load_vae
from lverse.runtime.stage import rate, run_shard_stage
from lverse.runtime.tasks import TaskResult

log = logging.getLogger(__name__)

CROP_RATIO = 0.75  # a random crop's side over the image's shorter side (the paper's BiART augmentation)


def crop_boxes(key: str, width: int, height: int, count: int) -> list[tuple[int, int, int, int]]:
    """``count`` squares of ``CROP_RATIO`` of the shorter side inside a ``width`` x ``height``
    image, as (left, top, right, bottom) pixels (right, bottom exclusive). Crop j is placed from
    the SHA-256 of (j, ``key``) only: a re-encode draws the same boxes on any machine."""
    side = max(1, int(CROP_RATIO * min(width, height)))
    boxes = []
    for j in range(count):
        digest = hashlib.sha256(b"lverse-crop\0" + j.to_bytes(4, "little") + key.encode()).digest()
        left = int.from_bytes(digest[:8], "little") % (width - side + 1)  # 2^-64 bias: none to speak of
        top = int.from_bytes(digest[8:16], "little") % (height - side + 1)
        boxes.append((left, top, left + side, top + side))
    return boxes


def crop_views(im, key: str, size: int, count: int) -> tuple[np.ndarray, list]:
    """RGB PIL image ``im``'s ``count`` random crops (``crop_boxes``), each resized to ``size`` x
    ``size`` (bicubic) and scaled as the centre crop is: ((count, 3, size, size) float32 in [-1, 1],
    the boxes)."""
    from PIL import Image
    boxes = crop_boxes(key, im.width, im.height, count)
    return np.stack([to_model_input(im.resize((size, size), Image.BICUBIC, box=box)) for box in boxes]), boxes


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
    crops: int = 0  # random crops per image (EncodeConfig.crops)

    def __call__(self, shard: str) -> TaskResult:
        name = shard_name(shard)
        done = os.path.join(self.output, f"{name}_stats.json")
        if storage.exists(done):
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
        stats.update(format=TOKEN_SHARD_FORMAT, source=storage.absolute(shard), vae=self.vae_hash, crops=self.crops,
                     seconds=round(time.time() - start, 2), node=socket.gethostname())
        atomic_write_json(done, stats)  # last: the shard is done
        return TaskResult(name, ok=True, stats=stats)

    def _encode(self, shard, vae, device, out, stats):
        import torch
        size = vae.cfg.image_size
        decode = lambda s: self._views(s[0], s[1].get("jpg", b""), size)  # noqa: E731
        batch = []
        # Decoding overlaps the model's previous batch: both use the worker's share of the cores.
        skipped = collections.Counter()
        with ThreadPoolExecutor(self.decode_threads or torch.get_num_threads()) as pool:
            for (key, files), views in _ordered_prefetch(pool, decode, _by_key(shard, skipped), 2 * self.batch_size):
                if views is None:
                    stats["corrupt"] += 1
                    log.warning("%s: sample %s does not decode; skipped", shard, key)
                    continue
                batch.append((key, files, *views))
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

    def _views(self, key: str, jpg: bytes, size: int) -> tuple | None:
        """(centre image, crop images or None, crop boxes or None) of one decode of the JPEG; None
        when it does not decode."""
        im = decode(jpg)
        if im is None:
            return None
        return (centre_crop(im, size), *(crop_views(im, key, size, self.crops) if self.crops else (None, None)))

    def _write(self, batch, vae, device, out, stats, torch):
        images = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
        codes = vae.encode(images).cpu().numpy().astype(np.uint16)
        crops = self._encode_crops(batch, vae, device, torch)
        for j, ((key, files, _, _, boxes), row) in enumerate(zip(batch, codes)):
            meta = sample_meta(files)
            if meta is None:  # the image is good; only its url is lost
                log.warning("sample %s: its .json is not a JSON object; url left empty", key)
                stats["bad_json"] += 1
                meta = {}
            record = {"key": key, "url": meta.get("url"), "vae": self.vae_hash}
            add_to_tar(out, f"{key}.codes.npy", _npy(row))
            if crops is not None:
                add_to_tar(out, f"{key}.crops.npy", _npy(crops[j]))
                record["crops"] = [list(box) for box in boxes]
            add_to_tar(out, f"{key}.txt", files.get("txt", b""))
            add_to_tar(out, f"{key}.json", json.dumps(record, sort_keys=True).encode())

    def _encode_crops(self, batch, vae, device, torch) -> np.ndarray | None:
        """(B, K, num_tokens) uint16 codes of the batch's crops, sample after sample, encoded
        ``batch_size`` at a time (a fixed split of a fixed sequence: the same bytes on a rerun);
        None without crops."""
        if not self.crops:
            return None
        crops = torch.from_numpy(np.concatenate([b[3] for b in batch]))  # (B * K, 3, size, size)
        codes = torch.cat([vae.encode(part.to(device)).cpu() for part in crops.split(self.batch_size)])
        return codes.numpy().astype(np.uint16).reshape(len(batch), self.crops, -1)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


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
    storage.check_output(cfg.output)
    done = [(path, read_json(path)) for path in storage.glob(os.path.join(storage.escape(cfg.output), "*_stats.json"))]
    check_vae(done, vae_hash, other_vae="encode into a new --output folder",
              image_shards="lverse encode did not write it (image shards?); encode into a new --output folder")
    _check_crops(done, cfg.crops)
    load_vae(cfg.vae)  # a bad checkpoint fails here, once, with its message
    task = ShardEncoder(cfg.vae, vae_hash, cfg.output, cfg.batch_size, cfg.decode_threads, cfg.device, cfg.crops)

    def totals(results, seconds):
        encoded = sum(r.stats.get("samples", 0) for r in results if not r.skipped)
        return {"samples": encoded, "corrupt_samples": sum(r.stats.get("corrupt", 0) for r in results),
                "bad_json_samples": sum(r.stats.get("bad_json", 0) for r in results),
                "members_without_extension": sum(r.stats.get("no_extension", 0) for r in results),
                "vae": vae_hash, "crops": cfg.crops, "images_per_second": rate(encoded, seconds)}
    return run_shard_stage("encode", task, shards, [shard_name(s) for s in shards], cfg.output, cfg,
                           totals=totals)


def _check_crops(done: list[tuple[str, dict]], crops: int) -> None:
    """Refuse to add shards of another ``--crops`` to a folder (one folder, one K: the token index
    holds the same number of views for every sample)."""
    for path, stats in done:
        if stats["crops"] != crops:
            raise InputError(f"{path}: that shard was encoded with --crops {stats['crops']}, this run asks for "
                             f"--crops {crops}: finish the folder with --crops {stats['crops']}, or encode into "
                             "a new --output folder")
