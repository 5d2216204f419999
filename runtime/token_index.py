"""The token index: every sample of a folder of token shards, addressable by number. Its format,
and reading it.

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

This module holds the format and the reader (``TokenIndex``, ``TokenSamples``, ``open_samples``);
building an index is ``token_index_build.py``, which imports this module and not the other way
round: what only reads an index (a DataLoader worker, the data benchmark) loads no builder. The
format has one version (core/formats.py ``TOKEN_INDEX_FORMAT``): an index of another version, or
whose meta.json lacks one of its fields, is refused with the command that rebuilds it
(``index_command``).

A sample has K + 1 *views*: 0 its centre crop (``codes.u16``), 1..K its crops. K is one number for
the index: a folder whose shards were encoded with different ``--crops`` is refused (``lverse
encode`` refuses to make one).

Samples are numbered shard by shard (sorted names), each shard's in its tar's order.

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

The trade-off. Disk space: 2 bytes x image_len per sample for the codes, 2 KiB for AugVAE-SL's
1024 codes, so about 6 GB for CC3M (K + 1 times that with K crops, and 16 bytes a crop for its
box), plus the captions (~60 bytes each), and a one-off build (``token_index_build.py``).
Training then reads single samples at random offsets: that wants local disk or a page cache that
holds the index (6 GB fits in most nodes' RAM); on network storage every read is a round trip. In
exchange: a shuffle over the whole data set (not within a buffer of a few shards), a resume that
continues at exactly the next sample on any number of ranks and DataLoader workers, and no limit
of ranks x workers against the number of shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import read_json
from lverse.core.formats import TOKEN_INDEX_FORMAT
from lverse.core.shards import shard_name, stats_path

INDEX = "_index"
FILES = ("codes.u16", "captions.bin", "caption_offsets.i64", "keys.bin", "key_offsets.i64", "meta.json")
CROP_FILES = ("crops.u16", "crop_boxes.i32")  # only in an index of shards with crops
META = ("version", "samples", "image_len", "crops", "vae", "shards")  # the fields of meta.json


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
        if self.meta.get("version") != TOKEN_INDEX_FORMAT:
            raise InputError(f"the token index {path} is of version {self.meta.get('version')}, this lverse reads "
                             f"{TOKEN_INDEX_FORMAT}: {self.hint}")
        missing = [field for field in META if field not in self.meta]
        if missing:
            raise InputError(f"the token index {path} has no {', '.join(missing)} in its meta.json: {self.hint}")
        self.crops = int(self.meta["crops"])
        self._arrays = None

    def __len__(self) -> int:
        return self.meta["samples"]

    def __getstate__(self):
        return {"path": self.path, "command": self.command, "hint": self.hint, "meta": self.meta, "crops": self.crops,
                "_arrays": None}

    def check_files(self) -> None:
        """The files hold what meta.json says (a damaged or half-copied index is refused)."""
        n, length, k = self.meta["samples"], self.meta["image_len"], self.crops
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

