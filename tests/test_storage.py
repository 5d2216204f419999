"""Stages on an object store: every folder an s3:// URL on a real S3-compatible server (moto's,
on 127.0.0.1, reached over HTTP), the outputs byte for byte those of the same run on local disk."""

import json
import os
import subprocess
import sys

import pytest

from lverse.cli import main
from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_parquet
from lverse.core.shards import expand_shards, iter_samples
from lverse.pipeline.caption import run_caption
from lverse.pipeline.configs import DownloadConfig
from lverse.pipeline.download import run_download
from lverse.preprocessing.synthetic_server import SyntheticServer, SyntheticSet

from .s3 import enforce_iam, make_bucket, s3_server
from .test_caption import config as caption_config


@pytest.fixture(scope="module")
def s3():
    with s3_server() as endpoint:
        make_bucket("lverse")
        yield endpoint


def objects(prefix: str) -> dict[str, bytes]:
    """Every file under a local folder or an s3:// prefix, by its path below it."""
    if storage.is_url(prefix):
        fs, inner = storage.filesystem(prefix)
        return {p[len(inner) + 1:]: fs.cat_file(p) for p in fs.find(inner)}
    found = {}
    for root, _, files in os.walk(prefix):
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, prefix)] = open(path, "rb").read()
    return found


RUN_FIELDS = ("start_time", "end_time", "duration", "seconds", "node", "source")


def outputs(prefix: str) -> dict[str, bytes]:
    """A stage's outputs, less what records the run rather than the data: its summary, and a
    shard stats' times, host and input path."""
    found = {k: v for k, v in objects(prefix).items() if not k.startswith("_summary")}
    for name, raw in found.items():
        if name.endswith("_stats.json"):
            found[name] = {k: v for k, v in json.loads(raw).items() if k not in RUN_FIELDS}
    return found


@pytest.mark.slow
def test_download_encode_caption_on_s3_equal_local_and_a_rerun_skips_everything(s3, data, biart, tmp_path):  # noqa: F811
    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode
    from lverse.pipeline.evaluate import load_predictions
    roots = {"local": str(tmp_path / "run"), "s3": "s3://lverse/run"}

    def stages(root):
        return [lambda: run_download(DownloadConfig(input=tsv, output=f"{root}/images", samples_per_shard=5,
                                                    image_size=64, download_threads=4)),
                lambda: run_encode(EncodeConfig(shards=f"{root}/images", vae=data["vae"], output=f"{root}/tokens")),
                lambda: run_caption(caption_config(data, biart, f"{root}/captions", shards=f"{root}/tokens"))]

    with SyntheticServer(SyntheticSet(seed=3, train=10, heldout=1, image_size=64)) as server:
        tsv = server.write_tsv(str(tmp_path / "in"), bad_urls=False)["train"]  # one input for both runs
        for where, root in roots.items():
            download, encode, caption = (stage() for stage in stages(root))
            assert download["written"] == 10 and encode["samples"] == 10 and caption["images"] == 10, where
        for folder in ("images", "tokens", "captions"):
            remote = outputs(f"{roots['s3']}/{folder}")
            assert remote == outputs(f"{roots['local']}/{folder}") and remote, folder
        assert not storage.exists("s3://lverse/run/images/_tmp")
        assert json.loads(objects(f"{roots['s3']}/tokens")["00001_stats.json"])["source"] == \
            "s3://lverse/run/images/00001.tar"
        for stage in stages(roots["s3"]):  # a rerun finds everything done
            again = stage()
            assert again["skipped"] == again["shards"] == 2 and again["done"] == 0
    # evaluate reads the captions where they are
    assert load_predictions(f"{roots['s3']}/captions") == load_predictions(f"{roots['local']}/captions")


