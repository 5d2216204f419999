"""The download stage against real img2dataset and the local synthetic server."""

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lverse.cli import main
from lverse.pipeline.configs import DownloadConfig
from lverse.pipeline.download import plan, run_download
from lverse.preprocessing.synthetic_server import BAD_PATHS, SyntheticServer, SyntheticSet

MALFORMED = (b"no tab on this line\n"
             b"\thttp://127.0.0.1:9/empty-caption.jpg\n"
             b"a caption with an ftp url\tftp://127.0.0.1/x.jpg\n"
             b"a caption that points at a local file\tfile:///etc/passwd\n"
             b"caf\xe9 in latin-1\thttp://127.0.0.1:9/latin1.jpg\n"
             b"three\tfields\there\n")
EXPECTED_MALFORMED = {"no_tab": 1, "empty_caption": 1, "bad_url": 2, "not_utf8": 1, "wrong_field_count": 1}


@pytest.fixture()
def tsv(server, tmp_path):
    path = server.write_tsv(str(tmp_path / "in"))["train"]
    with open(path, "ab") as f:
        f.write(MALFORMED)
    return path


def read_shards(folder):
    samples = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(folder, name)) as tar:
                for m in tar.getmembers():
                    key, ext = m.name.split(".", 1)
                    assert key.startswith(name[:5]), f"{m.name} in shard {name}"
                    samples.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return samples


def config(tsv, out, **kw):
    return DownloadConfig(input=tsv, output=str(out), samples_per_shard=6, image_size=64, timeout=1.5,
                          download_threads=8, **kw)


@pytest.mark.slow
def test_download_counts_and_keeps_every_good_image(server, tsv, tmp_path):
    out = tmp_path / "out"
    summary = run_download(config(tsv, out))
    assert summary["lines"] == 12 + len(BAD_PATHS) + 6
    assert summary["malformed_by_reason"] == EXPECTED_MALFORMED
    assert summary["attempted"] == 12 + len(BAD_PATHS) and summary["shards"] == 3
    assert summary["written"] == 13  # 12 good images and the redirect
    assert summary["images_failed_by_reason"] == {"http_404": 1, "http_500": 1, "timeout": 1, "decode_error": 2}
    assert summary["failed"] == []
    assert json.load(open(out / "_summary.json")) == summary
    assert not (out / "_tmp").exists()

    captions = dict(line.rstrip("\n").split("\t")[::-1] for line in open(tsv, encoding="utf-8", errors="replace")
                    if line.count("\t") == 1 and line.startswith(("a", "an")))
    samples = read_shards(out)
    assert len(samples) == 13
    for key, files in samples.items():
        meta = json.loads(files["json"])
        assert meta["key"] == key and files["txt"].decode() == captions[meta["url"]]
        assert files["jpg"][:2] == b"\xff\xd8"
    assert {json.loads(f["json"])["url"].rsplit("/", 2)[-2] for f in samples.values()} == {"train", "bad"}

    # A rerun fetches nothing; a shard whose done marker is gone is fetched again, alone.
    before = dict(server.requests)
    mtimes = {p: os.path.getmtime(out / p) for p in os.listdir(out) if p.endswith(".tar")}
    assert run_download(config(tsv, out, workers=0))["written"] == 13
    assert server.requests == before
    os.remove(out / "00001_stats.json")
    assert run_download(config(tsv, out, workers=0))["written"] == 13
    assert sum(server.requests.values()) - sum(before.values()) == 6
    assert os.path.getmtime(out / "00000.tar") == mtimes["00000.tar"]
    assert read_shards(out).keys() == samples.keys()


@pytest.mark.slow
def test_cc12m_layout_parquet_input_and_ray(server, tmp_path):
    lines = [f"{server.url}/img/train/{i}.jpg\t{server.data.sample('train', i)[1]}" for i in range(4)]
    cc12m = tmp_path / "cc12m.tsv"
    cc12m.write_text("\n".join(lines) + "\n")
    assert run_download(config(str(cc12m), tmp_path / "a", workers=0))["written"] == 4

    table = pa.table({"image_url": [f"{server.url}/img/train/{i}.jpg" for i in range(3)],
                      "alt": [server.data.sample("train", i)[1] for i in range(3)]})
    pq.write_table(table, tmp_path / "in.parquet")
    cfg = config(str(tmp_path / "in.parquet"), tmp_path / "b", url_col="image_url", caption_col="alt",
                 executor="ray")
    try:
        assert run_download(cfg)["written"] == 3
    finally:
        import ray
        ray.shutdown()
    with pytest.raises(ValueError, match="no column"):
        run_download(config(str(tmp_path / "in.parquet"), tmp_path / "c", workers=0))


