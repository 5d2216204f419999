"""Where stage inputs and outputs live: a local path, or an object-store URL (``s3://bucket/prefix``).

Every stage names its folders with plain strings; the functions here take either kind, so a stage
never asks which it has. Local paths go straight to ``os`` (no cost added to the common case);
URLs go through fsspec (s3fs for ``s3://``), which finds credentials and the endpoint where the AWS
tools do (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` or a profile or an instance role,
``AWS_ENDPOINT_URL`` for an S3-compatible server, ``AWS_DEFAULT_REGION``) and takes further
options from ``configure`` (the CLI's ``--storage-options``).

An object store has no rename, so an output is written to a local temporary file and uploaded in
one PUT (core/files.py ``atomic_output``): S3 shows an object whole or not at all. What makes an
output count is unchanged: the done marker (a shard's ``_stats.json``, a caption parquet, a
prompt's ``result.json``) is written after everything it vouches for, so an upload cut short by a
crash leaves at most an object no marker names, replaced by the rerun.

``os.path.join``, ``basename`` and ``dirname`` serve URLs as they are (they split on ``/``);
``os.path.abspath`` does not, hence ``absolute``.
"""

from __future__ import annotations

import contextlib
import glob as _glob
import json
import os
import uuid
from collections.abc import Iterator

from .errors import InputError

# The schemes lverse reads and writes. fsspec knows many more; each needs its own package and its
# own test against a real server before it is named here.
SCHEMES = ("s3",)
# fsspec reads FSSPEC_<PROTOCOL> (a JSON object of options) when it is imported: the variable
# carries ``configure``'s options to every process this one starts (workers, img2dataset's pool,
# a local Ray cluster). Nodes of a Ray cluster started elsewhere need their own AWS variables.
_ENV = "FSSPEC_S3"


def is_url(path: str) -> bool:
    return "://" in path


def scheme(path: str) -> str:
    return path.split("://", 1)[0].lower() if is_url(path) else ""


def check_scheme(path: str) -> None:
    """Refuse a URL of a scheme lverse does not serve (``gs://``, ``http://``, a typo)."""
    if is_url(path) and scheme(path) not in SCHEMES:
        raise InputError(f"{path}: lverse reads and writes local paths and "
                         f"{', '.join(s + '://' for s in SCHEMES)} URLs, not {scheme(path)}://")


def configure(options: dict) -> None:
    """Options for every s3:// file system of this process and the processes it starts, e.g.
    ``{"endpoint_url": "http://10.0.0.5:9000"}`` or ``{"anon": true}`` (s3fs's keyword arguments;
    ``client_kwargs`` are botocore's). They update what ``FSSPEC_S3`` already holds."""
    if not isinstance(options, dict):
        raise InputError(f"--storage-options must be a JSON object of s3fs options, not {options!r}")
    import fsspec.config
    merged = {**json.loads(os.environ.get(_ENV) or "{}"), **options}
    os.environ[_ENV] = json.dumps(merged)
    fsspec.config.conf.setdefault("s3", {}).update(merged)


def filesystem(path: str):
    """The fsspec file system of URL ``path`` and the path within it (``bucket/key``)."""
    check_scheme(path)
    import fsspec
    try:
        fs, inner = fsspec.core.url_to_fs(path)
    except ImportError as e:  # s3fs missing: the install is incomplete
        raise InputError(f"{path}: reading {scheme(path)}:// needs {e.name or 's3fs'}; install lverse's "
                         "`s3` extra (pip install -e '.[s3]')") from None
    if not hasattr(fs, "call_s3"):  # s3fs before 0.5: boto3-based, none of the calls used here
        import s3fs
        raise InputError(f"{path}: s3fs {s3fs.__version__} is too old for lverse; install lverse's `s3` "
                         "extra again (pip install -e '.[s3]'), which asks for s3fs>=2023.1")
    return fs, inner


