"""The paper's recipe: configs/paper_coco.yaml is accepted by train and its launcher, and `lverse coco`
turns a Karpathy split file and local images into the shards and files the recipe reads."""

import io
import json
import os

import pytest
from PIL import Image

from lverse.cli import main
from lverse.core.shards import iter_samples, read_stats
from lverse.pipeline.evaluate import load_references

REPO = os.path.join(os.path.dirname(__file__), "..")
CONFIG = os.path.join(REPO, "configs", "paper_coco.yaml")


def test_paper_config_is_the_papers_biart_and_is_accepted_by_train_and_slurm(tmp_path, monkeypatch, capsys):
    from lverse.core.config import load_config
    from lverse.model.biart import PRESETS
    from lverse.pipeline.configs import TrainConfig
    from lverse.pipeline.train import ds_config
    from lverse.runtime.trainer import Schedule
    cfg = load_config(CONFIG, TrainConfig)
    model = PRESETS[cfg.model.preset]
    assert (model.n_layer, model.n_embd, model.n_head) == (32, 1024, 16)
    assert cfg.optim.lr is None and cfg.optim.lr_per_sample == 4.5e-7  # the paper's rule, not a fixed lr
    assert (cfg.optim.schedule, cfg.optim.betas, cfg.optim.weight_decay) == ("plateau", [0.9, 0.95], 0.01)
    world = 32  # the GPUs the config's comment sizes it for
    ds = ds_config(cfg, world)
    assert ds["train_batch_size"] == 512
    assert cfg.optim.lr_per_sample * ds["train_batch_size"] == pytest.approx(2.304e-4)
    Schedule.of(cfg.optim, "optim.")
    monkeypatch.chdir(tmp_path)  # the script is kept under the config's run_dir
    assert main(["slurm", "submit", "train", "--config", CONFIG, "--nodes", "4", "--gpus-per-node", "8",
                 "--dry-run"]) == 0
    assert "configs/paper_coco.yaml" in capsys.readouterr().out


def _image(path, size, color):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _entry(cocoid, split, folder, captions):
    return {"filepath": folder, "filename": f"COCO_{folder}_{cocoid:012d}.jpg", "cocoid": cocoid, "split": split,
            "imgid": cocoid, "sentences": [{"raw": c, "sentid": cocoid * 10 + n, "tokens": c.lower().split()}
                                           for n, c in enumerate(captions)]}


@pytest.fixture
def karpathy(tmp_path):
    """A split file of 7 images in Karpathy's layout, their images on disk but one (missing) and one
    that is no image."""
    images = [_entry(1, "train", "train2014", ["A red bus on a street. ", "a bus\nthat is red"]),
              _entry(2, "train", "train2014", ["Two cats on a sofa."]),
              _entry(3, "restval", "val2014", ["A man rides a horse.", "a horse and its rider"]),
              _entry(4, "train", "train2014", ["missing on disk"]),
              _entry(5, "val", "val2014", ["A plate of food."]),
              _entry(6, "test", "val2014", ["A dog in the snow.", "a white dog", "snow and a dog"]),
              _entry(7, "test", "val2014", ["A kite in the sky."])]
    root = tmp_path / "coco"
    for n, im in enumerate(images):
        if im["cocoid"] != 4:
            _image(str(root / im["filepath"] / im["filename"]), (64 + 16 * n, 48), (40 * n, 100, 200))
    (root / "train2014" / images[1]["filename"]).write_bytes(b"<html>not a jpeg</html>")
    split_file = tmp_path / "dataset_coco.json"
    split_file.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return {"json": str(split_file), "root": str(root), "images": images}


def _samples(folder):
    shards = sorted(p for p in os.listdir(folder) if p.endswith(".tar"))
    return [s for shard in shards for s in iter_samples(os.path.join(folder, shard))]


