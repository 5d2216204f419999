"""The core's own promises: files others can read, reproducible checkpoint bytes, shard reading,
paths that cannot serve told apart, images of any shape preprocessed in bounded work."""

from __future__ import annotations

import errno
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pytest
from PIL import Image, ImageFilter

from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json, bad_path_message
from lverse.core.images import MAX_ASPECT, preprocess
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


def test_a_sample_whose_members_are_apart_is_refused_not_split(tmp_path):
    # what `tar -cf` of a folder can store: the file system's order, not the samples'
    _tar(tmp_path / "a.tar", ["k1.jpg", "k2.jpg", "k1.txt", "k2.txt"])
    with pytest.raises(InputError, match=r"a.tar: the members of sample 'k1' are not adjacent"):
        list(iter_samples(str(tmp_path / "a.tar")))


def test_sample_meta_keeps_the_sample_when_its_json_is_bad():
    assert sample_meta({"json": b'{"url": "u"}'}) == {"url": "u"}
    assert sample_meta({}) == {}
    assert sample_meta({"json": b"[1]"}) is None and sample_meta({"json": b"{no"}) is None
    assert sample_meta({"json": b"\xff"}) is None


# -- paths that cannot serve (the CLI's one line and exit status 2; tests/test_cli.py runs them) ------

def test_only_paths_that_cannot_serve_get_a_message(tmp_path):
    (tmp_path / "f").write_text("x")
    temporary = str(tmp_path / ".x.json.abc.tmp")  # mkstemp's name, never created
    message = bad_path_message(PermissionError(errno.EACCES, "Permission denied", temporary))
    assert message.startswith(f"{tmp_path}: permission denied") and ".tmp" not in message
    assert bad_path_message(OSError(errno.EROFS, "Read-only file system", temporary)).startswith(
        f"{tmp_path} is on a read-only file system")
    assert bad_path_message(NotADirectoryError(errno.ENOTDIR, "Not a directory", str(tmp_path / "f/a/b"))) \
        .startswith(f"{tmp_path / 'f'} is a file, where a folder is expected (in {tmp_path / 'f/a/b'})")
    assert bad_path_message(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "f"))) \
        .startswith(f"{tmp_path / 'f'} is a file, where a folder is expected:")
    assert bad_path_message(IsADirectoryError(errno.EISDIR, "Is a directory", "t", None, str(tmp_path))) \
        .startswith(f"{tmp_path} is a folder, where a file is expected")  # a rename names its target second
    # the storage failing mid-work, a folder that is there, an error naming no path: a traceback
    assert bad_path_message(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f"))) is None
    assert bad_path_message(OSError(errno.EIO, "Input/output error", str(tmp_path / "f"))) is None
    assert bad_path_message(FileExistsError(errno.EEXIST, "File exists", str(tmp_path))) is None
    assert bad_path_message(PermissionError(errno.EPERM, "Operation not permitted")) is None


def test_atomic_output_refuses_a_folder_before_anything_is_written(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(IsADirectoryError), atomic_output(str(tmp_path / "out")):
        raise AssertionError("the caller must not get to write")
    assert os.listdir(tmp_path) == ["out"]


# -- preprocess: the whole image resized up to MAX_ASPECT, bounded work beyond ------------------------

def _whole_image_preprocess(jpg: bytes, size: int) -> np.ndarray:
    """The whole image resized, then centre-cropped: what preprocess must give up to MAX_ASPECT, so
    that token shards encoded from such images stay what a rerun writes."""
    with Image.open(io.BytesIO(jpg)) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))), Image.BICUBIC)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        im = im.crop((left, top, left + size, top + size))
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def _image(width: int, height: int, blur: float = 0, fmt: str = "JPEG") -> bytes:
    """Noise (the content most sensitive to any change of resampling), or blurred noise."""
    im = Image.fromarray(np.random.default_rng(width * 7 + height).integers(0, 256, (height, width, 3), np.uint8))
    if blur:
        im = im.filter(ImageFilter.GaussianBlur(blur))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("width, height", [(400, 300), (100, 300), (341, 256), (256, 1000), (256 * MAX_ASPECT, 256)])
def test_ordinary_images_preprocess_to_the_same_array_as_before(width, height):
    """Token shards already encoded stay what a rerun writes: 4:3, 1:3, img2dataset's shorter side
    of 256, and the bound itself (16:1) take the whole-image path."""
    jpg = _image(width, height)
    assert np.array_equal(preprocess(jpg, 256), _whole_image_preprocess(jpg, 256))


@pytest.mark.parametrize("width, height", [(256 * MAX_ASPECT + 1, 256), (5000, 300), (100, 1700), (3, 4500)])
def test_beyond_the_bound_the_same_crop_is_taken(width, height):
    """Only the crop is resized, from the same place, no shift: within 3 levels of the old
    algorithm's pixels on blurred noise (2 today; its intermediate pass is rounded differently)."""
    jpg = _image(width, height, blur=3)
    assert np.abs(preprocess(jpg, 256) - _whole_image_preprocess(jpg, 256)).max() <= 3 / 127.5 + 1e-6


MEASURE = """
import json, sys
import lverse.core.images as images

def status(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

jpg = sys.stdin.buffer.read()
images.MAX_ASPECT = float(sys.argv[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak resident memory (VmHWM) starts again from what is resident now
before = status("VmRSS")
image = images.preprocess(jpg, 256)
print(json.dumps({"shape": image.shape, "dtype": str(image.dtype), "range": [float(image.min()), float(image.max())],
                  "grew_kib": status("VmHWM") - before}))
"""


def _peak_growth(jpg: bytes, max_aspect: float = MAX_ASPECT) -> dict:
    """preprocess ``jpg`` in a fresh process; what it returned and how far it raised the peak
    resident memory (KiB) above what was resident before the call."""
    out = subprocess.run([sys.executable, "-c", MEASURE, str(max_aspect)], input=jpg, capture_output=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize("width, height, fmt", [(65000, 1, "JPEG"), (1, 65000, "JPEG"), (65000, 1, "PNG"),
                                                (1, 65000, "PNG")])
def test_extreme_aspect_ratios_preprocess_in_bounded_memory(width, height, fmt):
    """Resizing the whole 65000x1 image would make a 16.6-million x 256 intermediate (17 GB in
    Pillow's 4 bytes a pixel); only the crop is resized: about 8 MB on top of what the process held,
    Pillow's plugins loaded on first use included."""
    got = _peak_growth(_image(width, height, fmt=fmt))
    assert (got["shape"], got["dtype"]) == ([3, 256, 256], "float32") and -1 <= got["range"][0] <= got["range"][1] <= 1
    assert got["grew_kib"] < 32 * 1024, f"preprocess raised the peak resident memory by {got['grew_kib']} KiB"


def test_the_memory_measure_sees_a_whole_image_resize():
    """The measure above would catch a return to resizing the whole image: with the bound lifted, a
    mere 600x1 image (a 153600 x 256 intermediate) already takes well over the 32 MiB allowed."""
    assert _peak_growth(_image(600, 1, fmt="PNG"), max_aspect=1e12)["grew_kib"] > 64 * 1024
