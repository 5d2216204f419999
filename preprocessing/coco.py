"""MS-COCO with Karpathy's splits -> image shards and the files the paper's evaluation reads.

``lverse coco --karpathy dataset_coco.json --images COCO --output data/coco`` reads Karpathy's
split file (``images``: each with ``filepath`` such as ``val2014``, ``filename``, ``cocoid``,
``split`` in train / restval / val / test, and ``sentences`` with their ``raw`` captions) and the
COCO images on local disk (``COCO/train2014/``, ``COCO/val2014/``), and writes:

    train/NNNNN.tar        one sample per caption of the training splits (train and restval: the
                           usual 113,287 images), key ``{cocoid}_{n}``: BiART's data, via encode
    test/NNNNN.tar         one sample per image of the evaluation split (test: 5,000), key
                           ``{cocoid}`` (its first caption as .txt): what Table 2 captions
    t2i/NNNNN.tar          up to ``t2i_images`` val2014 images, one caption each drawn with
                           ``seed``: Table 3's reference images (DM-GAN's protocol: 30,000)
    captions_train.txt     the training captions, one a line: ``lverse tokenizer --captions``
    references_test.json   COCO-format references of the evaluation split, every caption:
                           ``lverse evaluate captions --references``
    prompts_t2i.txt        the t2i captions, one a line, in the t2i shards' order:
                           ``lverse generate --prompts``
    _summary.json

Images are stored as ``lverse download`` stores them (img2dataset's ``keep_ratio``): the shorter
side resized to ``image_size``, the aspect kept, JPEG; encode and evaluate crop the centre. A shard
is img2dataset's layout (``{key}.jpg``, ``.txt``, ``.json``; no parquet), written under a temporary
name, then ``NNNNN_stats.json`` last: a rerun skips finished shards. A missing or unreadable image
is counted by reason in its shard's stats and left out, never fails the shard.

``lverse download`` refuses ``file://`` URLs (docs/paper.md), so local images come in here.
"""

from __future__ import annotations

import io
import json
import os
import random
import tarfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from lverse.core.errors import InputError
from lverse.core.files import atomic_output, atomic_write_json, read_json


@dataclass(frozen=True)
class CocoConfig:
    karpathy: str  # Karpathy's split file for COCO (dataset_coco.json)
    images: str  # the COCO image folder holding train2014/ and val2014/
    output: str  # folder for the shards and files this command writes
    train_splits: str = "train,restval"  # Karpathy splits BiART trains on, comma-separated
    eval_split: str = "test"  # the Karpathy split captioned for Table 2
    t2i_images: int = 30000  # val2014 images whose captions are Table 3's prompts (0: none)
    samples_per_shard: int = 10000  # samples a shard
    image_size: int = 256  # shorter side of the stored images, aspect kept (as download's keep_ratio)
    quality: int = 95  # JPEG quality of the stored images (img2dataset's default)
    workers: int = 1  # processes writing shards, one shard each at a time
    seed: int = 0  # which val2014 images and which of their captions the t2i set takes

    def __post_init__(self):
        if self.samples_per_shard < 1 or self.image_size < 1 or self.workers < 1 or self.t2i_images < 0:
            raise InputError("samples_per_shard, image_size and workers must be at least 1, t2i_images at least 0")
        if not 1 <= self.quality <= 100:
            raise InputError(f"quality must be 1 to 100, got {self.quality}")


def _caption(raw: str) -> str:
    return " ".join(raw.split())  # one line, single spaces: the files hold one caption a line


def load_karpathy(path: str) -> list[dict]:
    """The images of Karpathy's split file, each checked for the fields used here."""
    try:
        with open(path) as f:
            data = json.load(f)
    except ValueError as e:
        raise InputError(f"{path} is not JSON: {e}") from None
    images = data.get("images") if isinstance(data, dict) else None
    if not isinstance(images, list) or not images:
        raise InputError(f"{path} is not Karpathy's split file (a dict whose 'images' is a non-empty list)")
    for n, image in enumerate(images):
        missing = [k for k in ("filepath", "filename", "cocoid", "split", "sentences") if k not in image]
        if missing or not all(isinstance(s, dict) and "raw" in s for s in image.get("sentences", [])):
            raise InputError(f"{path}: image {n} lacks {missing or ['sentences[].raw']}")
    return images


