"""The core's own promises: files others can read, reproducible checkpoint bytes, shard reading."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from collections import Counter

import pytest

from lverse.core.files import atomic_write_json
from lverse.core.shards import iter_samples, sample_meta


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, mask, mode):
    old = os.umask(mask)
    try:
        atomic_write_json(str(tmp_path / "x.json"), {"a": 1})
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "x.json").st_mode & 0o777 == mode


def test_saved_models_are_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its header's maps in hash order; save_model sorts them."""
    script = ("import sys, torch\nfrom lverse.model import AugVAE, save_model\n"
              "from lverse.model.augvae import PRESETS\n"
              "torch.manual_seed(0)\nsave_model(AugVAE(PRESETS['debug-sl']), sys.argv[1])\n")
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(3)]
    for i, path in enumerate(paths):
        subprocess.run([sys.executable, "-c", script, path], check=True, env={**os.environ, "PYTHONHASHSEED": str(i)})
    data = [open(p, "rb").read() for p in paths]
    assert data[0] == data[1] == data[2]
    from lverse.model import AugVAE
    assert AugVAE.from_pretrained(paths[0]).cfg.variant == "sl"


def _tar(path, names):
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))


def test_samples_are_grouped_as_webdataset_groups_them(tmp_path):
    _tar(tmp_path / "a.tar", ["./k1.jpg", "./k1.txt", "./k1.seg.png", "LICENSE", "./sub/k2.JPG", "./sub/k2.txt"])
    skipped = Counter()
    samples = list(iter_samples(str(tmp_path / "a.tar"), skipped))
    assert [s["__key__"] for s in samples] == ["k1", "sub/k2"]
    assert sorted(samples[0]) == ["__key__", "jpg", "seg.png", "txt"] and "jpg" in samples[1]
    assert skipped == {"no_extension": 1}


def test_sample_meta_keeps_the_sample_when_its_json_is_bad():
    assert sample_meta({"json": b'{"url": "u"}'}) == {"url": "u"}
    assert sample_meta({}) == {}
    assert sample_meta({"json": b"[1]"}) is None and sample_meta({"json": b"{no"}) is None
    assert sample_meta({"json": b"\xff"}) is None
