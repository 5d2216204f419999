"""Random crops as token augmentation: ``lverse encode --crops K`` -> the token index -> one view a visit.

The data is real: raw shards of non-square JPEGs -> ``run_encode`` with a debug AugVAE, once with
K = 0 and once with K = 2 (two shards of six samples, four a batch, so a batch of two is in each).
"""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from lverse.cli import main
from lverse.core.errors import InputError
from lverse.core.shards import file_sha256, iter_samples
from lverse.model import AugVAE, save_model
from lverse.model.augvae import PRESETS
from lverse.pipeline.configs import MAX_CROPS, DataConfig, EncodeConfig, TrainConfig
from lverse.pipeline.encode import CROP_RATIO, ShardEncoder, crop_boxes, run_encode
from lverse.pipeline.train import data_loader, plan_run
from lverse.preprocessing.text_tokenizer import CaptionTokenizer
from lverse.runtime.data import GlobalBatches, GlobalOrder, TokenBatch, micro_batches, sample_seed, view_pick
from lverse.runtime.token_index import TokenIndex, open_samples
from lverse.runtime.token_index_build import build_index, ensure_index, index_folder
from lverse.runtime.trainer import Process

from .test_encode import make_shard

SIZES = [(96, 72), (72, 96), (80, 80)]  # landscape, portrait, square: the shorter side is each one's own
SHARDS, PER_SHARD, BATCH, K, SIDE = 2, 6, 4, 2, 64  # SIDE: debug-sl's input size and its codes a sample


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    os.makedirs(root / "raw")
    for s in range(SHARDS):
        make_shard(str(root / "raw" / f"{s:05d}.tar"), s, PER_SHARD, seed=s, side=96, sizes=SIZES, quality=95)
    torch.manual_seed(0)
    vae = str(root / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    for crops in (0, K):
        run_encode(EncodeConfig(shards=str(root / "raw"), vae=vae, output=str(root / f"tokens{crops}"),
                                batch_size=BATCH, crops=crops, workers=0))
    captions = [s["txt"].decode() for n in range(SHARDS) for s in iter_samples(str(root / "raw" / f"{n:05d}.tar"))]
    CaptionTokenizer.fit(captions * 4, str(root / "tok"), vocab_size=64, offset=512)
    return {"root": str(root), "raw": str(root / "raw"), "vae": vae, "tokens0": str(root / "tokens0"),
            "tokens": str(root / f"tokens{K}"), "tokenizer": str(root / "tok.model")}


def shard_paths(folder):
    return [os.path.join(folder, f"{s:05d}.tar") for s in range(SHARDS)]


def copy_tokens(folder, tmp_path, name="tokens"):
    """A copy of a token folder (mtimes kept, no index) that a test may change."""
    target = tmp_path / name
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("_index", ".*"))
    return str(target)


# --- the token shards -------------------------------------------------------------------------

