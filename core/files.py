"""Atomic file output: write to a temporary name in the same folder, then rename into place.

A reader (or a rerun deciding what is done) sees either the old file or the whole new one, never
a half-written file, whatever kills the writer.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yields a temporary path beside ``path``; on success renames it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: on shared storage others could not read it
    try:
        yield tmp
        os.replace(tmp, path)
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
    this (tasks on other files may be writing beside it)."""
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


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