def test_an_upload_counts_whole_or_not_at_all(s3):
    with atomic_output("s3://lverse/atomic/a.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"x" * 1000)
    assert storage.getsize("s3://lverse/atomic/a.bin") == 1000
    with pytest.raises(RuntimeError), atomic_output("s3://lverse/atomic/b.bin") as tmp:
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert not storage.exists("s3://lverse/atomic/b.bin")
    assert not os.path.exists(tmp)  # the local temporary is gone too


def test_parquet_is_read_whole_in_the_calling_thread_from_disk_and_s3(s3, tmp_path):
    """storage.read_parquet (its doc says why): the same table from either kind of path, and no
    Arrow thread started by a read, so none is left to meet the interpreter's exit."""
    import pyarrow as pa
    table = pa.table({"key": ["a", "b"], "n": [1, 2]})
    atomic_write_parquet(str(tmp_path / "t.parquet"), table)
    atomic_write_parquet("s3://lverse/parquet/t.parquet", table)
    assert storage.read_parquet("s3://lverse/parquet/t.parquet", ["key"]).to_pydict() == {"key": ["a", "b"]}
    script = ("import os, sys, pyarrow\nfrom lverse.core import storage\n"
              "before = len(os.listdir('/proc/self/task'))\n"
              "table = storage.read_parquet(sys.argv[1], ['key']).to_pydict()\n"
              "print(len(os.listdir('/proc/self/task')) - before, table['key'])")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "t.parquet")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["0", "['a',", "'b']"]  # threads added by the read, then the keys


