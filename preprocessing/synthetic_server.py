"""A local stand-in for the internet: serves the synthetic image-caption set over HTTP on 127.0.0.1.

Tests and the demo point img2dataset at it, since Conceptual Captions cannot be fetched offline.
It writes one TSV per split in CC3M's layout (``caption<TAB>url``, no header) and serves:

    /img/{split}/{i}.jpg     sample i of a split, drawn on request (deterministic for the seed);
                             the first request for each waits ``stall_seconds`` (default none)
    /bad/404, /bad/500       HTTP errors
    /bad/slow.jpg            an image, after ``slow_seconds`` (past img2dataset's timeout)
    /bad/truncated.jpg       the first half of a JPEG
    /bad/html.jpg            an HTML page, Content-Type text/html
    /bad/redirect.jpg        302 to /img/train/0.jpg (a good image, reached through a redirect)

With ``bad_urls`` the train TSV also lists each bad URL once, with a caption.
"""

from __future__ import annotations

import io
import os
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np

from .synthetic import draw_sample

SPLITS = ("train", "heldout")
BAD_PATHS = ("/bad/404", "/bad/500", "/bad/slow.jpg", "/bad/truncated.jpg", "/bad/html.jpg", "/bad/redirect.jpg")


@dataclass(frozen=True)
class SyntheticSet:
    seed: int = 0  # the whole set is a function of the seed
    train: int = 1000  # samples in the train split
    heldout: int = 100  # samples in the held-out split (never in train)
    image_size: int = 128  # side of the served JPEGs

    def size(self, split: str) -> int:
        return {"train": self.train, "heldout": self.heldout}[split]

    def sample(self, split: str, index: int):
        """(PIL image, caption) of one sample; the same for the same seed, split and index."""
        if split not in SPLITS or not 0 <= index < self.size(split):
            raise KeyError(f"no sample {split}/{index}")
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        return draw_sample(rng, self.image_size)

    def jpeg(self, split: str, index: int) -> bytes:
        buf = io.BytesIO()
        self.sample(split, index)[0].save(buf, format="JPEG", quality=95)
        return buf.getvalue()


class SyntheticServer:
    """Serves a SyntheticSet on ``host`` (127.0.0.1) in a background thread; a context manager.

    Args:
        data: the set to serve.
        port: 0 for a free port.
        slow_seconds: how long /bad/slow.jpg waits before answering.
        host: the address to listen on (a test cluster's bridge address, for its nodes).
        stall_seconds: how long the first request for each image waits before its answer: a
            server busy for a moment, as one is on a loaded machine (asked again, it answers at once).
    """

    def __init__(self, data: SyntheticSet, port: int = 0, slow_seconds: float = 20.0, host: str = "127.0.0.1",
                 stall_seconds: float = 0.0):
        self.data, self.slow_seconds, self.stall_seconds = data, slow_seconds, stall_seconds
        self.requests: dict[str, int] = {}  # path -> times asked, for tests
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> SyntheticServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def write_tsv(self, folder: str, bad_urls: bool = True) -> dict[str, str]:
        """Write ``{split}.tsv`` for every split; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        paths = {}
        for split in SPLITS:
            lines = [f"{self.data.sample(split, i)[1]}\t{self.url}/img/{split}/{i}.jpg"
                     for i in range(self.data.size(split))]
            if bad_urls and split == "train":
                lines += [f"a picture that cannot be fetched ({p})\t{self.url}{p}" for p in BAD_PATHS]
            paths[split] = os.path.join(folder, f"{split}.tsv")
            with open(paths[split], "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
        return paths

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test and demo output readable
                pass

            def do_GET(self):
                path = self.path.split("?")[0]
                server.requests[path] = server.requests.get(path, 0) + 1
                if path.startswith("/img/"):
                    if server.stall_seconds and server.requests[path] == 1:
                        time.sleep(server.stall_seconds)
                    try:
                        split, name = path[len("/img/"):].split("/")
                        return self._send(200, server.data.jpeg(split, int(name.removesuffix(".jpg"))))
                    except (KeyError, ValueError):
                        return self._send(404, b"no such sample", "text/plain")
                if path == "/bad/500":
                    return self._send(500, b"server error", "text/plain")
                if path == "/bad/slow.jpg":
                    time.sleep(server.slow_seconds)
                    return self._send(200, server.data.jpeg("train", 0))
                if path == "/bad/truncated.jpg":
                    data = server.data.jpeg("train", 1)
                    return self._send(200, data[:len(data) // 2])
                if path == "/bad/html.jpg":
                    return self._send(200, b"<html><body>not an image</body></html>", "text/html")
                if path == "/bad/redirect.jpg":
                    self.send_response(302)
                    self.send_header("Location", "/img/train/0.jpg")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return self._send(404, b"not found", "text/plain")

            def _send(self, status, body, content_type="image/jpeg"):
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        return Handler