def plain_shard(samples, vae_hash):
    """A token shard without crops, written out: per sample codes.npy, txt, json ({key, url, vae},
    sorted keys), every member with mtime 0 and mode 0644."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as out:
        for key, codes, txt, url in samples:
            npy = io.BytesIO()
            np.save(npy, codes)
            record = json.dumps({"key": key, "url": url, "vae": vae_hash}, sort_keys=True).encode()
            for name, data in ((f"{key}.codes.npy", npy.getvalue()), (f"{key}.txt", txt), (f"{key}.json", record)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                out.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_without_crops_a_shard_holds_codes_caption_and_json_only(encoded):
    """K = 0: the tar is byte for byte ``plain_shard`` of its codes (no model output is
    hard-coded: the codes are the shard's own, test_encode.py checks them against the model); and
    the centre codes of a K = 2 shard are those of the K = 0 one (crops do not disturb them)."""
    vae_hash = file_sha256(encoded["vae"])
    for raw, plain, cropped in zip(*(shard_paths(encoded[k]) for k in ("raw", "tokens0", "tokens"))):
        urls = {s["__key__"]: json.loads(s["json"])["url"] for s in iter_samples(raw)}
        samples = list(iter_samples(plain))
        assert [sorted(s) for s in samples] == [["__key__", "codes.npy", "json", "txt"]] * PER_SHARD
        expected = plain_shard([(s["__key__"], np.load(io.BytesIO(s["codes.npy"])), s["txt"], urls[s["__key__"]])
                                    for s in samples], vae_hash)
        with open(plain, "rb") as f:
            assert f.read() == expected
        assert [(s["__key__"], s["codes.npy"], s["txt"]) for s in iter_samples(cropped)] == \
            [(s["__key__"], s["codes.npy"], s["txt"]) for s in samples]
    with open(os.path.join(encoded["tokens0"], "00000_stats.json")) as f:
        assert json.load(f)["crops"] == 0


def view(jpg, box):
    """A region of a JPEG as the model takes it, written out: that box resized to SIDE x SIDE
    (bicubic), in [-1, 1]."""
    from PIL import Image
    with Image.open(io.BytesIO(jpg)) as im:
        pixels = np.asarray(im.convert("RGB").resize((SIDE, SIDE), Image.BICUBIC, box=tuple(box)), dtype=np.float32)
    return pixels.transpose(2, 0, 1) / 127.5 - 1.0


def test_crops_hold_the_codes_of_their_boxes(encoded):
    """Each crop's codes are those of its recorded box of the source image, resized and encoded
    (batched as the stage batches: BATCH samples' crops one after another, BATCH a forward pass;
    conv kernels round differently for other batch sizes); the boxes are squares of 0.75 of the
    shorter side inside the image; crops differ from the centre and from each other."""
    from PIL import Image
    vae = AugVAE.from_pretrained(encoded["vae"]).eval()
    for raw, tokens in zip(shard_paths(encoded["raw"])[1:], shard_paths(encoded["tokens"])[1:]):  # one: 2 cores
        jpgs = {s["__key__"]: s["jpg"] for s in iter_samples(raw)}
        samples = list(iter_samples(tokens))
        assert [sorted(s) for s in samples] == [["__key__", "codes.npy", "crops.npy", "json", "txt"]] * PER_SHARD
        boxes = [json.loads(s["json"])["crops"] for s in samples]
        for s, sample_boxes in zip(samples, boxes):
            width, height = Image.open(io.BytesIO(jpgs[s["__key__"]])).size
            side = int(CROP_RATIO * min(width, height))
            assert len(sample_boxes) == K and len({tuple(b) for b in sample_boxes}) == K
            for left, top, right, bottom in sample_boxes:
                assert (right - left, bottom - top) == (side, side)
                assert 0 <= left and right <= width and 0 <= top and bottom <= height
            assert sample_boxes == [list(b) for b in crop_boxes(s["__key__"], width, height, K)]
        expected = []
        for b in range(0, len(samples), BATCH):
            crops = torch.from_numpy(np.stack([view(jpgs[s["__key__"]], box) for s, sample_boxes in
                                               zip(samples[b:b + BATCH], boxes[b:b + BATCH]) for box in sample_boxes]))
            expected += [vae.encode(part).numpy() for part in crops.split(BATCH)]
        expected = np.concatenate(expected).reshape(len(samples), K, SIDE)
        for s, want in zip(samples, expected):
            crops, centre = np.load(io.BytesIO(s["crops.npy"])), np.load(io.BytesIO(s["codes.npy"]))
            assert crops.dtype == np.uint16 and crops.shape == (K, SIDE)
            assert np.array_equal(crops, want), s["__key__"]
            assert not np.array_equal(crops[0], crops[1])
            assert not any(np.array_equal(c, centre) for c in crops)


def test_crops_are_drawn_from_the_key_so_a_rerun_writes_the_same_bytes(encoded, tmp_path):
    assert crop_boxes("a", 96, 72, 3) == crop_boxes("a", 96, 72, 3) != crop_boxes("b", 96, 72, 3)
    assert crop_boxes("a", 96, 72, 3)[:2] == crop_boxes("a", 96, 72, 2)  # crop j depends on (j, key) only
    for width, height in ((1, 1), (1, 500), (257, 256), (4000, 3)):
        for left, top, right, bottom in crop_boxes("k", width, height, 8):
            assert 0 <= left < right <= width and 0 <= top < bottom <= height and right - left == bottom - top
    # the stage's task in this process (run_encode's worker would start torch again: seconds on 2 cores)
    task = ShardEncoder(encoded["vae"], file_sha256(encoded["vae"]), str(tmp_path), BATCH, crops=K)
    assert task(shard_paths(encoded["raw"])[0]).ok
    with open(tmp_path / "00000.tar", "rb") as a, open(shard_paths(encoded["tokens"])[0], "rb") as b:
        assert a.read() == b.read()


@pytest.mark.parametrize("crops", [-1, MAX_CROPS + 1, 1000])
def test_a_bad_crop_count_is_refused_saying_what_to_change(encoded, tmp_path, caplog, crops):
    with pytest.raises(InputError, match=f"crops must be between 0 and {MAX_CROPS}.*got {crops}"):
        EncodeConfig(shards=encoded["raw"], vae=encoded["vae"], output=str(tmp_path), crops=crops)
    assert main(["encode", "--shards", encoded["raw"], "--vae", encoded["vae"], "--output", str(tmp_path / "t"),
                 "--crops", str(crops)]) == 2
    assert f"crops must be between 0 and {MAX_CROPS}" in caplog.text
    assert not os.path.exists(tmp_path / "t")


def test_a_folder_of_another_crop_count_is_refused(encoded):
    """A rerun with another --crops would leave a folder of two kinds of shards (the index holds one)."""
    with pytest.raises(InputError, match=r"encoded with --crops 0, this run asks for --crops 2: finish the folder "
                                         r"with --crops 0, or encode into a new --output folder"):
        run_encode(EncodeConfig(shards=encoded["raw"], vae=encoded["vae"], output=encoded["tokens0"], crops=K,
                                workers=0))


# --- the index --------------------------------------------------------------------------------

def test_the_index_carries_the_crops_and_their_boxes(encoded, tmp_path):
    tokens = copy_tokens(encoded["tokens"], tmp_path)
    summary = build_index(tokens, progress=False, workers=2)
    index = TokenIndex(os.path.join(tokens, "_index"))
    n = SHARDS * PER_SHARD
    assert summary["crops"] == index.crops == index.meta["crops"] == K and len(index) == n
    assert os.path.getsize(os.path.join(tokens, "_index", "crops.u16")) == 2 * n * K * SIDE
    assert os.path.getsize(os.path.join(tokens, "_index", "crop_boxes.i32")) == 4 * n * K * 4
    rows = [s for shard in shard_paths(tokens) for s in iter_samples(shard)]
    for row, sample in enumerate(rows):
        got = index.sample(row)
        assert got["__key__"] == sample["__key__"]
        assert np.array_equal(got["codes"], np.load(io.BytesIO(sample["codes.npy"])))
        assert np.array_equal(got["crops"], np.load(io.BytesIO(sample["crops.npy"])))
        assert got["crop_boxes"].tolist() == json.loads(sample["json"])["crops"]
    samples = open_samples(shard_paths(tokens), file_sha256(encoded["vae"]))
    assert samples.views == K + 1
    views = [row % (K + 1) for row in range(n)]
    for got, sample, v in zip(samples.take(range(n), views), rows, views):
        want = np.load(io.BytesIO(sample["codes.npy"])) if v == 0 else np.load(io.BytesIO(sample["crops.npy"]))[v - 1]
        assert got["view"] == v and np.array_equal(got["codes"], want)
    assert samples.keys([3, 0]) == [rows[3]["__key__"], rows[0]["__key__"]]
    with pytest.raises(IndexError):
        samples.take([0], [K + 1])
    assert open_samples(shard_paths(tokens), None, crops=False).views == 1  # the centre crop only
    assert index_folder(tokens, progress=False)["up_to_date"] is True


def tokens_without_format(encoded, tmp_path) -> str:
    """A copy of the K=0 token folder whose stats hold neither ``format`` nor ``crops``: token
    shards of no format this lverse reads."""
    old = copy_tokens(encoded["tokens0"], tmp_path, "old")
    for shard in shard_paths(old):
        path = shard.removesuffix(".tar") + "_stats.json"
        stats = json.load(open(path))
        del stats["format"], stats["crops"]
        json.dump(stats, open(path, "w"))
    return old


NO_FORMAT = r"records no format version; this lverse reads format 1 only: encode its image shards again with " \
    r"`lverse encode` into a new --output folder"


def test_a_folder_without_a_format_or_one_crop_count_is_not_indexed(encoded, tmp_path):
    """Shards whose stats record no format cannot be indexed, with the command that rewrites them.
    The index holds one K: a folder of two crop counts is refused, and so is a shard whose stats
    file records none (every stats file `lverse encode` writes records its crops)."""
    with pytest.raises(InputError, match=NO_FORMAT):
        build_index(tokens_without_format(encoded, tmp_path), progress=False)
    tokens = copy_tokens(encoded["tokens"], tmp_path)
    shutil.copy(os.path.join(encoded["tokens0"], "00000.tar"), os.path.join(tokens, "00007.tar"))
    shutil.copy(os.path.join(encoded["tokens0"], "00000_stats.json"), os.path.join(tokens, "00007_stats.json"))
    with pytest.raises(InputError, match=r"2 crop counts \(0 in 00007, 2 in 00000\): one folder, one `lverse encode"):
        build_index(tokens, progress=False)
    path = os.path.join(tokens, "00007_stats.json")
    stats = json.load(open(path))
    del stats["crops"]
    json.dump(stats, open(path, "w"))
    with pytest.raises(InputError, match=r"the stats file of shard 00007 of .* records no crops, which `lverse enc"):
        build_index(tokens, progress=False)
    assert not os.path.exists(os.path.join(tokens, "_index"))


# --- training's views -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crop_samples(encoded):
    return ensure_index(shard_paths(encoded["tokens"]), file_sha256(encoded["vae"]))


def views_of(samples, seeds):
    return {"keys": [s["__key__"] for s in samples], "views": [s["view"] for s in samples],
            "codes": torch.from_numpy(np.stack([s["codes"] for s in samples]))}


def visits(samples, world, workers, steps, start=0, chunk=1):
    """(key, view, codes) of global positions ``start`` .. ``start + 8 * steps`` as ``world`` ranks
    with W*B = 8 read them, rank 0's slice of each micro-step first."""
    per_rank = []
    for rank in range(world):
        ds = GlobalBatches(samples, GlobalOrder(len(samples), 0), views_of, 8 // world, rank, world, workers, start,
                           chunk)
        it = micro_batches(iter(torch.utils.data.DataLoader(ds, batch_size=None, num_workers=workers)), 8 // world)
        per_rank.append([next(it) for _ in range(steps)])
    return [(key, view, tuple(codes.tolist())) for g in range(steps) for rank in range(world)
            for key, view, codes in zip(per_rank[rank][g]["keys"], per_rank[rank][g]["views"],
                                        per_rank[rank][g]["codes"])]


def test_the_view_of_a_visit_is_a_function_of_seed_epoch_and_key(crop_samples):
    """The same views on 1, 2 and 4 ranks, with DataLoader workers or without, and after a resume
    at any position; each the one ``view_pick`` draws from (seed, epoch, key), read as that view."""
    n, steps = len(crop_samples), 6  # 48 positions: four epochs of 12
    reference = visits(crop_samples, 1, 0, steps)
    for world, workers, chunk in ((2, 2, 1), (4, 1, 2), (2, 0, 3)):
        assert visits(crop_samples, world, workers, steps, chunk=chunk) == reference, (world, workers)
    assert visits(crop_samples, 2, 1, 3, start=24) == reference[24:]  # resumed at sample 24 on 2 ranks
    rows = {crop_samples[i]["__key__"]: crop_samples.index.sample(crop_samples.row(i)) for i in range(n)}
    for p, (key, v, codes) in enumerate(reference):
        assert v == view_pick(sample_seed(0, p // n, key), K + 1)
        want = rows[key]["codes"] if v == 0 else rows[key]["crops"][v - 1]
        assert codes == tuple(want.tolist())
    assert {v for _, v, _ in reference} == set(range(K + 1))
    by_key = {}
    for key, v, _ in reference:
        by_key.setdefault(key, set()).add(v)
    assert any(len(vs) > 1 for vs in by_key.values()), "a sample is read in other views in other epochs"


class KeyedTokenBatch(TokenBatch):
    """TokenBatch that also says which samples it made the batch of."""

    def __call__(self, samples, seeds):
        return {**super().__call__(samples, seeds), "keys": [s["__key__"] for s in samples]}


def loader_images(encoded, tokens, steps, monkeypatch):
    """key -> the image ids of each time training's data_loader (1 rank, no workers) gave it."""
    import lverse.pipeline.train
    monkeypatch.setattr(lverse.pipeline.train, "TokenBatch", KeyedTokenBatch)  # what data_loader makes batches with
    cfg = TrainConfig(micro_batch_size=4, deepspeed="zero2_fp32",
                      data=DataConfig(shards=tokens, tokenizer=encoded["tokenizer"], vae=encoded["vae"], workers=0))
    cfg.model.overrides = {"text_len": 24}
    run = plan_run(cfg, Process(0, 1, 0, torch.device("cpu")))
    loader = data_loader(run, ensure_index(run.shards, run.provenance["vae_sha256"]), 0, None)
    seen = {}
    for _ in range(steps):
        batch = next(loader)
        for key, image in zip(batch["keys"], batch["image"]):
            seen.setdefault(key, []).append(image.numpy())
    return seen


def test_training_reads_crops_and_refuses_shards_without_a_format(encoded, tmp_path, monkeypatch):
    """Through pipeline/train.py's data_loader: shards with crops give each sample's views (all of
    them over a few epochs), shards without give the centre crops; shards whose stats record no
    format are refused before any work."""
    with pytest.raises(InputError, match=NO_FORMAT):
        loader_images(encoded, tokens_without_format(encoded, tmp_path), 1, monkeypatch)
    plain = copy_tokens(encoded["tokens0"], tmp_path, "plain")
    centre = {s["__key__"]: np.load(io.BytesIO(s["codes.npy"])) for p in shard_paths(plain) for s in iter_samples(p)}
    for key, images in loader_images(encoded, plain, 6, monkeypatch).items():
        assert all(np.array_equal(image, centre[key]) for image in images)

    tokens = copy_tokens(encoded["tokens"], tmp_path)
    views = {s["__key__"]: [np.load(io.BytesIO(s["codes.npy"])), *np.load(io.BytesIO(s["crops.npy"]))]
             for p in shard_paths(tokens) for s in iter_samples(p)}
    used = set()
    for key, images in loader_images(encoded, tokens, 12, monkeypatch).items():  # four epochs
        for image in images:
            found = [v for v, codes in enumerate(views[key]) if np.array_equal(image, codes)]
            assert found, key
            used.add(found[0])
    assert used == set(range(K + 1))


@pytest.mark.slow
def test_a_run_on_shards_with_crops_trains(encoded, tmp_path):
    """One rank, two steps of real training (the lverse train command) on shards with crops."""
    from .test_train import train_config
    data = {"tokens": encoded["tokens"], "tokenizer": encoded["tokenizer"], "vae": encoded["vae"]}
    cfg = train_config(tmp_path / "run.yaml", data, tmp_path / "run", steps=2, export=False)
    proc = subprocess.run([sys.executable, "-m", "lverse.cli", "train", "--config", cfg], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.load(open(tmp_path / "run" / "checkpoints" / "step_00000002" / "lverse.json"))["step"] == 2
