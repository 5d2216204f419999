"""The token index: every sample of a folder of token shards, addressable by number.

BiART training reads samples in one global order (``data.py``), so any rank may need any sample
next; a tar can only be read front to back. The index turns a folder of finished token shards
into files that a sample can be read from in place, memory-mapped:

    TOKENS/_index/codes.u16            N x image_len uint16, row-major: sample i's AugVAE codes
    TOKENS/_index/captions.bin         every raw caption (UTF-8), one after another
    TOKENS/_index/caption_offsets.i64  N + 1 int64: caption i is captions.bin[off[i]:off[i+1]]
    TOKENS/_index/keys.bin, key_offsets.i64   the samples' keys, the same way (per-sample RNG, tests)
    TOKENS/_index/crops.u16            with K > 0 crops a sample only: N x K x image_len uint16,
                                       sample i's random crops' codes (``lverse encode --crops K``)
    TOKENS/_index/crop_boxes.i32       with K > 0 only: N x K x 4 int32, each crop's box (left, top,
                                       right, bottom) in its source image's pixels
    TOKENS/_index/meta.json            version, samples, image_len, crops (K), the AugVAE's sha256,
                                       and each shard's name, sample count, tar size and mtime and
                                       stats file

A sample has K + 1 *views*: 0 its centre crop (``codes.u16``), 1..K its crops. K is one number for
the index: a folder whose shards were encoded with different ``--crops`` is refused (``lverse
encode`` refuses to make one). An index without ``crops`` in its meta (from before crops existed)
reads as K = 0; one that holds fewer crops than its shards' stats files record is refused with the
command that rebuilds it.

Samples are numbered shard by shard (sorted names), each shard's in its tar's order. The folder is
written under a temporary name beside ``_index`` and renamed into place, so nothing half-written
counts; one builder at a time (``lverse index``, or rank 0 of a training run that finds none).

Staleness. An entry's identity is what can be checked without reading the tar: its stats file's
contents (``lverse encode`` rewrites it with every encoding: seconds, node, source) and the tar's
size and modification time. A shard re-encoded in place, or added, makes the index stale, and
training refuses it, naming the shard and the command that rebuilds it (a stale index is never
rebuilt silently: the data under a run changed, which its owner should know). The price of the
mtime: a folder copied without keeping mtimes (``cp -r``; ``cp -a`` and ``rsync -a`` keep them)
needs ``lverse index`` again.

Token shards in an object store (``s3://bucket/tokens``): the index cannot live beside them (it
is memory-mapped), so it goes into a local or shared folder the caller names (``index_dir``:
``lverse index --index-dir``, training's ``data.index_dir``, by default its run folder), as
``INDEX_DIR/_index``. A shard's identity there is its size and ETag (S3 changes the ETag with
every write) instead of its mtime. On several nodes the folder must be on storage they share, as
the run folder is.

Which shards: an index over a folder holds every finished shard of it (a tar with its stats
file). ``data.shards`` may name a subset (a glob, a range): training then reads the named shards'
samples from the folder's index, which must hold each of them unchanged; shards it does not name
are ignored. So one index serves every subset, and the sample order depends on the named shards
only. Shards from several folders are refused (an index lives in one folder).

The trade-off. The index costs a one-off build, every tar read once: about 5000 samples of 1024
codes a second in one process on the 2-core test machine (parsing the tar is most of it), so about
10 minutes for CC3M's ~3M pairs in one process; the build reads shards in up to 16. And disk
space: 2 bytes x image_len per sample for the codes, 2 KiB for AugVAE-SL's 1024 codes, so about
6 GB for CC3M (K + 1 times that with K crops, and 16 bytes a crop for its box), plus the captions
(~60 bytes each). Training then reads single samples at random offsets: that wants local disk or
a page cache that holds the index (6 GB fits in most nodes' RAM); on network storage every read
is a round trip. In exchange: a shuffle over the whole data set (not within a buffer of a few
shards), a resume that continues at exactly the next sample on any number of ranks and
DataLoader workers, and no limit of ranks x workers against the number of shards.
"""

from __future__ import annotations

import datetime
import errno
import glob
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence

import numpy as np

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import read_json, umask
from lverse.core.resources import available_cores
from lverse.core.shards import check_vae, iter_samples, shard_name, stats_path

log = logging.getLogger(__name__)

