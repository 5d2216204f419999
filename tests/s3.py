"""A real S3-compatible server for the tests: moto's standalone server, on 127.0.0.1.

lverse reaches it over HTTP exactly as it reaches AWS, through s3fs and botocore, with the usual
variables (``AWS_ENDPOINT_URL`` and a key pair, which moto accepts whatever they are). The server
keeps its objects in memory and dies with its process, which the context manager ends.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator

from .conftest import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "lverse-test", "AWS_SECRET_ACCESS_KEY": "lverse-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """Start the server and yield its endpoint URL; this process's environment points every AWS
    client (and every process it starts) at it until the block ends."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Its request log goes to a file: a pipe nobody reads would fill and stop the server.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL", "FSSPEC_S3"]}
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"moto's S3 server did not start: {log.read().decode()[-2000:]}") from None
                time.sleep(0.2)
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=endpoint)
        os.environ.pop("FSSPEC_S3", None)
        _forget_filesystems()
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _forget_filesystems()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def make_bucket(name: str) -> None:
    import s3fs
    s3fs.S3FileSystem().mkdir(name)


def _forget_filesystems() -> None:
    """fsspec keeps file systems by their options: one made for another server must not serve."""
    import fsspec.config
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.config.conf.pop("s3", None)
