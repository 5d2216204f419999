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
    client (and every process it starts) at it until the block ends. The server takes any
    credentials until ``enforce_iam`` is called."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    # Its request log goes to a file: a pipe nobody reads would fill and stop the server.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
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


def enforce_iam(endpoint: str) -> None:
    """From the next request on, the server checks credentials and IAM policies as AWS does (moto's
    admin call that sets how many requests it still serves without: none)."""
    request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "application/octet-stream"})  # not a form
    urllib.request.urlopen(request, timeout=10).close()


def make_bucket(name: str) -> None:
    import s3fs
    s3fs.S3FileSystem().mkdir(name)


def _forget_filesystems() -> None:
    """fsspec keeps file systems by their options: one made for another server must not serve."""
    import fsspec.config
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    fsspec.config.conf.pop("s3", None)


class FlakyProxy:
    """An HTTP proxy in front of the S3 server that answers chosen requests with S3's 503 SlowDown,
    as a store under load does: ``fail(method, path)`` is asked for every request, and the proxy
    forwards those it says False to. A context manager; ``endpoint`` is its URL, ``failed`` what it
    refused."""

    def __init__(self, target: str, fail):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        host, port = target.removeprefix("http://").split(":")
        proxy = self
        self.failed: list[tuple[str, str]] = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # so an upload's "Expect: 100-continue" is answered

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if fail(self.command, self.path):
                    proxy.failed.append((self.command, self.path))
                    error = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(error)))
                    self.end_headers()
                    self.wfile.write(error)
                    return
                upstream = http.client.HTTPConnection(host, int(port), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
                upstream.request(self.command, self.path, body=body, headers=headers | {"Host": f"{host}:{port}"})
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():  # a HEAD's Content-Length is the object's: kept
                    if k.lower() not in ("transfer-encoding", "connection") and not (
                            k.lower() == "content-length" and self.command != "HEAD"):
                        self.send_header(k, v)
                if self.command != "HEAD":
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