def test_samples_stream_from_s3_as_from_disk(s3, data):  # noqa: F811
    fs, _ = storage.filesystem("s3://lverse")
    local = os.path.join(data["raw"], "00000.tar")
    fs.put_file(local, "lverse/raw/00000.tar")
    assert list(iter_samples("s3://lverse/raw/00000.tar")) == list(iter_samples(local))
    whole = open(local, "rb").read()
    end = -(-len(whole.rstrip(b"\0")) // 512) * 512  # the last member's end: a cut at a member boundary
    fs.pipe_file("lverse/raw/00001.tar", whole[:end])
    with pytest.raises(InputError, match="truncated"):
        next(iter_samples("s3://lverse/raw/00001.tar"))


def test_bad_storage_is_refused_before_work_with_what_to_change(s3, tmp_path, monkeypatch, caplog):
    with pytest.raises(InputError, match="s3:// URLs, not gs://"):
        storage.check_output("gs://bucket/x")
    with pytest.raises(InputError, match="bucket does not exist: create the bucket"):
        storage.check_output("s3://no-such-bucket/out")
    with pytest.raises(InputError, match="bucket does not exist: create the bucket"):
        expand_shards("s3://no-such-bucket/shards")
    tsv = tmp_path / "in.tsv"
    tsv.write_text("a red square\thttp://127.0.0.1:9/a.jpg\n")
    assert main(["download", "--input", str(tsv), "--output", "s3://no-such-bucket/images"]) == 2
    assert "bucket does not exist: create the bucket or fix the URL" in caplog.text
    run = tmp_path / "run.yaml"  # a training run's folder: checkpoints need a file system
    run.write_text("run_dir: s3://lverse/run\nsteps: 1\ndata: {shards: s3://lverse/tokens, tokenizer: t, vae: v}\n")
    assert main(["train", "--config", str(run)]) == 2
    assert "writes its checkpoints and logs to a file system" in caplog.text
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(InputError, match="no credentials"):
        storage.check_output("s3://lverse/out")
    s3fs.S3FileSystem.clear_instance_cache()


def test_storage_options_reach_the_file_system_and_child_processes(s3, monkeypatch):
    import subprocess
    import sys
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("FSSPEC_S3", "{}")  # restored at the end, as configure() sets it
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()
    storage.configure({"endpoint_url": s3})
    try:
        storage.check_output("s3://lverse/options")  # reached only through the option
        child = subprocess.run([sys.executable, "-c", "from lverse.core import storage; "
                                "storage.check_output('s3://lverse/options-child')"], capture_output=True, text=True)
        assert child.returncode == 0, child.stderr
    finally:
        import fsspec.config
        fsspec.config.conf.pop("s3", None)
        s3fs.S3FileSystem.clear_instance_cache()


def test_generate_writes_to_s3_what_it_writes_to_disk_and_resumes(s3, data, biart, tmp_path):  # noqa: F811
    from lverse.pipeline.configs import GenerateConfig
    from lverse.pipeline.generate import run_generate
    fs, _ = storage.filesystem("s3://lverse")
    fs.pipe_file("lverse/gen/prompts.txt", b"a red circle at the top on a blue background\nan orange square\n")
    runs = {"local": str(tmp_path / "gen"), "s3": "s3://lverse/gen/out"}
    for out in runs.values():
        cfg = GenerateConfig(prompts="s3://lverse/gen/prompts.txt", checkpoint=biart, vae=data["vae"],
                             tokenizer=data["tokenizer"], output=out, candidates=2, clip="lverse-tiny", workers=0)
        assert run_generate(cfg)["generated"] == 2
    found = outputs(runs["s3"])
    assert found == outputs(runs["local"]) and "00001/result.json" in found and "00000/candidates/01.png" in found
    fs.rm_file("lverse/gen/out/00001/result.json")  # as if killed before its marker: only that prompt is redone
    again = run_generate(cfg)
    assert again["generated"] == 1 and outputs(runs["s3"]) == found
    from lverse.pipeline.evaluate import generation_clip_score, image_files
    assert generation_clip_score(runs["s3"]) == generation_clip_score(runs["local"])
    assert [p.removeprefix(runs["s3"]) for p in image_files(runs["s3"])] == \
        [p.removeprefix(runs["local"]) for p in image_files(runs["local"])] == ["/00000/best.png", "/00001/best.png"]


def test_token_shards_on_s3_are_indexed_into_a_named_folder_and_a_rewrite_makes_it_stale(s3, data, tmp_path,  # noqa: F811
                                                                                         caplog):
    from lverse.core.shards import file_sha256
    from lverse.runtime.token_index import open_samples
    from lverse.runtime.token_index_build import ensure_index
    fs, _ = storage.filesystem("s3://lverse")
    fs.put(data["tokens"] + "/", "lverse/index/tokens/", recursive=True)
    remote = expand_shards("s3://lverse/index/tokens")
    vae = file_sha256(data["vae"])
    assert main(["index", "--tokens", "s3://lverse/index/tokens", "--quiet"]) == 2
    assert "must be on a file system: name a folder for it" in caplog.text
    assert main(["index", "--tokens", "s3://lverse/index/tokens", "--index-dir", str(tmp_path / "idx"), "--quiet"]) == 0
    assert os.path.isfile(tmp_path / "idx" / "_index" / "meta.json")
    samples = ensure_index(remote, vae, index_dir=str(tmp_path / "idx"))
    local = ensure_index(expand_shards(data["tokens"]), vae)
    assert len(samples) == len(local) > 0
    for i in (0, len(local) // 2, len(local) - 1):
        a, b = samples[i], local[i]
        assert a["__key__"] == b["__key__"] and (a["codes"] == b["codes"]).all() and a["txt"] == b["txt"]
    fs.copy("lverse/index/tokens/00002.tar", "lverse/index/tokens/00001.tar")  # rewritten, its stats file not
    with pytest.raises(InputError, match=r"00001.tar changed .*--index-dir"):
        open_samples(remote, vae, index_dir=str(tmp_path / "idx"))


@pytest.mark.slow
def test_training_reads_token_shards_from_s3_as_from_disk(s3, data, tmp_path):  # noqa: F811
    import subprocess
    import sys

    import yaml

    from .test_train import losses, metrics, train_config
    fs, _ = storage.filesystem("s3://lverse")
    fs.put(data["tokens"] + "/", "lverse/train/tokens/", recursive=True)
    for where, shards in (("local", data["tokens"]), ("s3", "s3://lverse/train/tokens")):
        cfg = train_config(tmp_path / f"{where}.yaml", data, tmp_path / where, steps=2, export=False)
        values = yaml.safe_load(open(cfg))
        values["data"].update(shards=shards, workers=1)
        with open(cfg, "w") as f:
            yaml.safe_dump(values, f)
        proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert os.path.isfile(tmp_path / "s3" / "token_index" / "_index" / "meta.json")  # the run folder holds it
    local, remote = metrics(tmp_path / "local"), metrics(tmp_path / "s3")
    for step in (1, 2):
        assert losses(remote[step][0]) == losses(local[step][0])


def test_a_prefix_the_credentials_may_only_read_is_refused_before_work(tmp_path, caplog):
    import boto3
    with s3_server() as endpoint:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="readonly")
        iam = boto3.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="reader")
        read = {"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"],
                "Resource": ["arn:aws:s3:::readonly", "arn:aws:s3:::readonly/*"]}
        iam.put_user_policy(UserName="reader", PolicyName="read",
                            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [read]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        enforce_iam(endpoint)
        os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
        storage.check_input("s3://readonly/shards")  # reading is allowed
        tsv = tmp_path / "in.tsv"
        tsv.write_text("a red square\thttp://127.0.0.1:9/a.jpg\n")
        assert main(["download", "--input", str(tsv), "--output", "s3://readonly/images"]) == 2
        assert "cannot write to s3://readonly/images: permission denied" in caplog.text
        assert not storage.exists("s3://readonly/images/_chunks")  # refused before any work


@pytest.mark.slow
def test_a_transient_s3_error_fails_only_its_shard_which_the_stage_retries(s3, data, biart, tmp_path,  # noqa: F811
                                                                           monkeypatch):
    """The store answers the upload of a done marker, then the download of a shard, with 503
    SlowDown as often as s3fs tries (botocore told not to retry underneath): each shard's task
    fails once, the stage retries it, and the outputs are those of a run without faults."""
    import fsspec.config
    import s3fs

    from lverse.pipeline.configs import EncodeConfig
    from lverse.pipeline.encode import run_encode

    from .s3 import FlakyProxy
    faults = {("PUT", "/lverse/flaky/tokens/00001_stats.json"): s3fs.S3FileSystem.retries,
              ("GET", "/lverse/flaky/tokens/00002.tar"): s3fs.S3FileSystem.retries}

    def fail(method, path):  # the first requests of each rule, as many as s3fs tries a call
        rule = (method, path.split("?")[0])
        if faults.get(rule):
            faults[rule] -= 1
            return True
        return False

    with FlakyProxy(s3, fail) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
        monkeypatch.setenv("FSSPEC_S3", "{}")
        s3fs.S3FileSystem.clear_instance_cache()
        storage.configure({"config_kwargs": {"retries": {"total_max_attempts": 1}}})  # s3fs's tries only
        try:
            encoded = run_encode(EncodeConfig(shards=data["raw"], vae=data["vae"], output="s3://lverse/flaky/tokens"))
            captioned = run_caption(caption_config(data, biart, "s3://lverse/flaky/captions",
                                                   shards="s3://lverse/flaky/tokens"))
        finally:
            fsspec.config.conf.pop("s3", None)
            monkeypatch.setenv("AWS_ENDPOINT_URL", s3)  # the server itself again
            s3fs.S3FileSystem.clear_instance_cache()
    assert [m for m, _ in proxy.failed] == ["PUT"] * s3fs.S3FileSystem.retries + ["GET"] * s3fs.S3FileSystem.retries
    assert encoded["done"] == encoded["shards"] and not encoded["failed"]
    assert captioned["done"] == captioned["shards"] and not captioned["failed"]

    def shards(found):
        return {k: v for k, v in found.items() if k.endswith((".tar", "_stats.json"))}
    assert shards(outputs("s3://lverse/flaky/tokens")) == shards(outputs(data["tokens"]))
    run_caption(caption_config(data, biart, tmp_path / "captions"))
    assert outputs("s3://lverse/flaky/captions") == outputs(str(tmp_path / "captions"))