def plan(cfg: CocoConfig, images: list[dict]) -> dict[str, list[tuple]]:
    """Each set's samples as (key, image path relative to ``cfg.images``, caption), in order."""
    train = set(cfg.train_splits.split(","))
    known = {image["split"] for image in images}
    unknown = sorted((train | {cfg.eval_split}) - known)
    if unknown:
        raise InputError(f"splits {unknown} are not in the split file, which has {sorted(known)}")
    rel = lambda image: f"{image['filepath']}/{image['filename']}"  # noqa: E731
    sets = {"train": [(f"{im['cocoid']}_{n}", rel(im), _caption(s["raw"]))
                      for im in images if im["split"] in train for n, s in enumerate(im["sentences"])],
            "test": [(str(im["cocoid"]), rel(im), _caption(im["sentences"][0]["raw"]))
                     for im in images if im["split"] == cfg.eval_split and im["sentences"]]}
    rng = random.Random(cfg.seed)
    val2014 = [im for im in images if im["filepath"] == "val2014" and im["sentences"]]
    chosen = sorted(rng.sample(range(len(val2014)), min(cfg.t2i_images, len(val2014))))
    sets["t2i"] = [(str(val2014[i]["cocoid"]), rel(val2014[i]), _caption(rng.choice(val2014[i]["sentences"])["raw"]))
                   for i in chosen]
    return sets


def prepare_coco(cfg: CocoConfig) -> dict:
    """Write the shards and files of the module docstring; returns the summary (also written)."""
    start = time.time()
    images = load_karpathy(cfg.karpathy)
    first = os.path.join(cfg.images, images[0]["filepath"], images[0]["filename"])
    if not os.path.isfile(first):
        raise InputError(f"{first} does not exist: --images must be the COCO folder that holds "
                         f"{images[0]['filepath']}/ (as Karpathy's filepath names it)")
    sets = plan(cfg, images)
    os.makedirs(cfg.output, exist_ok=True)
    _write_lines(os.path.join(cfg.output, "captions_train.txt"), [c for _, _, c in sets["train"]])
    _write_lines(os.path.join(cfg.output, "prompts_t2i.txt"), [c for _, _, c in sets["t2i"]])
    atomic_write_json(os.path.join(cfg.output, f"references_{cfg.eval_split}.json"),
                      references(images, cfg.eval_split))
    jobs = [(os.path.join(cfg.output, name, f"{i // cfg.samples_per_shard:05d}.tar"),
             samples[i:i + cfg.samples_per_shard], cfg)
            for name, samples in sets.items() for i in range(0, len(samples), cfg.samples_per_shard)]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            stats = list(pool.map(write_shard, jobs))
    else:
        stats = [write_shard(job) for job in jobs]
    failed = sum((Counter(s["failed_by_reason"]) for s in stats), Counter())
    summary = {"stage": "coco", "shards": len(jobs), "skipped": sum(s.get("skipped", False) for s in stats),
               "samples": {name: len(samples) for name, samples in sets.items()},
               "written": sum(s["successes"] for s in stats), "failed_by_reason": dict(failed),
               "seconds": round(time.time() - start, 1)}
    atomic_write_json(os.path.join(cfg.output, "_summary.json"), summary)
    return summary


def references(images: list[dict], split: str) -> dict:
    """COCO-format captions (``images``, ``annotations``) of one Karpathy split, every caption."""
    chosen = [im for im in images if im["split"] == split]
    annotations = [{"image_id": im["cocoid"], "id": s.get("sentid", f"{im['cocoid']}_{n}"), "caption": s["raw"].strip()}
                   for im in chosen for n, s in enumerate(im["sentences"])]
    return {"images": [{"id": im["cocoid"], "file_name": im["filename"]} for im in chosen],
            "annotations": annotations}


def write_shard(job: tuple[str, list[tuple], CocoConfig]) -> dict:
    """One shard of (key, image path, caption) samples; skipped when its stats file exists."""
    path, samples, cfg = job
    done = path.removesuffix(".tar") + "_stats.json"
    if os.path.exists(done):
        return {**read_json(done), "skipped": True}
    failed, written, last = Counter(), 0, (None, b"")
    with atomic_output(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key, rel, caption in samples:
            if rel != last[0]:  # a training image's captions follow one another: one resize serves them all
                last = (rel, _jpeg(os.path.join(cfg.images, rel), cfg.image_size, cfg.quality))
            if isinstance(last[1], str):
                failed[last[1]] += 1
                continue
            meta = {"key": key, "url": rel, "caption": caption, "status": "success"}
            for ext, data in (("jpg", last[1]), ("txt", caption.encode()), ("json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime = len(data), 0  # bytes depend only on the input
                tar.addfile(info, io.BytesIO(data))
            written += 1
    stats = {"count": len(samples), "successes": written, "failed_to_download": failed["missing_file"],
             "failed_to_resize": failed["decode_error"], "failed_by_reason": dict(failed),
             "status_dict": {"success": written, **failed}}
    atomic_write_json(done, stats)
    return stats


def _jpeg(path: str, size: int, quality: int) -> bytes | str:
    """The image at ``path``, shorter side to ``size`` (aspect kept), as JPEG; or why not."""
    from PIL import Image
    if not os.path.isfile(path):
        return "missing_file"
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
            out = io.BytesIO()
            im.save(out, "JPEG", quality=quality)
            return out.getvalue()
    except (OSError, ValueError, Image.DecompressionBombError):
        return "decode_error"


def _write_lines(path: str, lines: list[str]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.writelines(line + "\n" for line in lines)
