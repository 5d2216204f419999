"""The encode stage: raw webdataset shards -> token shards through a frozen AugVAE."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from lverse.core.errors import InputError
from lverse.core.formats import TOKEN_SHARD_FORMAT
from lverse.core.images import preprocess
from lverse.core.shards import file_sha256, iter_samples, token_shard_counts
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.pipeline.configs import EncodeConfig
from lverse.pipeline.encode import ShardEncoder, run_encode
from lverse.preprocessing.synthetic import draw_sample
from lverse.runtime.tasks import StageFailed


def make_shard(path, shard, n, seed, corrupt=(), side=80, sizes=None, quality=75):
    """A raw shard as img2dataset writes it: {key}.jpg, .txt, .json; images drawn ``side`` pixels
    square, or resized to ``sizes`` in turn."""
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"{shard:05d}{i:04d}"
            image, caption = draw_sample(rng, side)
            if sizes:
                image = image.resize(sizes[i % len(sizes)])
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality)
            jpg = buf.getvalue()[:100] if i in corrupt else buf.getvalue()
            meta = json.dumps({"key": key, "url": f"http://example.com/{key}.jpg"}).encode()
            for ext, data in (("jpg", jpg), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def raw_shards(folder, count=3, n=12, corrupt=None):
    os.makedirs(folder, exist_ok=True)
    for s in range(count):
        make_shard(os.path.join(folder, f"{s:05d}.tar"), s, n, seed=s, corrupt=(corrupt or {}).get(s, ()))
    return folder


def token_samples(path):
    return {s.pop("__key__"): s for s in iter_samples(path)}


def test_token_shards_hold_the_models_codes(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), corrupt={1: (3,)})
    with open(os.path.join(raw, "00002.tar"), "rb") as f:
        data = f.read()
    with open(os.path.join(raw, "00003.tar"), "wb") as f:  # a shard cut in half
        f.write(data[:len(data) // 2 // 512 * 512])
    out = str(tmp_path / "tok")
    with pytest.raises(StageFailed, match="00003.*truncated"):
        run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=2, batch_size=5))
    summary = json.load(open(os.path.join(out, "_summary.json")))
    assert summary["done"] == 3 and [f["shard"] for f in summary["failed"]] == ["00003"]
    assert summary["samples"] == 35 and summary["corrupt_samples"] == 1
    assert not os.path.exists(os.path.join(out, "00003.tar")), "nothing half-written"

    vae = AugVAE.from_pretrained(vae_path).eval()
    vae_hash = file_sha256(vae_path)
    raw_samples = token_samples(os.path.join(raw, "00001.tar"))
    tokens = token_samples(os.path.join(out, "00001.tar"))
    assert len(tokens) == 11 and "000010003" not in tokens
    # Batched as the stage batches (5 at a time, in order): conv kernels round differently for
    # other batch sizes, which can flip a near-tie code.
    images = torch.from_numpy(np.stack([preprocess(raw_samples[k]["jpg"], 64) for k in tokens]))
    expected = torch.cat([vae.encode(b) for b in images.split(5)]).numpy()
    for (key, files), want in zip(tokens.items(), expected):
        codes = np.load(io.BytesIO(files["codes.npy"]))
        assert codes.dtype == np.uint16 and codes.shape == (64,)
        assert np.array_equal(codes, want)
        assert files["txt"] == raw_samples[key]["txt"]
        meta = json.loads(files["json"])
        assert meta == {"key": key, "url": f"http://example.com/{key}.jpg", "vae": vae_hash}

    # A rerun skips what is done and leaves it untouched.
    mtime = os.path.getmtime(os.path.join(out, "00000.tar"))
    os.remove(os.path.join(raw, "00003.tar"))
    summary = run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=0))
    assert summary["skipped"] == 3 and summary["done"] == 0
    assert os.path.getmtime(os.path.join(out, "00000.tar")) == mtime


def test_a_shard_whose_samples_are_interleaved_fails_with_the_reason(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=3)
    path = os.path.join(raw, "00000.tar")
    with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:  # every image first, then every caption and json
        for member, data in sorted(members, key=lambda m: m[0].name.rpartition(".")[2] != "jpg"):
            tar.addfile(member, io.BytesIO(data))
    out = str(tmp_path / "tok")
    with pytest.raises(StageFailed, match="00000.*members of sample .* are not adjacent"):
        run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=0, retries=0))
    assert not os.path.exists(os.path.join(out, "00000.tar")), "no shard of images without captions"


def test_a_folder_of_another_vae_is_refused(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    out = str(tmp_path / "tok")
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=0))
    other = str(tmp_path / "other.safetensors")
    torch.manual_seed(1)  # other weights (the same weights would be the same checkpoint hash)
    save_model(AugVAE(PRESETS["debug-sl"]), other)
    with pytest.raises(ValueError, match="another AugVAE"):
        run_encode(EncodeConfig(shards=raw, vae=other, output=out, workers=0))
    with open(os.path.join(raw, "00000_stats.json"), "w") as f:  # as img2dataset leaves beside its shards
        json.dump({"count": 2, "successes": 2}, f)
    with pytest.raises(ValueError, match="did not write"):
        run_encode(EncodeConfig(shards=raw, vae=vae_path, output=raw, workers=0))


def test_token_shards_of_another_format_are_refused_naming_lverse_encode(tmp_path, vae_path):
    """A token shard's stats record the token shard format; one of another format or of none is
    refused where token shards are read (training's counts, caption's and the index's check) and by
    a rerun of encode into its folder, saying to encode the image shards again."""
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    out = str(tmp_path / "tok")
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=0))
    path, shard = os.path.join(out, "00000_stats.json"), os.path.join(out, "00000.tar")
    with open(path) as f:
        stats = json.load(f)
    assert stats["format"] == TOKEN_SHARD_FORMAT and token_shard_counts([shard], file_sha256(vae_path)) == [2]
    rewrite = "encode its image shards again with `lverse encode` into a new --output folder"
    for found, said in ((None, "records no format version"), (0, "is of format 0")):
        edited = {k: v for k, v in stats.items() if k != "format"} | ({} if found is None else {"format": found})
        with open(path, "w") as f:
            json.dump(edited, f)
        with pytest.raises(InputError, match=re.escape(f"token shard {shard} {said}; this lverse reads format 1 only: "
                                                       f"{rewrite}")):
            token_shard_counts([shard], file_sha256(vae_path))
        with pytest.raises(InputError, match=re.escape(f"token shard {path} {said}; this lverse reads format 1 only: "
                                                       f"{rewrite}")):
            run_encode(EncodeConfig(shards=raw, vae=vae_path, output=out, workers=0))


@pytest.mark.slow
def test_killed_then_resumed_equals_uninterrupted(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), count=4, n=60)
    whole = str(tmp_path / "whole")
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=whole, batch_size=4, workers=0))

    out = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "lverse.cli", "encode", "--shards", raw, "--vae", vae_path, "--output", out,
           "--batch-size", "4"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(out, "00000_stats.json")) and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = sorted(n for n in os.listdir(out) if n.endswith("_stats.json"))
    assert 1 <= len(done) < 4, f"the kill must land mid-run, found {done}"

    assert subprocess.run(cmd, capture_output=True).returncode == 0
    for s in range(4):
        with open(os.path.join(whole, f"{s:05d}.tar"), "rb") as a, open(os.path.join(out, f"{s:05d}.tar"), "rb") as b:
            assert a.read() == b.read(), f"shard {s} differs after the resume"
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


@pytest.mark.slow
def test_ray_actors_write_the_same_shards(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), count=2, n=6)
    run_encode(EncodeConfig(shards=raw, vae=vae_path, output=str(tmp_path / "local"), workers=0))
    try:
        summary = run_encode(EncodeConfig(shards=raw, vae=vae_path, output=str(tmp_path / "ray"), executor="ray"))
    finally:
        import ray
        ray.shutdown()
    assert summary["done"] == 2
    for s in range(2):
        name = f"{s:05d}.tar"
        assert open(tmp_path / "local" / name, "rb").read() == open(tmp_path / "ray" / name, "rb").read()


def test_shard_encoder_is_picklable_and_skips_done(tmp_path, vae_path):
    import pickle
    task = pickle.loads(pickle.dumps(ShardEncoder(vae_path, "h", str(tmp_path))))
    (tmp_path / "00007_stats.json").write_text("{}")
    assert task(str(tmp_path / "00007.tar")).skipped


def test_bad_members_are_skipped_and_counted_and_dot_slash_names_read(tmp_path, vae_path):
    """A tar written by `tar -C dir -cf x.tar .` (names ./key.jpg), with a .json that is no JSON
    object and a member without an extension: every good image is encoded, the rest counted."""
    raw = tmp_path / "raw"
    raw.mkdir()
    make_shard(str(tmp_path / "plain.tar"), 0, 4, seed=0)
    with tarfile.open(tmp_path / "plain.tar") as src, tarfile.open(raw / "00000.tar", "w") as out:
        for member in src.getmembers():
            data = src.extractfile(member).read()
            if member.name == "000000001.json":
                data = b"[1, 2]"
            if member.name == "000000002.json":
                data = b"{not json"
            info = tarfile.TarInfo("./" + member.name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("./README")
        info.size = 2
        out.addfile(info, io.BytesIO(b"hi"))
    summary = run_encode(EncodeConfig(shards=str(raw), vae=vae_path, output=str(tmp_path / "tokens"), workers=0))
    assert (summary["samples"], summary["bad_json_samples"], summary["members_without_extension"]) == (4, 2, 1)
    samples = token_samples(str(tmp_path / "tokens" / "00000.tar"))
    assert sorted(samples) == [f"00000{i:04d}" for i in range(4)]
    assert json.loads(samples["000000001"]["json"])["url"] is None
    assert json.loads(samples["000000003"]["json"])["url"] == "http://example.com/000000003.jpg"


def test_a_shard_without_one_usable_sample_is_not_marked_done(tmp_path, vae_path):
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=3, corrupt={0: (0, 1, 2)})
    out = tmp_path / "tokens"
    with pytest.raises(StageFailed, match="no usable sample"):
        run_encode(EncodeConfig(shards=raw, vae=vae_path, output=str(out), retries=0, workers=0))
    assert not (out / "00000_stats.json").exists() and not (out / "00000.tar").exists()


def test_a_ray_address_that_does_not_answer_is_an_error_naming_it(tmp_path, vae_path):
    from .conftest import free_port
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    address = f"127.0.0.1:{free_port()}"
    began = time.time()
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lverse"), "encode", "--shards", raw,
                          "--vae", vae_path, "--output", str(tmp_path / "tok"), "--executor", "ray",
                          "--ray-address", address], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and f"the Ray cluster at {address} does not answer" in out.stderr, out.stderr[-2000:]
    assert time.time() - began < 60 and not os.path.exists(tmp_path / "tok" / "00000.tar")


def test_a_temporary_folder_too_long_for_a_local_rays_sockets_is_an_error_saying_what_to_set(tmp_path, vae_path):
    """A scheduler's TMPDIR can be too long for the socket paths of a private Ray, which then fails
    with a bare OSError: the command says to set RAY_TMPDIR instead, before starting anything."""
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    long = tmp_path / ("t" * 40)
    long.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_TMPDIR", "RAY_ADDRESS")}
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "lverse"), "encode", "--shards", raw,
                          "--vae", vae_path, "--output", str(tmp_path / "tok"), "--executor", "ray"],
                         capture_output=True, text=True, timeout=120, env=dict(env, TMPDIR=str(long)))
    assert out.returncode == 2 and f"a local Ray cannot start under {long}" in out.stderr, out.stderr[-2000:]
    assert "set RAY_TMPDIR" in out.stderr and os.listdir(long) == []


def test_workers_0_is_for_the_local_executor_and_below_0_is_refused(tmp_path, vae_path, caplog):
    from lverse.cli import main
    raw = raw_shards(str(tmp_path / "raw"), count=1, n=2)
    with pytest.raises(InputError, match="workers 0: give at least 1, or 0 to run the items in this process"):
        run_encode(EncodeConfig(shards=raw, vae=vae_path, output=str(tmp_path / "tok"), executor="ray", workers=0))
    assert main(["encode", "--shards", raw, "--vae", vae_path, "--output", str(tmp_path / "tok"), "--workers",
                 "-1"]) == 2
    assert "workers -1: give at least 1, or 0 to run the items in this process" in caplog.text
    assert main(["coco", "--karpathy", raw + "/00000.tar", "--images", raw, "--output", str(tmp_path / "coco"),
                 "--workers", "0"]) == 2
    assert "workers must be at least 1" in caplog.text
    assert not os.path.exists(tmp_path / "tok") and not os.path.exists(tmp_path / "coco")
