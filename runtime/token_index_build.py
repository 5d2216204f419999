"""Building the token index (its format, and reading it: ``token_index.py``).

Two callers decide to build, and both are here, beside the builder: ``lverse index``
(``index_folder``: builds unless the index holds exactly the folder's finished shards,
unchanged), and a training run that finds no index (``ensure_index``: rank 0 builds it while
the other ranks wait). Training never rebuilds a stale index (``token_index.py`` says why); the
reader never builds.

The folder is written under a temporary name beside ``_index`` and renamed into place, so nothing
half-written counts; one builder at a time (``lverse index``, or rank 0 of a training run that
finds none).

What it costs: every tar read once, about 5000 samples of 1024 codes a second in one process on
the 2-core test machine (parsing the tar is most of it), so about 10 minutes for CC3M's ~3M pairs
in one process; the build reads shards in up to 16.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import glob
import io
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from tqdm import tqdm

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import read_json, umask
from lverse.core.formats import TOKEN_INDEX_FORMAT
from lverse.core.resources import available_cores
from lverse.core.shards import check_vae, iter_samples, stats_path

from .token_index import (
    INDEX,
    TokenIndex,
    TokenSamples,
    index_command,
    index_files,
    index_home,
    index_path,
    open_samples,
    shard_identity,
    shards_folder,
)

log = logging.getLogger(__name__)

# How long the other ranks of a training run wait for rank 0 to build a missing index (CC3M: about
# 10 minutes in one process, see the module doc).
BUILD_WAIT = datetime.timedelta(hours=2)


def finished_shards(tokens: str) -> tuple[list[str], list[str]]:
    """(finished, unfinished) token shards of a folder: a finished one has its stats file."""
    tars = storage.glob(os.path.join(storage.escape(tokens), "*.tar"))
    done = set(storage.glob(os.path.join(storage.escape(tokens), "*_stats.json")))  # one listing, not a look-up each
    return [t for t in tars if stats_path(t) in done], [t for t in tars if stats_path(t) not in done]


def build_index(tokens: str, progress: bool = True, workers: int | None = None, index_dir: str | None = None) -> dict:
    """Index every finished token shard of ``tokens`` into ``tokens/_index`` (``index_dir/_index``;
    replacing one that is there), the tars read by ``workers`` processes (None: the cores this
    process may use, at most 16, beyond which reading the tars is bound by the disk); returns what
    was built: samples, shards, bytes, seconds."""
    start = time.time()
    home = index_home(tokens, index_dir)
    shards, unfinished = finished_shards(tokens)
    if not shards:
        raise InputError(f"{tokens} holds no finished token shard (NNNNN.tar with NNNNN_stats.json): "
                         "point at the output of `lverse encode`")
    if unfinished:
        log.warning("%d shards of %s are unfinished (no stats file) and left out of the index, e.g. %s",
                    len(unfinished), tokens, unfinished[0])
    check_vae([(s, read_json(stats_path(s))) for s in shards], None,
              image_shards="index a folder of `lverse encode` output", other_vae="")
    # identities before reading: a shard that changes meanwhile leaves a stale index, not a wrong one
    entries = [shard_identity(s) for s in shards]
    vae, crops = _one_kind(tokens, entries)
    try:
        os.makedirs(home, exist_ok=True)
        _remove_leftovers(home)
        tmp = tempfile.mkdtemp(dir=home, prefix=f".{INDEX}.", suffix=".tmp")
    except OSError as e:  # a shared data set is often read-only: say what to do about it
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise InputError(f"cannot write the token index into {home} ({os.strerror(e.errno)}): build it once as a "
                         f"user who may write there (`{index_command(tokens, index_dir)}`), or copy the shards to a "
                         "writable folder, or give the index a folder of its own (--index-dir)") from None
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: others on shared storage could not read it
    try:
        workers = min(16, available_cores()) if workers is None else workers
        image_len = _write_arrays(tmp, shards, entries, crops, progress, min(workers, len(shards)))
        meta = {"version": TOKEN_INDEX_FORMAT, "samples": sum(e["samples"] for e in entries), "image_len": image_len,
                "crops": crops, "vae": vae, "shards": entries}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            _sync(f)
        _swap_in(tmp, os.path.join(home, INDEX))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(home, INDEX, name)) for name in index_files(crops))
    summary = {"index": os.path.join(home, INDEX), "samples": meta["samples"], "shards": len(shards),
               "image_len": image_len, "crops": crops, "bytes": size, "seconds": round(time.time() - start, 2)}
    log.info("token index %s: %d samples of %d shards, %.1f MB, in %.1f s", summary["index"], summary["samples"],
             summary["shards"], size / 1e6, summary["seconds"])
    return summary


def _one_kind(tokens: str, entries: list[dict]) -> tuple[str, int]:
    """The AugVAE and the crops a sample of the shards of ``entries``: one of each in a folder."""
    vaes = sorted({e["stats"]["vae"] for e in entries})
    if len(vaes) > 1:
        raise InputError(f"{tokens} holds shards of {len(vaes)} AugVAEs ({', '.join(v[:12] for v in vaes)}): "
                         "one folder, one AugVAE; re-encode into separate folders")
    uncounted = [e["name"] for e in entries if "crops" not in e["stats"]]
    if uncounted:
        raise InputError(f"the stats file of shard {uncounted[0]} of {tokens} records no crops, which `lverse encode` "
                         "writes into every shard's: re-encode the folder's images into a new --output folder")
    crops = sorted({int(e["stats"]["crops"]) for e in entries})
    if len(crops) > 1:
        first = {k: next(e["name"] for e in entries if int(e["stats"]["crops"]) == k) for k in crops}
        raise InputError(f"{tokens} holds shards of {len(crops)} crop counts ("
                         f"{', '.join(f'{k} in {name}' for k, name in first.items())}): one folder, one `lverse encode "
                         "--crops`; re-encode into separate folders")
    return vaes[0], crops[0]


def _write_arrays(folder: str, shards: list[str], entries: list[dict], crops: int, progress: bool,
                  workers: int) -> int:
    """codes, captions and keys (and with ``crops``, the crops' codes and boxes) of every shard
    into ``folder``, shards read by ``workers`` processes (tar parsing is what the build spends
    its time on); returns image_len."""
    image_len, samples, caption_end, key_end = None, 0, 0, 0
    with contextlib.ExitStack() as stack:
        files = {name: stack.enter_context(open(os.path.join(folder, name), "wb"))
                 for name in index_files(crops) if name != "meta.json"}
        bar = stack.enter_context(tqdm(total=len(shards), unit="shard", desc="token index", disable=not progress))
        codes_f, captions_f, keys_f = files["codes.u16"], files["captions.bin"], files["keys.bin"]
        caption_offsets_f, key_offsets_f = files["caption_offsets.i64"], files["key_offsets.i64"]
        caption_offsets_f.write(np.zeros(1, dtype="<i8").tobytes())
        key_offsets_f.write(np.zeros(1, dtype="<i8").tobytes())
        for shard, entry, part in zip(shards, entries, _in_order(_read_shard, shards, workers)):
            if part["samples"] != entry["samples"]:
                raise InputError(f"{shard} holds {part['samples']} samples but its stats file says {entry['samples']}: "
                                 "the shard changed after it was written; re-run `lverse encode` on it")
            if part["samples"] and part["crops"] != crops:
                raise InputError(f"{shard} holds {part['crops']} crops a sample but its stats file says {crops}: the "
                                 "shard changed after it was written; re-run `lverse encode` on it")
            if part["samples"] and image_len not in (None, part["image_len"]):
                raise InputError(f"{shard} holds {part['image_len']} codes a sample, earlier shards {image_len}: the "
                                 "folder mixes AugVAEs; re-encode into separate folders")
            image_len = part["image_len"] if part["samples"] else image_len
            codes_f.write(part["codes"])
            if crops:
                files["crops.u16"].write(part["crop_codes"])
                files["crop_boxes.i32"].write(part["crop_boxes"])
            captions_f.write(part["captions"])
            keys_f.write(part["keys"])
            caption_offsets_f.write((caption_end + np.cumsum(part["caption_lengths"], dtype="<i8")).tobytes())
            key_offsets_f.write((key_end + np.cumsum(part["key_lengths"], dtype="<i8")).tobytes())
            caption_end += int(np.sum(part["caption_lengths"]))
            key_end += int(np.sum(part["key_lengths"]))
            samples += part["samples"]
            bar.update(1)
            bar.set_postfix(samples=samples)
        for f in files.values():
            _sync(f)
    return image_len or 0


def _read_shard(shard: str) -> dict:
    """One shard's part of the index files (in a worker process)."""
    codes, captions, keys, crop_codes, crop_boxes, image_len, crops = [], [], [], [], [], None, None
    for sample in iter_samples(shard):
        row = _codes(sample, shard)
        if image_len is None:
            image_len = len(row)
        elif len(row) != image_len:
            raise InputError(f"{shard}: sample {sample['__key__']} has {len(row)} codes, earlier samples "
                             f"{image_len}: re-run `lverse encode` on it")
        views, boxes = _crops(sample, shard, image_len)
        if crops is None:
            crops = len(views)
        elif len(views) != crops:
            raise InputError(f"{shard}: sample {sample['__key__']} has {len(views)} crops, earlier samples {crops}: "
                             "re-run `lverse encode` on it")
        codes.append(row.tobytes())
        crop_codes.append(views.tobytes())
        crop_boxes.append(boxes.tobytes())
        captions.append(sample.get("txt", b""))
        keys.append(sample["__key__"].encode())
    return {"samples": len(keys), "image_len": image_len, "crops": crops or 0, "codes": b"".join(codes),
            "crop_codes": b"".join(crop_codes), "crop_boxes": b"".join(crop_boxes), "captions": b"".join(captions),
            "keys": b"".join(keys), "caption_lengths": np.array([len(c) for c in captions], dtype=np.int64),
            "key_lengths": np.array([len(k) for k in keys], dtype=np.int64)}


def _in_order(fn, items: list, workers: int):
    """``map(fn, items)`` on ``workers`` processes, in order, with at most 2 x workers results
    held (a shard's part is 2 bytes x image_len a sample: 20 MB for 10000 samples of 1024 codes).
    The processes are forked, as DataLoader workers are (spawned ones would import the caller's
    main module again, which a script without a ``__main__`` guard does not survive)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        pending = collections.deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _codes(sample: dict, shard: str) -> np.ndarray:
    if "codes.npy" not in sample:
        raise InputError(f"{shard}: sample {sample['__key__']} has no codes.npy: not a token shard")
    codes = np.load(io.BytesIO(sample["codes.npy"]), allow_pickle=False)
    if codes.dtype != np.uint16 or codes.ndim != 1:
        raise InputError(f"{shard}: sample {sample['__key__']} holds {codes.dtype} codes of shape {codes.shape}, "
                         "not one row of uint16: not a token shard of `lverse encode`")
    return codes.astype("<u2", copy=False)


def _crops(sample: dict, shard: str, image_len: int) -> tuple[np.ndarray, np.ndarray]:
    """A sample's crops: ((K, image_len) "<u2" codes, (K, 4) "<i4" boxes); K = 0 without any."""
    if "crops.npy" not in sample:
        return np.zeros((0, image_len), dtype="<u2"), np.zeros((0, 4), dtype="<i4")
    views = np.load(io.BytesIO(sample["crops.npy"]), allow_pickle=False)
    try:
        boxes = np.array(json.loads(sample.get("json", b"{}")).get("crops"), dtype="<i4")
    except (ValueError, TypeError, AttributeError):
        boxes = None
    if views.dtype != np.uint16 or views.ndim != 2 or views.shape[1] != image_len or boxes is None \
            or boxes.shape != (len(views), 4):
        raise InputError(f"{shard}: sample {sample['__key__']} holds {views.dtype} crops of shape {views.shape} and "
                         f"{'no' if boxes is None else boxes.shape} boxes in its .json, not K rows of {image_len} "
                         "uint16 codes and K boxes: not a token shard of `lverse encode --crops`")
    return views.astype("<u2", copy=False), boxes


def _sync(f) -> None:
    """Flush ``f`` to the disk before the rename makes it count (a crash then leaves no index
    whose files are shorter than its meta says)."""
    f.flush()
    os.fsync(f.fileno())


def _swap_in(tmp: str, target: str) -> None:
    """Rename the new index folder into place; an old one is moved aside first and removed after
    (a directory cannot be renamed over a non-empty one). Between the two renames there is no
    index: a training run starting in that instant would build its own."""
    old = None
    if os.path.exists(target):
        old = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{INDEX}.", suffix=".old")
        os.rename(target, os.path.join(old, INDEX))
    os.rename(tmp, target)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _remove_leftovers(home: str) -> None:
    """What a killed builder left (one builder at a time, see the module doc)."""
    for path in glob.glob(os.path.join(glob.escape(home), f".{INDEX}.*")):
        shutil.rmtree(path, ignore_errors=True)


def ensure_index(shards: list[str], vae_hash: str | None, rank: int = 0, crops: bool = True,
                 index_dir: str | None = None) -> TokenSamples:
    """``open_samples`` in a training run (collective when a process group is up): rank 0 builds
    the folder's index when there is none while the other ranks wait; a stale one is refused."""
    tokens = shards_folder(shards)
    meta = os.path.join(index_path(tokens, index_dir), "meta.json")
    if rank == 0 and not os.path.isfile(meta):
        log.info("no token index in %s: building it once (`%s` does the same)", os.path.dirname(meta),
                 index_command(tokens, index_dir))
        build_index(tokens, index_dir=index_dir)
    _wait_for(meta, rank, f"build it beforehand with `{index_command(tokens, index_dir)}`")
    return open_samples(shards, vae_hash, crops, index_dir)


def _wait_for(meta: str, rank: int, hint: str) -> None:
    """The ranks above 0 wait until they see the index, then all meet at a barrier. Not a barrier
    alone: its timeout (NCCL's: 10 minutes) is shorter than a large build may take, and on shared
    storage another node may see the new folder only some seconds after rank 0 renamed it. A rank 0
    that fails ends the job (torchrun, and srun --kill-on-bad-exit as the SLURM template runs it)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return
    deadline = time.monotonic() + BUILD_WAIT.total_seconds()
    while rank and not os.path.isfile(meta):
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {rank}: no token index at {meta} after {BUILD_WAIT}; {hint}")
        time.sleep(1.0)
    dist.barrier()


def index_folder(tokens: str, progress: bool = True, workers: int | None = None, index_dir: str | None = None) -> dict:
    """``lverse index``: build ``tokens``' index unless it holds exactly the folder's finished
    shards, unchanged (then say so); returns the summary."""
    path = index_path(tokens, index_dir)
    shards, _ = finished_shards(tokens)
    if os.path.isfile(os.path.join(path, "meta.json")) and shards:
        try:
            index = TokenIndex(path, index_command(tokens, index_dir))
            index.check_files()
            fresh = not index.stale(shards) and len(index.meta["shards"]) == len(shards)
        except InputError:
            fresh = False
        if fresh:
            log.info("token index %s is up to date (%d samples of %d shards)", path, len(index), len(shards))
            return {"index": path, "samples": len(index), "shards": len(shards), "image_len": index.meta["image_len"],
                    "crops": index.crops, "up_to_date": True,
                    "bytes": sum(os.path.getsize(os.path.join(path, name)) for name in index_files(index.crops))}
    return build_index(tokens, progress, workers, index_dir)
