"""`lverse evaluate`: caption metrics, reconstruction metrics, CLIP score and FID of generations.

- **captions**: BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap (its PTB tokenizer and METEOR
  run on Java), each twice as the paper's Table 2 reports them: for the predictions truncated at
  their first full stop (``truncated/...``) and whole (``untruncated/...``). SPICE runs only when
  its Stanford CoreNLP jars are already in pycocoevalcap's ``spice/lib`` (pycocoevalcap would
  download them, and nothing is downloaded here); otherwise the result says so instead of a
  number. References come as COCO-format json (``images`` + ``annotations`` with ``image_id`` and
  ``caption``); predictions as COCO results json (a list of ``{"image_id", "caption"}``) or the
  caption stage's output folder (parquet ``key`` = image id).
- **reconstruction**: PSNR (dB, images in [0, 1]), SSIM (11x11 Gaussian window, sigma 1.5, the
  usual constants, mean over channels) and LPIPS (VGG; random features without a VGG checkpoint,
  for tests only) of AugVAE reconstructions (decode(encode(x))) of image shards.
- **generations**: the CLIP score of ``lverse generate`` output: 100 x the mean cosine similarity
  of each chosen image with its prompt (negative similarities clipped to 0), as text-to-image
  papers report it.
- **FID** (torch-fidelity's Inception-v3 features and distance, ``model/inception.py``, from a
  local weights file): of AugVAE reconstructions against their originals (Table 1), and of
  generated images against reference images at Gaussian blur radii (Table 3).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess

import numpy as np
import torch
import torch.nn.functional as F

from lverse.core import storage
from lverse.core.errors import InputError
from lverse.core.files import read_json
from lverse.core.formats import read_captions
from lverse.core.images import decodable_images
from lverse.core.resources import resolve_device
from lverse.core.shards import expand_shards, iter_samples, stats_path
from lverse.model.inception import frechet_distance, inception_features, load_inception, to_uint8
from lverse.model.losses import build_lpips, psnr
from lverse.preprocessing.text_tokenizer import truncate_caption
from lverse.runtime.model_cache import load_vae

# --- captions ----------------------------------------------------------------------------------

def load_references(path: str) -> dict[str, list[str]]:
    with storage.open(path, "r") as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "annotations" not in coco:
        raise InputError(f"{path} is not COCO-format caption json (a dict with 'annotations')")
    refs: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return refs


def load_predictions(path: str) -> dict[str, str]:
    """COCO results json, or a folder of caption-stage parquet files (their whole captions, which
    ``caption_metrics`` truncates for the truncated metrics)."""
    if storage.isdir(path):
        preds = {}
        for f in storage.glob(os.path.join(storage.escape(path), "*.parquet")):
            table = read_captions(f).select(["key", "caption_whole"]).to_pydict()
            preds.update({k: c for k, c in zip(table["key"], table["caption_whole"]) if c is not None})
        if not preds:
            raise InputError(f"{path} holds no captions (*.parquet of `lverse caption`)")
        return preds
    with storage.open(path, "r") as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise InputError(f"{path} is not COCO results json (a list of {{'image_id', 'caption'}})")
    return {str(r["image_id"]): r["caption"] for r in results}


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """pycocoevalcap's metrics over the images that have both a prediction and references, for the
    predictions truncated at their first full stop and untruncated, as the paper's Table 2 reports
    them: keys ``truncated/BLEU-4``, ``untruncated/BLEU-4``, ... (BLEU-1..4, METEOR, ROUGE-L,
    CIDEr, SPICE). SPICE is a number when its Stanford CoreNLP models are present, else a string
    saying what is missing. References are never truncated."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    ids = sorted(set(predictions) & set(references))
    if not ids:
        raise InputError("no image has both a prediction and references: check that the ids match")
    ways = {"truncated": {i: truncate_caption(predictions[i]) for i in ids}, "untruncated": predictions}
    # Each tokenizer call and each METEOR starts a Java process: one of each serves both ways.
    tokens = PTBTokenizer().tokenize({**{("references", i): [{"caption": c} for c in references[i]] for i in ids},
                                      **{(way, i): [{"caption": captions[i]}] for way, captions in ways.items()
                                         for i in ids}})
    gts = {i: tokens[("references", i)] for i in ids}
    out = {"images": len(ids), "images_without_prediction": len(set(references) - set(predictions)),
           "captions_truncated": sum(ways["truncated"][i] != predictions[i] for i in ids)}
    meteor = Meteor()
    for way in ways:
        res = {i: tokens[(way, i)] for i in ids}
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        out.update({f"{way}/BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
        out[f"{way}/METEOR"] = float(meteor.compute_score(gts, res)[0])
        out[f"{way}/ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
        out[f"{way}/CIDEr"] = float(Cider().compute_score(gts, res)[0])
        out[f"{way}/SPICE"] = _spice(gts, res)
    return out


def spice_missing() -> str | None:
    """Why SPICE cannot run here (its Stanford CoreNLP jars are not in pycocoevalcap's
    ``spice/lib``, and pycocoevalcap would download them), or None when it can."""
    import pycocoevalcap.spice.get_stanford_models as models
    lib = os.path.join(os.path.dirname(models.__file__), models.SPICELIB)
    missing = [name for name in (f"{models.JAR}.jar", f"{models.JAR}-models.jar")
               if not os.path.exists(os.path.join(lib, name))]
    if not missing:
        return None
    return (f"not computed: SPICE needs Stanford CoreNLP 3.6.0 ({' and '.join(missing)}) in {lib}, from "
            f"http://nlp.stanford.edu/software/{models.CORENLP}.zip; nothing is downloaded here")


def _spice(gts, res) -> float | str:
    reason = spice_missing()
    if reason:
        return reason
    from pycocoevalcap.spice.spice import Spice
    try:
        return float(Spice().compute_score(gts, res)[0])
    except subprocess.CalledProcessError as e:  # Java ran and failed (SPICE wants about 8 GB of heap)
        return f"not computed: SPICE's Java process failed ({e}); see its output above"


# --- reconstruction ----------------------------------------------------------------------------

def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per image, images in [0, 1] (Wang et al. 2004): (B,)."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    g = torch.exp(-((torch.arange(window, dtype=x.dtype) - window // 2) ** 2) / (2 * sigma ** 2))
    g = (g / g.sum()).to(x.device)
    kernel = (g[:, None] * g[None, :]).expand(x.shape[1], 1, window, window)
    blur = lambda t: F.conv2d(t, kernel, groups=x.shape[1])  # noqa: E731  (valid: no padding)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


@torch.no_grad()
def reconstruction_metrics(shards: str, vae_path: str, limit: int | None = None, batch_size: int = 16,
                           vgg_checkpoint: str | None = None, device: str = "auto") -> dict:
    device = resolve_device(device)
    lpips = build_lpips(vgg_checkpoint).to(device)
    sums, n = {"PSNR": 0.0, "SSIM": 0.0, "LPIPS": 0.0}, 0
    for x, recon in _reconstructions(shards, vae_path, limit, batch_size, device):
        a, b = (x + 1) / 2, (recon + 1) / 2
        sums["PSNR"] += float(psnr(a, b).sum())
        sums["SSIM"] += float(ssim(a, b).sum())
        sums["LPIPS"] += float(lpips(recon, x).sum())
        n += len(x)
    metrics = {"images": n, **{k: v / n for k, v in sums.items()}}
    if vgg_checkpoint is None:  # a random VGG's distance is no LPIPS: say so in the name
        metrics["LPIPS_random_vgg"] = metrics.pop("LPIPS")
    return metrics


def _reconstructions(shards: str, vae_path: str, limit: int | None, batch_size: int, device: str):
    """(images, AugVAE reconstructions) of the decodable images of ``shards``, batch by batch, in
    [-1, 1]: (B, 3, H, W) each. No decodable image is an InputError."""
    vae = load_vae(vae_path, device)
    n = 0
    for batch in _batches(itertools.islice(decodable_images(shards, vae.cfg.image_size), limit), batch_size):
        x = torch.from_numpy(np.stack([image for _, image in batch])).to(device)
        n += len(batch)
        yield x, vae.reconstruct(x, batch_size)
    if n == 0:
        raise InputError(f"no decodable image in {shards}")


def _batches(items, size: int):
    while batch := list(itertools.islice(items, size)):
        yield batch


# --- generations -------------------------------------------------------------------------------

def generation_clip_score(folder: str) -> dict:
    """From ``lverse generate``'s result.json files (the CLIP cosine of each chosen image)."""
    scores = []
    for path in storage.glob(os.path.join(storage.escape(folder), "*", "result.json")):
        with storage.open(path, "r") as f:
            score = json.load(f)["clip_score"]
        if score is None:
            raise InputError(f"{path} has no CLIP score (generated with --candidates 1)")
        scores.append(score)
    if not scores:
        raise InputError(f"{folder} holds no generations (*/result.json of `lverse generate`)")
    mean = sum(scores) / len(scores)
    return {"prompts": len(scores), "clip_cosine": mean,
            "clip_score": 100 * sum(max(s, 0.0) for s in scores) / len(scores),
            "clip_cosine_std": math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))}


# --- FID ---------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@torch.no_grad()
def reconstruction_fid(shards: str, vae_path: str, inception_weights: str | None, limit: int | None = None,
                       batch_size: int = 16, device: str = "auto") -> dict:
    """FID between the images of image shards and their AugVAE reconstructions (Table 1).

    Args:
        shards: image shards (a folder, glob or ``{00000..00009}`` range), centre-cropped to the
            AugVAE's image size as ``lverse encode`` crops them.
        vae_path: the AugVAE.
        inception_weights: the local Inception-v3 weights file (``model.inception``).
        limit: at most this many images.
    Returns:
        ``{"images": n, "FID": fid}``.
    """
    device = resolve_device(device)
    net = load_inception(inception_weights, device)
    real, recon = [], []
    for x, y in _reconstructions(shards, vae_path, limit, batch_size, device):
        real.append(inception_features(net, to_uint8(x)))
        recon.append(inception_features(net, to_uint8(y)))
    real, recon = torch.cat(real), torch.cat(recon)
    return {"images": len(real), "FID": frechet_distance(real, recon)}


@torch.no_grad()
def generation_fid(generations: str, reference: str, inception_weights: str | None,
                   blur_radii: tuple[float, ...] = (0,), limit: int | None = None, batch_size: int = 32,
                   device: str = "auto") -> dict:
    """FID of generated images against reference images, one per Gaussian blur radius (Table 3).

    At each radius both sets are blurred alike (Pillow's ``GaussianBlur(radius)``; 0 is no blur),
    the protocol of DM-GAN and DALL-E that the paper's Table 3 follows with radii 0, 1, 2, 4, 8.
    The sets must have one size and one resolution; ``limit`` takes the first N of each.

    Args:
        generations: ``lverse generate`` output (each prompt's ``best.png``) or a folder of images.
        reference: a folder of images of the generated resolution, or image shards (centre-cropped
            to the generated resolution, which must then be square).
        inception_weights: the local Inception-v3 weights file (``model.inception``).
        blur_radii: the radii, each >= 0.
    Returns:
        ``{"images": n, "FID-<radius>": fid, ...}``, e.g. ``FID-0``, ``FID-1``.
    """
    if not blur_radii or any(r < 0 for r in blur_radii):
        raise InputError(f"blur radii must be >= 0 (0: no blur), got {list(blur_radii)}")
    generated = image_files(generations)
    if not generated:
        raise InputError(f"{generations} holds no images (`lverse generate` output or {', '.join(IMAGE_EXTENSIONS)})")
    size = _image_size(generated[0])
    reference_files = image_files(reference) if storage.isdir(reference) else []
    if reference_files:  # the sets' sizes and the first resolutions are checked before any work
        n = _set_size(len(generated), len(reference_files), limit)
        next(_file_images(reference_files[:1], size, generated[0], "reference"))
        references = _file_images(reference_files[:n], size, generated[0], "reference")
    else:
        if size[0] != size[1]:
            raise InputError(f"{generated[0]} is {size[0]}x{size[1]}, and image shards are cropped square: give the "
                             f"reference images as a folder of {size[0]}x{size[1]} images")
        n = _set_size(len(generated), _count_shard_images(reference), limit)
        references = _shard_images(reference, size[0])
    device = resolve_device(device)
    net = load_inception(inception_weights, device)
    radii = tuple(dict.fromkeys(float(r) for r in blur_radii))
    fake = _blurred_features(net, _file_images(generated[:n], size, generated[0], "generated"), radii, batch_size)
    real = _blurred_features(net, itertools.islice(references, n), radii, batch_size)
    if len(real[radii[0]]) != n:
        raise InputError(f"only {len(real[radii[0]])} of the first {n} reference images in {reference} decode: "
                         "remove the broken ones, or pass a smaller --limit")
    return {"images": n, **{f"FID-{r:g}": frechet_distance(fake[r], real[r]) for r in radii}}


def image_files(folder: str) -> list[str]:
    """The images of a folder, sorted: of ``lverse generate`` output (``*/result.json``), each
    prompt's chosen ``best.png``; otherwise every image file under it."""
    if not storage.isdir(folder):
        raise InputError(f"{folder} is not a folder of images")
    results = storage.glob(os.path.join(storage.escape(folder), "*", "result.json"))
    if results:
        return [os.path.join(os.path.dirname(r), "best.png") for r in results]
    return [p for p in storage.files_under(folder)
            if p.lower().endswith(IMAGE_EXTENSIONS) and not os.path.basename(p).startswith(".")]


def _image_size(path: str) -> tuple[int, int]:
    from PIL import Image
    try:
        with storage.open(path) as f, Image.open(f) as im:
            return im.size
    except OSError as e:
        raise InputError(f"{path} is not a readable image: {e}") from e


def _set_size(generated: int, reference: int, limit: int | None) -> int:
    if limit is not None:
        if min(generated, reference) < limit:
            raise InputError(f"--limit {limit} takes {limit} images of each set, and there are {generated} generated "
                             f"and {reference} reference images: lower --limit or supply more images")
    elif generated != reference:
        raise InputError(f"there are {generated} generated and {reference} reference images: FID compares sets of "
                         f"one size (the paper: 30,000 each); supply as many of each, or pass --limit "
                         f"{min(generated, reference)} to use the first of both")
    n = generated if limit is None else limit
    if n < 2:
        raise InputError(f"FID needs at least 2 images a set, got {n}")
    return n


def _file_images(files: list[str], size: tuple[int, int], first: str, which: str):
    """The RGB images of ``files``, each checked to be ``size`` (that of the generated ``first``)."""
    from PIL import Image
    for path in files:
        try:
            with storage.open(path) as f, Image.open(f) as im:
                im = im.convert("RGB")
        except OSError as e:
            raise InputError(f"{path} is not a readable image: {e}") from e
        if im.size != size:
            w, h = size
            fix = (f"resize the reference images to {w}x{h} (shorter side to {min(size)}, then a centre crop), or "
                   "give image shards as --reference-images, which are cropped to the generated size"
                   if which == "reference" else "generate every image at one resolution")
            raise InputError(f"{which} image {path} is {im.width}x{im.height} but {first} is {w}x{h}: FID compares "
                             f"sets of one resolution; {fix}")
        yield im


def _count_shard_images(spec: str) -> int:
    """Images in image shards: from each shard's stats (``successes``, what download and coco
    write) without reading the shard, else by reading it (a tar made by hand)."""
    shards = expand_shards(spec)
    if not shards:
        raise InputError(f"{spec} holds no images and no image shards (*.tar): give a folder of images or shards")
    total = 0
    for shard in shards:
        stats = read_json(stats_path(shard)) if storage.isfile(stats_path(shard)) else {}
        if isinstance(stats.get("successes"), int):
            total += stats["successes"]
        else:
            total += sum(1 for sample in iter_samples(shard) if "jpg" in sample)
    return total


def _shard_images(spec: str, size: int):
    """The images of image shards, shorter side to ``size``, centre-cropped (``core.images``)."""
    from PIL import Image

    for _, image in decodable_images(spec, size):
        yield Image.fromarray(to_uint8(torch.from_numpy(image)).permute(1, 2, 0).numpy())


def _blurred_features(net, images, radii: tuple[float, ...], batch_size: int) -> dict[float, torch.Tensor]:
    """Inception features of PIL ``images`` blurred at each radius, each image decoded once: {radius: (N, 2048)}."""
    from PIL import ImageFilter

    features: dict[float, list[torch.Tensor]] = {r: [] for r in radii}
    for batch in _batches(iter(images), batch_size):
        for r in radii:
            blurred = [im.filter(ImageFilter.GaussianBlur(r)) if r else im for im in batch]
            x = torch.from_numpy(np.stack([np.asarray(im) for im in blurred])).permute(0, 3, 1, 2)  # (B, 3, H, W)
            features[r].append(inception_features(net, x))
    return {r: torch.cat(f) if f else torch.empty(0, 2048) for r, f in features.items()}
