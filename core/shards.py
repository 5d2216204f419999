"""Webdataset shards on disk or in an object store: listing them, reading them, and the stats file
beside each one. Paths are local paths or ``s3://`` URLs alike (core/storage.py).

A shard is a tar of samples, members grouped by key (``{key}.jpg``, ``{key}.txt``, ...). Every
stage that writes a shard writes ``{name}_stats.json`` beside it last: that file is the shard's
done marker (img2dataset's convention, kept by lverse's token shards) and records how many
samples it holds. Token shards' stats also record ``vae``, the sha256 of the AugVAE checkpoint
that encoded them, and ``format``, the token shard format (core/formats.py); ``check_vae`` is the
one place that checks both.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator

from . import storage
from .errors import InputError
from .formats import TOKEN_SHARD_FORMAT, check_format

SUMMARY = "_summary.json"  # a stage's summary in its output folder


def expand_shards(spec: str) -> list[str]:
    """Shard paths of a folder, a glob, or a ``{00000..00099}`` range, sorted; local or URLs."""
    storage.check_input(spec)
    if storage.isdir(spec):
        return storage.glob(os.path.join(storage.escape(spec), "*.tar"))
    m = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if m:
        width, lo, hi = len(m.group(1)), int(m.group(1)), int(m.group(2))
        paths = [spec[:m.start()] + f"{i:0{width}d}" + spec[m.end():] for i in range(lo, hi + 1)]
        missing = [p for p in paths if not storage.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shards of {spec} do not exist, e.g. {missing[0]}")
        return paths
    return storage.glob(spec)


def shard_name(path: str) -> str:
    """``/data/00012.tar`` -> ``00012``: the name a shard's outputs and stats carry."""
    return os.path.basename(path).removesuffix(".tar")


def stats_path(shard: str) -> str:
    """The done marker beside a shard (or beside where a shard will be)."""
    return shard.removesuffix(".tar") + "_stats.json"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with storage.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_complete_tar(path: str) -> None:
    """Raise ValueError unless the tar ends with its end-of-archive marker (two zero blocks).

    Python's tarfile takes an end of file at a member boundary for the end of the archive, so a
    tar cut short there (a killed writer, a partial copy) would otherwise read as a smaller shard.
    """
    size = storage.getsize(path)
    with storage.open(path, "rb") as f:
        f.seek(max(0, size - 1024))
        tail = f.read()
    if size < 1024 or size % 512 or tail.count(0) != 1024:
        raise InputError(f"{path} is truncated (no end-of-archive marker; {size} bytes)")


def add_to_tar(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """``data`` as member ``name`` of ``tar``, with a fixed time and owner: the same samples give the
    same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def iter_samples(path: str, skipped: Counter | None = None) -> Iterator[dict]:
    """The samples of a webdataset tar in file order, each ``{"__key__": key, ext: bytes}``.

    Members are grouped by key, the name up to the first dot of its last part, extensions
    lower-cased (webdataset's rule); a leading ``./`` (``tar -C dir -cf x.tar .``) is dropped. A
    member without an extension belongs to no sample: it is passed over and counted in
    ``skipped["no_extension"]``. The tar is streamed, one sample in memory at a time; a truncated
    tar is refused before the first sample (``check_complete_tar``). A sample's members must be
    adjacent, as webdataset writers put them: a key that comes back after another sample (``tar
    -cf`` of a folder stores files in the file system's order) would split the sample into parts,
    an image without its caption and a caption without its image, so it is an InputError naming
    the key; a stage that reads the shard fails it with that reason, and nothing of it is written.
    """
    check_complete_tar(path)
    with storage.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        sample, done = {}, set()
        for member in tar:
            if not member.isfile():
                continue
            folder, _, name = member.name.removeprefix("./").rpartition("/")
            key, dot, ext = name.partition(".")
            if not (key and dot and ext):
                if skipped is not None:
                    skipped["no_extension"] += 1
                continue
            key = f"{folder}/{key}" if folder else key
            if sample and key != sample["__key__"]:
                done.add(sample["__key__"])
                yield sample
                sample = {}
            if key in done:
                raise InputError(f"{path}: the members of sample {key!r} are not adjacent (another sample's come "
                                 "between them), so its image and caption would be read apart: write the tar with "
                                 "each sample's files together, e.g. tar --sort=name -cf")
            sample["__key__"] = key
            sample[ext.lower()] = tar.extractfile(member).read()
        if sample:
            yield sample


def sample_meta(sample: dict) -> dict | None:
    """A sample's ``.json`` as a dict: ``{}`` when it has none, None when it is not a JSON object
    (the sample's other members stay usable)."""
    raw = sample.get("json")
    if not raw:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return meta if isinstance(meta, dict) else None


def read_tar(path: str) -> list[dict]:
    """Every sample of a webdataset tar (``iter_samples``), as a list."""
    return list(iter_samples(path))


def read_stats(shard: str, unfinished: str) -> dict:
    """The stats file beside ``shard``; ``unfinished`` says what to do when it is missing."""
    path = stats_path(shard)
    if not storage.isfile(path):
        raise InputError(f"{shard} has no {os.path.basename(path)}: {unfinished}")
    with storage.open(path, "r") as f:
        return json.load(f)


def check_vae(stats: Iterable[tuple[str, dict]], vae_hash: str | None, *, image_shards: str, other_vae: str) -> None:
    """Refuse token shards of another format than ``TOKEN_SHARD_FORMAT``, or of another AugVAE
    than ``vae_hash`` (None: any AugVAE).

    ``stats`` holds (shard, its stats) pairs. Stats without a ``vae`` are image shards': ``image_shards``
    is what to say about them ("" lets them pass); ``other_vae`` is what to do about a mismatch.
    """
    for shard, values in stats:
        other = values.get("vae")
        if other is None:
            if image_shards:
                raise InputError(f"{shard} is not a token shard (no AugVAE hash in its stats): {image_shards}")
            continue
        check_format(values.get("format"), TOKEN_SHARD_FORMAT, f"token shard {shard}",
                     "encode its image shards again with `lverse encode` into a new --output folder")
        if vae_hash is not None and other != vae_hash:
            raise InputError(f"{shard} was encoded by another AugVAE ({other[:12]}...) than this one "
                             f"({vae_hash[:12]}...): {other_vae}")


def token_shard_counts(shards: list[str], vae_hash: str | None) -> list[int]:
    """Samples per token shard from the stats files ``lverse encode`` wrote; refuses unfinished
    shards and (when ``vae_hash`` is given) shards of another AugVAE."""
    stats = [(s, read_stats(s, "not a finished token shard; run (or resume) `lverse encode` on its image shards"))
             for s in shards]
    check_vae(stats, vae_hash, image_shards="point data.shards at the output of `lverse encode`",
              other_vae="encode the images with this checkpoint or name the checkpoint the shards came from")
    return [int(values["samples"]) for _, values in stats]


def image_shard_counts(shards: list[str]) -> list[int]:
    """Samples per img2dataset shard, from its ``_stats.json`` (``successes``)."""
    return [int(read_stats(shard, "an unfinished download shard; resume `lverse download`")["successes"])
            for shard in shards]