INDEX = "_index"
VERSION = 1
FILES = ("codes.u16", "captions.bin", "caption_offsets.i64", "keys.bin", "key_offsets.i64", "meta.json")
CROP_FILES = ("crops.u16", "crop_boxes.i32")  # only in an index of shards with crops
# How long the other ranks of a training run wait for rank 0 to build a missing index (CC3M: about
# 10 minutes in one process, see the module doc).
BUILD_WAIT = datetime.timedelta(hours=2)


def index_home(tokens: str, index_dir: str | None = None) -> str:
    """The folder ``_index`` lives in: ``index_dir`` when given, else the tokens folder itself,
    which an object store cannot be (see the module doc)."""
    if index_dir is not None:
        return index_dir
    if storage.is_url(tokens):
        raise InputError(f"the token shards in {tokens} are in an object store, and their index (memory-mapped) "
                         "must be on a file system: name a folder for it (`lverse index --index-dir DIR`, "
                         "training's data.index_dir; on several nodes one they share)")
    return tokens


def index_path(tokens: str, index_dir: str | None = None) -> str:
    return os.path.join(index_home(tokens, index_dir), INDEX)


def index_command(tokens: str, index_dir: str | None = None) -> str:
    """The command that builds the index of ``tokens``, which every message about the index names."""
    where = f" --index-dir {index_dir}" if index_dir is not None else ""
    return f"lverse index --tokens {tokens}{where}"


def shard_identity(shard: str) -> dict:
    """What the index records of a shard to tell later whether it changed (see the module doc)."""
    stats = read_json(stats_path(shard))
    entry = {"name": shard_name(shard), "samples": int(stats["samples"]), "stats": stats}
    if storage.is_url(shard):
        fs, inner = storage.filesystem(shard)
        info = fs.info(inner)
        return entry | {"tar_bytes": int(info["size"]), "tar_etag": str(info.get("ETag") or info.get("etag"))}
    st = os.stat(shard)
    return entry | {"tar_bytes": st.st_size, "tar_mtime_ns": st.st_mtime_ns}


IDENTITY = ("tar_bytes", "tar_mtime_ns", "tar_etag")  # a tar's size and version, whichever it has


def index_files(crops: int) -> tuple[str, ...]:
    """The files of an index of ``crops`` crops a sample."""
    return FILES + (CROP_FILES if crops else ())


def shard_crops(stats: dict) -> int:
    """Crops a sample of a token shard, from its stats file (none before ``--crops`` existed)."""
    return int(stats.get("crops", 0))


def finished_shards(tokens: str) -> tuple[list[str], list[str]]:
    """(finished, unfinished) token shards of a folder: a finished one has its stats file."""
    tars = storage.glob(os.path.join(storage.escape(tokens), "*.tar"))
    done = set(storage.glob(os.path.join(storage.escape(tokens), "*_stats.json")))  # one listing, not a look-up each
    return [t for t in tars if stats_path(t) in done], [t for t in tars if stats_path(t) not in done]


# ---------------------------------------------------------------------------------------------
# building

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
    vaes = sorted({e["stats"]["vae"] for e in entries})
    if len(vaes) > 1:
        raise InputError(f"{tokens} holds shards of {len(vaes)} AugVAEs ({', '.join(v[:12] for v in vaes)}): "
                         "one folder, one AugVAE; re-encode into separate folders")
    crops = sorted({shard_crops(e["stats"]) for e in entries})
    if len(crops) > 1:
        first = {k: next(e["name"] for e in entries if shard_crops(e["stats"]) == k) for k in crops}
        raise InputError(f"{tokens} holds shards of {len(crops)} crop counts ("
                         f"{', '.join(f'{k} in {name}' for k, name in first.items())}): one folder, one `lverse encode "
                         "--crops`; re-encode into separate folders")
    try:
        os.makedirs(home, exist_ok=True)
        _remove_leftovers(home)
        tmp = tempfile.mkdtemp(dir=home, prefix=f".{INDEX}.", suffix=".tmp")
    except OSError as e:  # a shared data set is often read-only: say what to do about it
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise InputError(f"cannot write the token index into {home} ({os.strerror(e.errno)}): build it once as a "
                         f"user who may write there (`lverse index --tokens {tokens}`), or copy the shards to a "
                         "writable folder, or give the index a folder of its own (--index-dir)") from None
    os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it 0700: others on shared storage could not read it
    try:
        workers = min(16, available_cores()) if workers is None else workers
        image_len = _write_arrays(tmp, shards, entries, crops[0], progress, min(workers, len(shards)))
        meta = {"version": VERSION, "samples": sum(e["samples"] for e in entries), "image_len": image_len,
                "crops": crops[0], "vae": vaes[0], "shards": entries}
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            _sync(f)
        _swap_in(tmp, os.path.join(home, INDEX))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(home, INDEX, name)) for name in index_files(crops[0]))
    summary = {"index": os.path.join(home, INDEX), "samples": meta["samples"], "shards": len(shards),
               "image_len": image_len, "crops": crops[0], "bytes": size, "seconds": round(time.time() - start, 2)}
    log.info("token index %s: %d samples of %d shards, %.1f MB, in %.1f s", summary["index"], summary["samples"],
             summary["shards"], size / 1e6, summary["seconds"])
    return summary