@pytest.mark.slow
def test_cli_and_changed_input(server, tsv, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["download", "--input", tsv, "--output", str(out), "--samples-per-shard", "100",
                 "--timeout", "1.5", "--image-size", "64"]) == 0
    assert json.loads(capsys.readouterr().out)["written"] == 13
    other = tmp_path / "other.tsv"
    other.write_text(f"a caption\t{server.url}/img/train/0.jpg\n")
    assert main(["download", "--input", str(other), "--output", str(out)]) == 2  # refused, not mixed


def test_a_server_busy_for_a_moment_loses_no_image(tmp_path):
    """Each image's first request stalls past the timeout, as a server on a loaded machine does:
    with --image-retries 1 the request is tried again and every image is written, rather than counted as a timeout in a
    shard that is done (and so never fetched again)."""
    with SyntheticServer(SyntheticSet(seed=2, train=4, heldout=1, image_size=64), stall_seconds=3) as server:
        tsv = server.write_tsv(str(tmp_path / "in"), bad_urls=False)["train"]
        summary = run_download(DownloadConfig(input=tsv, output=str(tmp_path / "out"), samples_per_shard=4,
                                              image_size=64, timeout=1, image_retries=1, workers=0))
        assert server.requests == {f"/img/train/{i}.jpg": 2 for i in range(4)}
    assert summary["written"] == 4 and summary["images_failed_by_reason"] == {}
    assert len(read_shards(tmp_path / "out")) == 4


def test_too_many_shards_is_refused_before_any_download(tmp_path, monkeypatch):
    import lverse.pipeline.download as download
    monkeypatch.setattr(download, "MAX_SHARDS", 2)
    tsv = tmp_path / "in.tsv"
    tsv.write_text("".join(f"caption {i}\thttp://127.0.0.1:9/{i}.jpg\n" for i in range(5)))
    with pytest.raises(ValueError, match="raise samples_per_shard"):
        download.plan(DownloadConfig(input=str(tsv), output=str(tmp_path / "out"), samples_per_shard=2))


def test_a_shard_that_keeps_failing_raises_after_the_summary(server, tmp_path):
    from lverse.runtime.tasks import StageFailed
    tsv = tmp_path / "in.tsv"
    tsv.write_text("".join(f"{server.data.sample('train', i)[1]}\t{server.url}/img/train/{i}.jpg\n" for i in range(4)))
    cfg = config(str(tsv), tmp_path / "out", retries=0, workers=0)
    plan(cfg)
    os.remove(tmp_path / "out" / "_chunks" / "00000.parquet")  # the chunk's rows are gone
    with pytest.raises(StageFailed, match="1 shards failed"):
        run_download(cfg)
    summary = json.load(open(tmp_path / "out" / "_summary.json"))
    assert [s["shard"] for s in summary["failed"]] == ["00000"]
    assert not (tmp_path / "out" / "00000_stats.json").exists()


@pytest.mark.parametrize("layout", ["cc3m", "cc12m", "auto"])
def test_input_lines_as_a_user_writes_them(tmp_path, layout):
    """A byte order mark, an upper-case scheme and a URL with non-ASCII characters are read as the
    image and caption they name."""
    from lverse.pipeline.download import iter_rows
    rows = [("a cat", "HTTP://example.com/a.jpg"), ("ein Hund", "https://bücher.de/straße.jpg?q=ä")]
    lines = [f"{c}\t{u}" if layout != "cc12m" else f"{u}\t{c}" for c, u in rows]
    tsv = tmp_path / "in.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    got = list(iter_rows(DownloadConfig(input=str(tsv), output=str(tmp_path / "out"), input_format=layout)))
    assert got == [("a cat", "http://example.com/a.jpg"),
                   ("ein Hund", "https://xn--bcher-kva.de/stra%C3%9Fe.jpg?q=%C3%A4")]


def test_an_input_without_one_valid_line_is_refused(tmp_path):
    from lverse.core.errors import InputError
    tsv = tmp_path / "in.tsv"
    tsv.write_text("no tab here\ncaption\tftp://example.com/x.jpg\n")
    with pytest.raises(InputError, match="no valid line of 2"):
        run_download(DownloadConfig(input=str(tsv), output=str(tmp_path / "out")))
    assert not (tmp_path / "out" / "_summary.json").exists()
