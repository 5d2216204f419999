import io
import urllib.error
import urllib.request

import pytest
from PIL import Image

from lverse.preprocessing.synthetic_server import BAD_PATHS, SyntheticServer, SyntheticSet


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_the_set_is_deterministic_and_splits_differ():
    a, b = SyntheticSet(seed=3, train=5, heldout=5), SyntheticSet(seed=3, train=5, heldout=5)
    assert a.jpeg("train", 2) == b.jpeg("train", 2)
    assert a.sample("train", 2)[1] == b.sample("train", 2)[1]
    assert a.jpeg("train", 0) != a.jpeg("heldout", 0)
    assert SyntheticSet(seed=4).jpeg("train", 2) != a.jpeg("train", 2)
    with pytest.raises(KeyError):
        a.sample("train", 5)


def test_server_routes_and_tsv(tmp_path):
    data = SyntheticSet(seed=0, train=4, heldout=2, image_size=48)
    with SyntheticServer(data, slow_seconds=2) as server:
        status, ctype, body = fetch(f"{server.url}/img/train/1.jpg")
        assert status == 200 and ctype == "image/jpeg" and Image.open(io.BytesIO(body)).size == (48, 48)
        assert fetch(f"{server.url}/bad/redirect.jpg")[2] == data.jpeg("train", 0)
        for path, code in (("/bad/404", 404), ("/bad/500", 500), ("/img/train/99.jpg", 404)):
            with pytest.raises(urllib.error.HTTPError) as e:
                fetch(server.url + path)
            assert e.value.code == code
        with pytest.raises(OSError):  # timeout
            fetch(f"{server.url}/bad/slow.jpg", timeout=0.5)
        with pytest.raises(OSError):
            Image.open(io.BytesIO(fetch(f"{server.url}/bad/truncated.jpg")[2])).load()
        assert fetch(f"{server.url}/bad/html.jpg")[1] == "text/html"
        paths = server.write_tsv(str(tmp_path))
        train = open(paths["train"]).read().splitlines()
        heldout = open(paths["heldout"]).read().splitlines()
    assert len(train) == 4 + len(BAD_PATHS) and len(heldout) == 2
    caption, url = train[3].split("\t")
    assert caption == data.sample("train", 3)[1] and url.endswith("/img/train/3.jpg")
    assert all("/img/heldout/" in line for line in heldout)