def _write_arrays(folder: str, shards: list[str], entries: list[dict], crops: int, progress: bool,
                  workers: int) -> int:
    """codes, captions and keys (and with ``crops``, the crops' codes and boxes) of every shard
    into ``folder``, shards read by ``workers`` processes (tar parsing is what the build spends
    its time on); returns image_len."""
    import contextlib

    from tqdm import tqdm
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
    import collections
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
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


# ---------------------------------------------------------------------------------------------
# reading

class TokenIndex:
    """A built index, read in place. Picklable (a DataLoader worker gets the path and the meta
    and maps the files itself on first use)."""

    def __init__(self, path: str, command: str | None = None):
        """``command``: the one that rebuilds it (``index_command``), which its errors name; by
        default that of an index in its tokens folder."""
        self.path = path
        self.command = command or index_command(os.path.dirname(path))
        self.hint = f"rebuild it with `{self.command}`"
        meta_path = os.path.join(path, "meta.json")
        if not os.path.isfile(meta_path):
            raise InputError(f"{path} holds no token index (no meta.json); "
                             f"build it with `{self.command}`")
        self.meta = read_json(meta_path)
        if self.meta.get("version") != VERSION:
            raise InputError(f"the token index {path} is of version {self.meta.get('version')}, this lverse reads "
                             f"{VERSION}: {self.hint}")
        self.crops = int(self.meta.get("crops", 0))  # an index from before crops existed holds none
        self._arrays = None

    def __len__(self) -> int:
        return self.meta["samples"]

    def __getstate__(self):
        return {"path": self.path, "command": self.command, "hint": self.hint, "meta": self.meta, "crops": self.crops,
                "_arrays": None}

    def check_files(self) -> None:
        """The files hold what meta.json says (a damaged or half-copied index is refused), and as
        many crops a sample as its shards' stats files record (an index that an lverse from before
        crops built over shards with crops holds none)."""
        n, length, k = self.meta["samples"], self.meta["image_len"], self.crops
        held = max((shard_crops(e["stats"]) for e in self.meta["shards"]), default=0)
        if held != k:
            raise InputError(f"the token index {self.path} holds {k} crops a sample, its shards {held}: "
                             f"{self.hint}")
        expected = {"codes.u16": 2 * n * length, "caption_offsets.i64": 8 * (n + 1), "key_offsets.i64": 8 * (n + 1)}
        if k:
            expected |= {"crops.u16": 2 * n * k * length, "crop_boxes.i32": 4 * n * k * 4}
        for name, size in expected.items():
            path = os.path.join(self.path, name)
            if not os.path.isfile(path) or os.path.getsize(path) != size:
                raise InputError(f"the token index {self.path} is damaged ({name}: "
                                 f"{os.path.getsize(path) if os.path.isfile(path) else 'missing'} bytes, expected "
                                 f"{size}): {self.hint}")
        arrays = self._open()
        for blob, offsets in (("captions", "caption_offsets"), ("keys", "key_offsets")):
            if len(arrays[blob]) != int(arrays[offsets][-1]):
                raise InputError(f"the token index {self.path} is damaged ({blob}.bin does not end where its "
                                 f"offsets say): {self.hint}")

    def _open(self) -> dict:
        if self._arrays is None:
            if read_json(os.path.join(self.path, "meta.json")) != self.meta:
                raise InputError(f"the token index {self.path} was rebuilt while this run read it; start the run again")
            n, length = self.meta["samples"], self.meta["image_len"]
            self._arrays = {
                "codes": _map(os.path.join(self.path, "codes.u16"), "<u2", (n, length)),
                "captions": _map(os.path.join(self.path, "captions.bin"), np.uint8, None),
                "caption_offsets": _map(os.path.join(self.path, "caption_offsets.i64"), "<i8", (n + 1,)),
                "keys": _map(os.path.join(self.path, "keys.bin"), np.uint8, None),
                "key_offsets": _map(os.path.join(self.path, "key_offsets.i64"), "<i8", (n + 1,))}
            if self.crops:
                self._arrays["crops"] = _map(os.path.join(self.path, "crops.u16"), "<u2", (n, self.crops, length))
                self._arrays["crop_boxes"] = _map(os.path.join(self.path, "crop_boxes.i32"), "<i4", (n, self.crops, 4))
        return self._arrays

    def sample(self, row: int) -> dict:
        """Sample ``row`` as a token shard's sample reads, with its codes already an array:
        ``{"__key__": str, "txt": bytes, "codes": (image_len,) uint16}``, and with crops also
        ``"crops"`` ((K, image_len) uint16) and ``"crop_boxes"`` ((K, 4) int32)."""
        a = self._open()
        out = {"__key__": _slice(a["keys"], a["key_offsets"], row).decode(),
               "txt": _slice(a["captions"], a["caption_offsets"], row),
               "codes": np.array(a["codes"][row], dtype=np.uint16)}
        if self.crops:
            out |= {"crops": np.array(a["crops"][row], dtype=np.uint16),
                    "crop_boxes": np.array(a["crop_boxes"][row], dtype=np.int32)}
        return out

    def samples(self, rows: np.ndarray, views: Sequence[int] | None = None) -> list[dict]:
        """``[self.sample(row) for row in rows]`` without the crops, the codes read in one go
        (each sample's ``codes`` a row of one (len(rows), image_len) array). With ``views``, sample
        j's ``codes`` are those of its view ``views[j]`` (0: the centre crop, 1..K: crop 1..K),
        named in its ``view``."""
        a = self._open()
        rows = np.asarray(rows, dtype=np.int64)
        plain = {name: array.view(np.ndarray) for name, array in a.items()}  # np.memmap's indexing costs more
        codes = np.asarray(plain["codes"][rows], dtype=np.uint16)
        if views is not None:
            views = np.asarray(views, dtype=np.int64)
            if views.shape != rows.shape or views.size and (views.min() < 0 or views.max() > self.crops):
                raise IndexError(f"views {views.tolist()} of {len(rows)} samples with {self.crops} crops each")
            crop = views > 0
            if crop.any():
                codes[crop] = plain["crops"][rows[crop], views[crop] - 1]
        captions, caption_offsets = memoryview(plain["captions"]), plain["caption_offsets"]
        keys, key_offsets = memoryview(plain["keys"]), plain["key_offsets"]
        caption_lo, caption_hi = caption_offsets[rows].tolist(), caption_offsets[rows + 1].tolist()
        key_lo, key_hi = key_offsets[rows].tolist(), key_offsets[rows + 1].tolist()
        out = [{"__key__": keys[key_lo[j]:key_hi[j]].tobytes().decode(),
                "txt": captions[caption_lo[j]:caption_hi[j]].tobytes(), "codes": codes[j]}
               for j in range(len(rows))]
        for sample, view in zip(out, views.tolist() if views is not None else ()):
            sample["view"] = view
        return out

    def keys(self, rows: np.ndarray) -> list[str]:
        """The keys of samples ``rows`` (what their per-sample randomness is drawn from)."""
        a = self._open()
        rows = np.asarray(rows, dtype=np.int64)
        blob, offsets = memoryview(a["keys"].view(np.ndarray)), a["key_offsets"].view(np.ndarray)
        return [blob[lo:hi].tobytes().decode() for lo, hi in zip(offsets[rows].tolist(), offsets[rows + 1].tolist())]

    def shard_rows(self) -> dict[str, tuple[int, int]]:
        """Shard name -> (its first row, its samples)."""
        counts = [e["samples"] for e in self.meta["shards"]]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()
        return {e["name"]: (start, count) for e, start, count in zip(self.meta["shards"], starts, counts)}

    def stale(self, shards: list[str]) -> list[str]:
        """Why the index does not serve ``shards`` as they are now (empty: it does)."""
        recorded = {e["name"]: e for e in self.meta["shards"]}
        reasons = []
        for shard in shards:
            entry = recorded.get(shard_name(shard))
            if entry is None:
                reasons.append(f"{os.path.basename(shard)} is not in it (added since it was built?)")
                continue
            now = shard_identity(shard)
            if now["stats"] != entry["stats"]:
                reasons.append(f"{os.path.basename(stats_path(shard))} changed (the shard was encoded again?)")
            elif [now.get(k) for k in IDENTITY] != [entry.get(k) for k in IDENTITY]:
                reasons.append(f"{os.path.basename(shard)} changed (size or modification time; copied without "
                               "keeping mtimes, or rewritten?)")
        return reasons


