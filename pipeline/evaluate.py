"""`lverse evaluate`: caption metrics, reconstruction metrics, CLIP score of generations.

- **captions**: BLEU-1..4, METEOR, ROUGE-L, CIDEr with pycocoevalcap (its PTB tokenizer and METEOR
  run on Java). SPICE runs only when its Stanford CoreNLP jar is already in pycocoevalcap's
  ``spice/lib`` (pycocoevalcap would download it, and nothing is downloaded here); otherwise the
  result says so instead of a number. References come as COCO-format json (``images`` +
  ``annotations`` with ``image_id`` and ``caption``); predictions as COCO results json (a list of
  ``{"image_id", "caption"}``) or the caption stage's output folder (parquet ``key`` = image id).
- **reconstruction**: PSNR (dB, images in [0, 1]), SSIM (11x11 Gaussian window, sigma 1.5, the
  usual constants, mean over channels) and LPIPS (VGG; random features without a VGG checkpoint,
  for tests only) of AugVAE reconstructions (decode(encode(x))) of image shards.
- **generations**: the CLIP score of ``lverse generate`` output: 100 x the mean cosine similarity
  of each chosen image with its prompt (negative similarities clipped to 0), as text-to-image
  papers report it.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from lverse.core.errors import InputError

log = logging.getLogger(__name__)


# --- captions ----------------------------------------------------------------------------------

def load_references(path: str) -> dict[str, list[str]]:
    with open(path) as f:
        coco = json.load(f)
    if not isinstance(coco, dict) or "annotations" not in coco:
        raise InputError(f"{path} is not COCO-format caption json (a dict with 'annotations')")
    refs: dict[str, list[str]] = {}
    for ann in coco["annotations"]:
        refs.setdefault(str(ann["image_id"]), []).append(ann["caption"])
    return refs


def load_predictions(path: str) -> dict[str, str]:
    """COCO results json, or a folder of caption-stage parquet files."""
    if os.path.isdir(path):
        import pyarrow.parquet as pq
        preds = {}
        for f in sorted(glob.glob(os.path.join(path, "*.parquet"))):
            table = pq.read_table(f, columns=["key", "caption"]).to_pydict()
            preds.update({k: c for k, c in zip(table["key"], table["caption"]) if c is not None})
        if not preds:
            raise InputError(f"{path} holds no captions (*.parquet of `lverse caption`)")
        return preds
    with open(path) as f:
        results = json.load(f)
    if not isinstance(results, list):
        raise InputError(f"{path} is not COCO results json (a list of {{'image_id', 'caption'}})")
    return {str(r["image_id"]): r["caption"] for r in results}


def caption_metrics(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """pycocoevalcap's metrics over the images that have both a prediction and references."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    ids = sorted(set(predictions) & set(references))
    if not ids:
        raise InputError("no image has both a prediction and references: check that the ids match")
    missing = len(set(references) - set(predictions))
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[i]] for i in ids})
    res = tokenizer.tokenize({i: [{"caption": predictions[i]}] for i in ids})
    out = {"images": len(ids), "images_without_prediction": missing}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{n + 1}": float(b) for n, b in enumerate(bleu)})
    out["METEOR"] = float(Meteor().compute_score(gts, res)[0])
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    out["SPICE"] = _spice(gts, res)
    return out


def _spice(gts, res):
    import pycocoevalcap.spice.get_stanford_models as models
    jar = os.path.join(os.path.dirname(models.__file__), "lib", f"{models.JAR}.jar")
    if not os.path.exists(jar):
        return (f"not computed: SPICE needs Stanford CoreNLP ({models.JAR}.jar and -models.jar) in "
                f"{os.path.dirname(jar)}; pycocoevalcap downloads them with internet access")
    from pycocoevalcap.spice.spice import Spice
    return float(Spice().compute_score(gts, res)[0])


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
    from lverse.core.images import decodable_images
    from lverse.core.resources import resolve_device
    from lverse.model.cache import load_vae
    from lverse.model.losses import _build_lpips, psnr
    device = resolve_device(device)
    vae = load_vae(vae_path, device)
    lpips = _build_lpips(vgg_checkpoint).to(device)
    sums, n = {"PSNR": 0.0, "SSIM": 0.0, "LPIPS": 0.0}, 0
    for batch in _batches(itertools.islice(decodable_images(shards, vae.cfg.image_size), limit), batch_size):
        x = torch.from_numpy(np.stack([image for _, image in batch])).to(device)
        recon = vae.reconstruct(x, batch_size)
        a, b = (x + 1) / 2, (recon + 1) / 2
        sums["PSNR"] += float(psnr(a, b).sum())
        sums["SSIM"] += float(ssim(a, b).sum())
        sums["LPIPS"] += float(lpips(recon, x).sum())
        n += len(batch)
    if n == 0:
        raise InputError(f"no decodable image in {shards}")
    metrics = {"images": n, **{k: v / n for k, v in sums.items()}}
    if vgg_checkpoint is None:  # a random VGG's distance is no LPIPS: say so in the name
        metrics["LPIPS_random_vgg"] = metrics.pop("LPIPS")
    return metrics


def _batches(items, size: int):
    while batch := list(itertools.islice(items, size)):
        yield batch


# --- generations -------------------------------------------------------------------------------

def generation_clip_score(folder: str) -> dict:
    """From ``lverse generate``'s result.json files (the CLIP cosine of each chosen image)."""
    scores = []
    for path in sorted(glob.glob(os.path.join(folder, "*", "result.json"))):
        with open(path) as f:
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