def absolute(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(path)
    fs, inner = filesystem(path)
    return fs.exists(inner)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, inner = filesystem(path)
    return fs.isfile(inner)


def isdir(path: str) -> bool:
    """A folder; for a URL, a prefix holding at least one object."""
    if not is_url(path):
        return os.path.isdir(path)
    fs, inner = filesystem(path)
    return fs.isdir(inner)


def getsize(path: str) -> int:
    if not is_url(path):
        return os.path.getsize(path)
    fs, inner = filesystem(path)
    return int(fs.size(inner))


def makedirs(path: str) -> None:
    """A local folder and its parents; nothing for a URL (an object store's prefixes are names)."""
    if not is_url(path):
        os.makedirs(path, exist_ok=True)


def glob(pattern: str) -> list[str]:
    """Paths matching ``pattern``, sorted; URLs keep their scheme. ``*``, ``?`` and ``[...]`` as
    the shell has them."""
    if not is_url(pattern):
        return sorted(_glob.glob(pattern))
    fs, inner = filesystem(pattern)
    prefix = scheme(pattern) + "://"
    return sorted(prefix + p for p in fs.glob(inner))


def files_under(folder: str) -> list[str]:
    """Every file below ``folder``, at any depth, sorted (one listing call for a URL)."""
    if not is_url(folder):
        return sorted(os.path.join(root, name) for root, _, names in os.walk(folder) for name in names)
    fs, inner = filesystem(folder)
    return sorted(scheme(folder) + "://" + p for p in fs.find(inner))


def escape(path: str) -> str:
    """``path`` with its glob characters taken literally (a folder named ``run[1]``)."""
    return _glob.escape(path)


def open(path: str, mode: str = "rb", **kwargs):  # noqa: A001 - the builtin's twin, for either kind of path
    if not is_url(path):
        import builtins
        return builtins.open(path, mode, **kwargs)
    fs, inner = filesystem(path)
    return fs.open(inner, mode, **kwargs)


def upload(local: str, url: str) -> None:
    """Copy local file ``local`` to ``url`` in one object write (whole or not at all)."""
    fs, inner = filesystem(url)
    fs.put_file(local, inner)


@contextlib.contextmanager
def local_copy(path: str) -> Iterator[str]:
    """A local path holding the file ``path`` names: ``path`` itself when local, else a download
    removed afterwards (for readers that need a seekable local file, such as a model checkpoint)."""
    if not is_url(path):
        yield path
        return
    import tempfile
    fs, inner = filesystem(path)
    fd, tmp = tempfile.mkstemp(suffix="-" + os.path.basename(path))
    os.close(fd)
    try:
        fs.get_file(inner, tmp)
        yield tmp
    finally:
        os.remove(tmp)


def read_parquet(path: str, columns: list[str] | None = None):
    """The pyarrow Table in the parquet file ``path`` (local or object store), read whole in this
    thread. Every parquet lverse reads goes through here, for this reason:

    Arrow given a Python file object reads it on its own I/O threads into buffers owned by Python,
    and may let go of the last of them there after the read has returned. When that happens while
    the interpreter exits, the thread must take the GIL, Python ends it (pthread_exit), and the
    process aborts after its work is done: "terminate called without an active exception", exit
    134 (seen: a SLURM download array task FAILED with its summary written, a native backtrace
    showing ~PyBuffer in an Arrow thread during Py_FinalizeEx; 1 task in 6 to 20 on a busy machine).
    So Arrow gets a local path, a file of its own (an object is copied to a local file first), and
    reads it without pre-buffering or threads: no read outlives the call."""
    import pyarrow.parquet as pq
    with local_copy(path) as local, pq.ParquetFile(local, pre_buffer=False) as parquet:
        return parquet.read(columns=columns, use_threads=False)


def check_output(folder: str) -> None:
    """Before any work: refuse an output URL that cannot be written (no credentials, no such
    bucket, no permission), by writing and removing one small object, so a run never fails at its
    first finished shard. Local folders are created; their errors are OSErrors, which the CLI names
    (core/files.py ``bad_path_message``)."""
    if not is_url(folder):
        os.makedirs(folder, exist_ok=True)
        return
    probe = os.path.join(folder, f".lverse-probe-{uuid.uuid4().hex}")
    try:
        fs, inner = filesystem(probe)
        fs.pipe_file(inner, b"")
        fs.rm_file(inner)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - each of botocore's, s3fs's and aiohttp's errors, named below
        raise InputError(f"cannot write to {folder}: {describe_error(e)}") from None


def check_input(path: str) -> None:
    """Before any work: refuse an input URL whose store cannot be reached or read (credentials,
    bucket, permission) with what to change. A local path passes (its stage says what is missing)."""
    if not is_url(path):
        return
    try:
        fs, inner = filesystem(path)
        # One listing of at most one key (what a reader needs: s3:ListBucket), which fails with what
        # is wrong: no credentials, no bucket, no permission. Not a listing of the whole bucket.
        fs.call_s3("list_objects_v2", Bucket=inner.split("/", 1)[0], MaxKeys=1)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read {path}: {describe_error(e)}") from None


def describe_error(e: BaseException) -> str:
    """What an object-store error means for the user, in one line."""
    name = type(e).__name__
    text = str(e) or name
    if name in ("NoCredentialsError", "PartialCredentialsError") or "credentials" in text.lower():
        return ("no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
                "--storage-options '{\"anon\": true}' for a public bucket")
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "does not exist" in text:
        return f"{text.rstrip('.')}: create the bucket or fix the URL"
    if isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return f"permission denied ({text}): use credentials that may write there, or another prefix"
    if name in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError") or "connect" in text.lower():
        return (f"the storage endpoint cannot be reached ({text}): check AWS_ENDPOINT_URL or "
                "--storage-options' endpoint_url, and the network")
    return f"{name}: {text}"