def _map(path: str, dtype, shape):
    if os.path.getsize(path) == 0:  # mmap refuses empty files: an index of empty captions, say
        return np.zeros(shape or (0,), dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=shape)


def _slice(blob, offsets, row: int) -> bytes:
    return blob[int(offsets[row]):int(offsets[row + 1])].tobytes()


class TokenSamples:
    """The samples of the named shards, numbered 0..len-1 shard after shard, read from their
    folder's index; what the global order (``data.py``) permutes. Picklable.

    ``views``: 1 + the index's crops a sample (``crops=False``: 1, the centre crop only); the
    global order picks one of them per visit of a sample (``data.GlobalBatches``)."""

    def __init__(self, index: TokenIndex, shards: list[str], crops: bool = True):
        rows = index.shard_rows()
        picked = [rows[shard_name(s)] for s in shards]
        self.index = index
        self.views = 1 + index.crops if crops else 1
        self.starts = np.array([start for start, _ in picked], dtype=np.int64)
        self.ends = np.cumsum([count for _, count in picked], dtype=np.int64)  # exclusive, in this numbering

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def row(self, i: int) -> int:
        """The index row of sample ``i``."""
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.ends, i, side="right"))
        return int(self.starts[s]) + i - (int(self.ends[s - 1]) if s else 0)

    def __getitem__(self, i: int) -> dict:
        return self.index.sample(self.row(i))

    def take(self, indices: Sequence[int], views: Sequence[int] | None = None) -> list[dict]:
        """``[self[i] for i in indices]``, read in one go (a micro-batch: ``data.GlobalBatches``);
        with ``views``, each sample's codes those of its view (``TokenIndex.samples``)."""
        if views is not None and len(views) and max(views) >= self.views:
            raise IndexError(f"view {max(views)} of samples with {self.views} views")
        return self.index.samples(self._rows(indices), views)

    def keys(self, indices: Sequence[int]) -> list[str]:
        """The keys of samples ``indices``, without reading their codes."""
        return self.index.keys(self._rows(indices))

    def _rows(self, indices: Sequence[int]) -> np.ndarray:
        """The index rows of samples ``indices``."""
        i = np.asarray(indices, dtype=np.int64)
        if i.size and (i.min() < 0 or i.max() >= len(self)):
            raise IndexError(int(i[(i < 0) | (i >= len(self))][0]))
        s = np.searchsorted(self.ends, i, side="right")
        before = np.where(s > 0, self.ends[np.maximum(s - 1, 0)], 0)  # samples of the shards before
        return self.starts[s] + i - before