def test_coco_writes_the_recipes_shards_references_and_prompts(karpathy, tmp_path, capsys):
    out = tmp_path / "data"
    args = ["coco", "--karpathy", karpathy["json"], "--images", karpathy["root"], "--output", str(out),
            "--image-size", "32", "--samples-per-shard", "2", "--t2i-images", "3"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    # train + restval: one sample per caption; image 2 does not decode and image 4 is missing
    train = _samples(out / "train")
    assert [s["__key__"] for s in train] == ["1_0", "1_1", "3_0", "3_1"]
    assert train[1]["txt"] == b"a bus that is red"  # one line, single spaces
    assert summary["failed_by_reason"] == {"decode_error": 1, "missing_file": 1}
    assert sum(read_stats(str(out / "train" / f"{n:05d}.tar"), "")["successes"] for n in range(3)) == 4
    with Image.open(io.BytesIO(train[2]["jpg"])) as im:
        assert min(im.size) == 32 and im.size[0] > im.size[1]  # shorter side to 32, aspect kept
    assert json.loads(train[0]["json"])["url"] == "train2014/COCO_train2014_000000000001.jpg"
    assert (out / "captions_train.txt").read_text().splitlines()[:2] == ["A red bus on a street.", "a bus that is red"]

    # the test split: one sample per image, keyed by COCO id as evaluate's references are
    test = _samples(out / "test")
    references = load_references(str(out / "references_test.json"))
    assert [s["__key__"] for s in test] == ["6", "7"] and sorted(references) == ["6", "7"]
    assert references["6"] == ["A dog in the snow.", "a white dog", "snow and a dog"]

    # Table 3: val2014 images only, the prompts in the shards' order
    t2i = _samples(out / "t2i")
    prompts = (out / "prompts_t2i.txt").read_text().splitlines()
    assert len(t2i) == 3 and {s["__key__"] for s in t2i} <= {"3", "5", "6", "7"}
    assert prompts == [s["txt"].decode() for s in t2i]

    # a rerun skips finished shards; a shard without its stats file is written again, byte for byte
    # (here by one of two worker processes)
    before = (out / "train" / "00001.tar").read_bytes()
    os.remove(out / "train" / "00001_stats.json")
    assert main([*args, "--workers", "2"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["skipped"] == again["shards"] - 1
    assert (out / "train" / "00001.tar").read_bytes() == before


def test_coco_refuses_a_wrong_image_folder_or_split_before_any_work(karpathy, tmp_path):
    base = ["coco", "--karpathy", karpathy["json"], "--output", str(tmp_path / "out")]
    assert main([*base, "--images", str(tmp_path)]) == 2
    assert main([*base, "--images", karpathy["root"], "--train-splits", "train,nosuch"]) == 2
    assert not os.path.exists(tmp_path / "out")


def test_coco_shards_are_what_encode_and_evaluate_read(karpathy, tmp_path):
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS
    from lverse.pipeline.evaluate import load_predictions
    out, vae = tmp_path / "data", str(tmp_path / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    assert main(["coco", "--karpathy", karpathy["json"], "--images", karpathy["root"], "--output", str(out),
                 "--image-size", "64", "--t2i-images", "0"]) == 0
    assert main(["encode", "--shards", str(out / "train"), "--vae", vae, "--output", str(tmp_path / "tokens")]) == 0
    assert [s["__key__"] for s in _samples(tmp_path / "tokens")] == ["1_0", "1_1", "3_0", "3_1"]
    # a caption stage's parquet keys are the test shards' keys: the ids evaluate matches with the references
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lverse.core.formats import mark_captions
    (tmp_path / "captions").mkdir()
    keys = [s["__key__"] for s in _samples(out / "test")]
    table = pa.table({"key": keys, "caption": ["a dog."] * 2, "caption_whole": ["a dog. more"] * 2})
    pq.write_table(mark_captions(table), tmp_path / "captions" / "00000.parquet")  # as lverse caption writes it
    assert set(load_predictions(str(tmp_path / "captions"))) == set(load_references(str(out / "references_test.json")))

