"""The download stage: image-caption lists -> webdataset shards, fetched with img2dataset.

1. ``plan``: read the input (Conceptual Captions TSV in either layout, or parquet/CSV with named
   columns), validate every line, and write the valid rows as chunks of ``samples_per_shard`` rows
   (``_chunks/00000.parquet`` ...). img2dataset aborts a whole run on one line with a missing
   field and silently drops every image of a shard when a caption is not UTF-8, and it reads
   ``file://`` URLs from the local disk; so lines are checked here and malformed ones counted.
2. ``download_chunk``: one chunk -> one shard, fetched in the worker by img2dataset's reader and
   downloader (``_fetch`` says why not its ``download()``) into ``_tmp/NNNNN/`` (a local
   temporary folder when the output is an ``s3://`` URL); the result is re-keyed to the chunk's
   shard number, moved (or uploaded) into place (``NNNNN.tar``, ``NNNNN.parquet``) and
   ``NNNNN_stats.json`` is written last: it is the done marker (img2dataset's own convention), so
   a killed run never leaves a truncated tar that looks finished.
3. The driver runs chunks on an executor (local processes, Ray tasks, or one SLURM array task per
   chunk), retries failed ones, and writes ``_summary.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote, urlsplit, urlunsplit

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import (
    atomic_output,
    atomic_write_json,
    atomic_write_parquet,
    read_json,
    remove_stale_temporaries,
)
from lverse.pipeline.configs import DownloadConfig
from lverse.runtime.stage import rate, run_shard_stage
from lverse.runtime.tasks import TaskResult

log = logging.getLogger(__name__)

MAX_SHARDS = 100_000


@dataclass(frozen=True)
class Chunk:
    index: int
    rows: str  # parquet with url, caption
    output: str
    image_size: int
    resize_mode: str
    threads: int
    timeout: float
    image_retries: int

    @property
    def name(self) -> str:
        return f"{self.index:05d}"


# -- 1. plan --------------------------------------------------------------------------------

def iter_rows(cfg: DownloadConfig) -> Iterator[tuple[str, str] | str]:
    """Valid (caption, url) pairs, and for each malformed line the reason as a string."""
    fmt = cfg.input_format
    if fmt == "auto":
        ext = os.path.splitext(cfg.input)[1].lower()
        fmt = {".parquet": "parquet", ".csv": "csv"}.get(ext, "tsv")
    if fmt in ("parquet", "csv"):
        yield from _iter_table(cfg, fmt)
    else:
        yield from _iter_tsv(cfg.input, fmt)


def _iter_tsv(path: str, layout: str) -> Iterator[tuple[str, str] | str]:
    with open(path, "rb") as f:
        for number, raw in enumerate(f):
            if number == 0:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte order mark is no part of the first field
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                yield "not_utf8"
                continue
            if not line.strip():
                continue
            if "\t" not in line:
                yield "no_tab"
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                yield "wrong_field_count"
                continue
            if layout == "cc12m" or (layout == "tsv" and _is_url(fields[0]) and not _is_url(fields[1])):
                fields.reverse()
            yield _check(*fields)


def _iter_table(cfg: DownloadConfig, fmt: str) -> Iterator[tuple[str, str] | str]:
    import pyarrow.csv
    table = storage.read_parquet(cfg.input) if fmt == "parquet" else pyarrow.csv.read_csv(cfg.input)
    missing = [c for c in (cfg.url_col, cfg.caption_col) if c not in table.column_names]
    if missing:
        raise InputError(f"{cfg.input} has no column {missing}; its columns are {table.column_names} "
                         "(choose with --url-col / --caption-col)")
    for caption, url in zip(table.column(cfg.caption_col).to_pylist(), table.column(cfg.url_col).to_pylist()):
        if caption is None or url is None:
            yield "missing_field"
        elif isinstance(caption, bytes) or isinstance(url, bytes):
            yield "not_utf8"
        else:
            yield _check(str(caption), str(url))


def _is_url(text: str) -> bool:
    return text[:8].lower().startswith(("http://", "https://"))  # schemes are case-insensitive


def _check(caption: str, url: str) -> tuple[str, str] | str:
    caption, url = caption.strip(), url.strip()
    if not caption:
        return "empty_caption"
    if not _is_url(url) or any(c.isspace() for c in url):
        return "bad_url"  # also refuses file:// and ftp://, which img2dataset would fetch
    try:
        return caption, ascii_url(url)
    except (UnicodeError, ValueError):
        return "bad_url"


def ascii_url(url: str) -> str:
    """An http(s) URL as a request can send it: the scheme lower-cased, a non-ASCII host in IDNA
    (punycode), other non-ASCII characters percent-encoded as UTF-8 (an IRI -> its URI); ASCII
    otherwise left exactly as given."""
    parts = urlsplit(url)
    scheme, netloc = parts.scheme.lower(), parts.netloc
    if url.isascii():
        return scheme + url[len(parts.scheme):]
    if not netloc.isascii():
        userinfo, at, hostport = netloc.rpartition("@")
        host, colon, port = hostport.partition(":") if not hostport.startswith("[") else (hostport, "", "")
        netloc = quote(userinfo, safe=":%") + at + host.encode("idna").decode("ascii") + colon + port
    keep = "/?#[]@!$&'()*+,;=:%~"  # reserved characters and existing %-escapes stay as they are
    return urlunsplit((scheme, netloc, quote(parts.path, safe=keep), quote(parts.query, safe=keep),
                       quote(parts.fragment, safe=keep)))


def plan(cfg: DownloadConfig) -> tuple[list[Chunk], dict]:
    """Validate the input and write its chunks, once: a rerun reuses ``_chunks/_plan.json``
    when the input file and chunking are unchanged."""
    folder = os.path.join(cfg.output, "_chunks")
    marker = os.path.join(folder, "_plan.json")
    st = os.stat(cfg.input)
    signature = {"input": os.path.abspath(cfg.input), "size": st.st_size, "mtime": st.st_mtime,
                 "samples_per_shard": cfg.samples_per_shard, "input_format": cfg.input_format,
                 "url_col": cfg.url_col, "caption_col": cfg.caption_col}
    info = None
    if storage.exists(marker):
        info = read_json(marker)
        if info["signature"] != signature:
            raise InputError(f"{cfg.output} holds a download of another input or chunking "
                             f"({info['signature']['input']}); use a new --output folder")
    else:
        info = _write_chunks(cfg, folder, signature)
        atomic_write_json(marker, info)
    chunks = [Chunk(k, os.path.join(folder, f"{k:05d}.parquet"), cfg.output, cfg.image_size,
                    cfg.resize_mode, cfg.download_threads, cfg.timeout, cfg.image_retries)
              for k in range(info["chunks"])]
    return chunks, info


def _write_chunks(cfg: DownloadConfig, folder: str, signature: dict) -> dict:
    storage.makedirs(folder)
    malformed, lines, valid, rows, k = Counter(), 0, 0, [], 0
    for row in iter_rows(cfg):
        lines += 1
        if isinstance(row, str):
            malformed[row] += 1
            continue
        valid += 1
        rows.append(row)
        if len(rows) == cfg.samples_per_shard:
            _write_chunk(folder, k, rows, cfg)
            rows, k = [], k + 1
    if rows:
        _write_chunk(folder, k, rows, cfg)
        k += 1
    if malformed:
        log.warning("skipped %d malformed lines of %d: %s", sum(malformed.values()), lines, dict(malformed))
    return {"signature": signature, "lines": lines, "valid": valid, "malformed": dict(malformed), "chunks": k}


def _write_chunk(folder: str, k: int, rows: list, cfg: DownloadConfig) -> None:
    if k >= MAX_SHARDS:  # shard names and keys have five digits, as img2dataset's
        raise InputError(f"more than {MAX_SHARDS} shards of {cfg.samples_per_shard} rows; raise samples_per_shard")
    import pyarrow as pa
    table = pa.table({"caption": [r[0] for r in rows], "url": [r[1] for r in rows]})
    atomic_write_parquet(os.path.join(folder, f"{k:05d}.parquet"), table)


# -- 2. one chunk ---------------------------------------------------------------------------

def download_chunk(chunk: Chunk) -> TaskResult:
    """Fetch one chunk into shard ``NNNNN``; a no-op when its ``_stats.json`` exists."""
    done = os.path.join(chunk.output, f"{chunk.name}_stats.json")
    if storage.exists(done):
        return TaskResult(chunk.name, ok=True, skipped=True)
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network check at import
    tmp = os.path.join(_work_root(chunk.output), chunk.name)
    shutil.rmtree(tmp, ignore_errors=True)  # what a stopped or killed run of this chunk left
    for name in (f"{chunk.name}.parquet", f"{chunk.name}_stats.json"):  # (the tar's: _rekey_tar)
        remove_stale_temporaries(os.path.join(chunk.output, name))
    os.makedirs(tmp)
    try:
        _fetch(chunk, tmp)
        return _finish_chunk(chunk, tmp, done)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(chunk: Chunk, tmp: str) -> None:
    """img2dataset's downloader on the chunk's rows, in this process: shard 00000 (tar, parquet,
    stats) in ``tmp``.

    Why not `img2dataset.download()`: every call starts a logger process and a process pool (each
    importing torch, wandb and albumentations: about 16 CPU-seconds per chunk on a 2-core machine)
    to run what a chunk, already a task in a worker of its own, can run in place: the same
    threads, resizer, writer and stats. The price is that these classes are img2dataset's
    internals: its version is pinned (constraints.txt) and tests/test_download.py runs them.

    Its reader is left out: all it would do here is copy the rows into the Arrow file its
    downloader reads, and it reads them through a Python file object (core/storage.py
    ``read_parquet`` says why lverse never does)."""
    import pyarrow as pa
    from img2dataset.downloader import Downloader
    from img2dataset.resizer import Resizer
    from img2dataset.writer import WebDatasetSampleWriter
    columns = ["caption", "url"]  # what img2dataset's reader hands its downloader for such input
    table = storage.read_parquet(chunk.rows, columns)
    rows = os.path.join(tmp, "rows.arrow")
    with pa.OSFile(rows, "wb") as f, pa.ipc.new_file(f, table.schema) as writer:
        writer.write_table(table)
    resizer = Resizer(image_size=chunk.image_size, resize_mode=chunk.resize_mode, resize_only_if_bigger=False)
    downloader = Downloader(
        WebDatasetSampleWriter, resizer, thread_count=chunk.threads, save_caption=True, extract_exif=True,
        output_folder=tmp, column_list=columns, timeout=chunk.timeout, number_sample_per_shard=table.num_rows,
        oom_shard_count=5, compute_hash="sha256", verify_hash_type=None, encode_format="jpg",
        retries=chunk.image_retries, user_agent_token=None, disallowed_header_directives=None)
    downloader.download_shard((0, rows))  # shard 00000


def _work_root(output: str) -> str:
    """The folder img2dataset writes each chunk into (a subfolder a chunk): ``_tmp`` beside the
    output on the same disk, or for an object-store output a local temporary folder (one per
    output, so a rerun finds and clears it)."""
    if not storage.is_url(output):
        return os.path.join(output, "_tmp")
    import hashlib
    import tempfile
    return os.path.join(tempfile.gettempdir(), f"lverse-download-{hashlib.sha256(output.encode()).hexdigest()[:16]}")


def _finish_chunk(chunk: Chunk, tmp: str, done: str) -> TaskResult:
    """img2dataset's shard in ``tmp`` -> shard ``chunk.name`` of the output, its marker last."""
    produced = os.path.join(tmp, "00000_stats.json")
    if not os.path.exists(produced):
        return TaskResult(chunk.name, ok=False, reason="img2dataset finished without writing its stats")
    _rekey_tar(os.path.join(tmp, "00000.tar"), os.path.join(chunk.output, f"{chunk.name}.tar"), chunk.name)
    table = storage.read_parquet(os.path.join(tmp, "00000.parquet"))
    keys = [chunk.name + k[5:] for k in table.column("key").to_pylist()]
    # Rows in key order (img2dataset writes them as its threads finish): a rerun writes the same bytes.
    table = table.set_column(table.column_names.index("key"), "key", [keys]).sort_by("key")
    atomic_write_parquet(os.path.join(chunk.output, f"{chunk.name}.parquet"), table)
    with open(produced) as f:
        stats = json.load(f)
    atomic_write_json(done, stats)  # last: the shard is done
    return TaskResult(chunk.name, ok=True, stats=stats)


