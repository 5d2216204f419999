"""Atomic file output: write to a temporary name in the same folder, then rename into place.

A reader (or a rerun deciding what is done) sees either the old file or the whole new one, never
a half-written file, whatever kills the writer. On an object store (an ``s3://`` output, see
core/storage.py) the temporary file is local and is uploaded in one object write.

An output path that cannot serve (a read-only folder, a file where a folder is expected, a folder
where a file is) fails as an OSError like any other; ``bad_path_message`` tells those apart from
the storage failing mid-work, so the CLI can name the path in one line.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import tempfile
from collections.abc import Iterator

from . import storage


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on success renames it to ``path`` (uploads it, for a
    URL: the temporary file is then local)."""
    if storage.is_url(path):
        storage.check_scheme(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        os.close(fd)
        try:
            yield tmp
            storage.upload(tmp, path)
        finally:
            os.remove(tmp)
        return
    if os.path.isdir(path):  # say so now, not at the rename after the whole file is written
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: on shared storage others could not read it
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is not None:
            raise
        # A write names no file (a full disk, say): name the output, for the one line of the CLI.
        raise OSError(e.errno, e.strerror, path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def umask() -> int:
    """This process's umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which races other threads creating files)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale_temporaries(path: str) -> None:
    """Delete what a killed writer of ``path`` left behind. Only the owner of ``path`` may call
    this (tasks on other files may be writing beside it). An object store holds no temporaries."""
    if storage.is_url(path):
        return
    for tmp in glob.glob(os.path.join(glob.escape(os.path.dirname(os.path.abspath(path))),
                                      f".{glob.escape(os.path.basename(path))}.*.tmp")):
        os.remove(tmp)


def atomic_write_json(path: str, obj) -> None:
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)


def atomic_write_parquet(path: str, table) -> None:
    """Write a pyarrow Table."""
    import pyarrow.parquet as pq
    with atomic_output(path) as tmp:
        pq.write_table(table, tmp)


# The rule for OSErrors (the CLI's exit status 2 or a traceback): an error whose errno says that
# the path it names cannot serve (no permission, a read-only file system, a file where a folder is
# expected or the other way round) is the user's to fix by choosing another path or changing its
# permissions, at whatever point it surfaces. Any other errno (ENOSPC, EDQUOT, EIO, ESTALE, ...)
# is the storage failing while work goes on, and keeps its traceback, as does an error naming no
# path (a socket's, say); but a full device or quota is one line too (``full_storage_message``),
# with status 1 (work failed), not 2. The one blur: a file system that remounts itself read-only after I/O
# errors lands here too, named in one line rather than shown with a traceback.
_REFUSED = (errno.EACCES, errno.EPERM, errno.EROFS)
_NOT_A_FOLDER = (errno.ENOTDIR, errno.EEXIST)


def bad_path_message(e: OSError) -> str | None:
    """One line naming the path ``e`` is about and what to change, when ``e`` says that path
    cannot serve (see the rule above); None when ``e`` is something else."""
    path = e.filename2 if e.filename2 is not None else e.filename  # a rename names its target second
    if not isinstance(path, (str, bytes)):
        return None
    path = os.fsdecode(path)
    # What failed to be created (mkstemp's temporary name, a folder of makedirs) is no help to the
    # user: name what is there, the folder that refused it, or the file that stands in the way.
    there = _nearest_existing(path)
    if e.errno == errno.EROFS:
        return f"{there} is on a read-only file system: choose a path on a writable one"
    if e.errno in _REFUSED:
        return (f"{there}: permission denied: choose a path this user may write to (or read, for an input), "
                "or change its permissions")
    if e.errno in _NOT_A_FOLDER and not os.path.isdir(there):
        inside = "" if there == path else f" (in {path})"
        return f"{there} is a file, where a folder is expected{inside}: choose another path, or move the file"
    if e.errno == errno.EISDIR and os.path.isdir(path):
        return f"{path} is a folder, where a file is expected: give the path of a file (in it, say)"
    return None  # EEXIST of a folder that is there is no mix-up of kinds: a bug or a race


def full_storage_message(e: OSError) -> str | None:
    """One line for a write that found its storage full (no space left, or the user's quota used
    up), naming the file when ``e`` does; None for any other error. Every stage resumes, so the
    way on is the same command once there is room."""
    if e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    where = f" writing {os.fsdecode(e.filename)}" if isinstance(e.filename, (str, bytes)) else ""
    return (f"{e.strerror}{where}: make room there (or choose a folder that has it), then run the same command "
            "again: it continues from what is finished")


def _nearest_existing(path: str) -> str:
    """``path``, or the nearest of its parents that exists."""
    while not os.path.lexists(path):
        parent = os.path.dirname(path.rstrip(os.sep)) or os.curdir
        if parent == path:
            break
        path = parent
    return path


def read_json(path: str):
    with storage.open(path, "r") as f:
        return json.load(f)