# ---------------------------------------------------------------------------------------------
# opening for training

def shards_folder(shards: list[str]) -> str:
    """The one folder the named shards are in (an index lives beside its shards)."""
    folders = sorted({os.path.dirname(storage.absolute(s)) for s in shards})
    if len(folders) != 1:
        raise InputError(f"data.shards names shards in {len(folders)} folders ({', '.join(folders[:3])}...); the token "
                         "index holds one folder's shards: put them in one folder (or link them into one)")
    return folders[0]


def open_samples(shards: list[str], vae_hash: str | None, crops: bool = True,
                 index_dir: str | None = None) -> TokenSamples:
    """The named shards' samples from their folder's index (in ``index_dir`` when given), refused
    unless the index holds each of them unchanged (and, with ``vae_hash``, is of that AugVAE);
    ``crops``: their random crops are views too (``TokenSamples``)."""
    tokens = shards_folder(shards)
    index = TokenIndex(index_path(tokens, index_dir), index_command(tokens, index_dir))
    if vae_hash is not None and index.meta["vae"] != vae_hash:
        raise InputError(f"the token index {index.path} is of another AugVAE ({index.meta['vae'][:12]}...) than "
                         f"data.vae ({vae_hash[:12]}...): {index.hint}")
    reasons = index.stale(shards)
    if reasons:
        more = f" (and {len(reasons) - 3} more)" if len(reasons) > 3 else ""
        raise InputError(f"the token index {index.path} no longer matches the shards: {'; '.join(reasons[:3])}{more}; "
                         f"{index.hint} (training builds an index only when there is none)")
    index.check_files()
    return TokenSamples(index, shards, crops)


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