def _rekey_tar(src: str, dst: str, shard: str) -> None:
    """Copy img2dataset's shard 00000 as shard ``shard``: keys renumbered (``00000xxxx`` ->
    ``{shard}xxxx``, img2dataset's scheme), members sorted by key, then renamed into place. Times
    and modes are fixed (not the download's), so the same images give the same bytes."""
    remove_stale_temporaries(dst)
    with atomic_output(dst) as tmp, tarfile.open(src) as tin, tarfile.open(tmp, "w") as tout:
        for member in sorted(tin.getmembers(), key=lambda m: m.name):
            data = tin.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if ext == "json":
                meta = json.loads(data)
                meta["key"] = shard + meta["key"][5:]
                data = json.dumps(meta, indent=4).encode()
            info = tarfile.TarInfo(f"{shard}{key[5:]}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tout.addfile(info, io.BytesIO(data))


# -- 3. driver ------------------------------------------------------------------------------

def run_download(cfg: DownloadConfig) -> dict:
    """Plan, fetch every chunk not yet done (retrying failures), and summarise; raises
    StageFailed (after writing the summary) when shards still fail."""
    if not os.path.isfile(cfg.input):
        raise FileNotFoundError(f"input {cfg.input} does not exist")
    storage.check_output(cfg.output)
    chunks, info = plan(cfg)
    if info["valid"] == 0:
        raise InputError(f"{cfg.input} has no valid line of {info['lines']} (malformed: {info['malformed']}); "
                         "check --input-format, --url-col and --caption-col")
    log.info("%d valid lines of %d in %d chunks of up to %d", info["valid"], info["lines"], len(chunks),
             cfg.samples_per_shard)
    try:
        return run_shard_stage("download", download_chunk, chunks, [c.name for c in chunks], cfg.output, cfg,
                               totals=lambda results, seconds: image_totals(cfg.output, info, results, seconds))
    finally:
        # Empty unless a chunk is still failing. An array task leaves it be: another task may be
        # between os.makedirs' two steps (_tmp, then _tmp/NNNNN), which would then fail.
        if cfg.task_index is None:
            with contextlib.suppress(OSError):
                os.rmdir(_work_root(cfg.output))


def image_totals(output: str, info: dict, results: list[TaskResult], seconds: float) -> dict:
    """Lines and images of the shards in ``results``, from the input plan and each shard's parquet."""
    failed_by, written, attempted, fetched_now = Counter(), 0, 0, 0
    for r in results:
        path = os.path.join(output, f"{r.name}.parquet")
        if not r.ok or not storage.exists(path):
            continue
        table = storage.read_parquet(path, ["status", "error_message"]).to_pydict()
        attempted += len(table["status"])
        for status, message in zip(table["status"], table["error_message"]):
            if status == "success":
                written += 1
                fetched_now += not r.skipped
            else:
                failed_by[failure_reason(message)] += 1
    return {"lines": info["lines"], "malformed": sum(info["malformed"].values()),
            "malformed_by_reason": info["malformed"], "attempted": attempted, "written": written,
            "images_failed": sum(failed_by.values()), "images_failed_by_reason": dict(failed_by),
            "images_per_second": rate(fetched_now, seconds)}


def failure_reason(message: str | None) -> str:
    """img2dataset's error message -> a reason to count: http_404, timeout, decode_error, ..."""
    message = message or "unknown"
    if message.startswith("HTTP Error "):
        return "http_" + message.split()[2].rstrip(":")
    if "timed out" in message:
        return "timeout"
    if "decoding error" in message.lower():
        return "decode_error"
    return message[:80]
