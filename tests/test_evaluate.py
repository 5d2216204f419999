"""Evaluation: caption metrics against values worked out by hand, truncated and untruncated;
reconstruction metrics on known inputs and against independent computations; CLIP scores.
FID: tests/test_fid.py."""

import json
import math

import numpy as np
import pytest
import scipy.ndimage
import torch

from lverse.model.losses import psnr
from lverse.pipeline.evaluate import (
    caption_metrics,
    generation_clip_score,
    load_predictions,
    load_references,
    spice_missing,
    ssim,
    truncate_caption,
)


@pytest.mark.slow
def test_bleu_and_rouge_l_match_values_worked_out_by_hand(tmp_path):
    """Prediction "a red circle on blue" (5 tokens) against "a red circle on a blue background" (7):
    n-gram precisions 5/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 7/5). ROUGE-L: LCS 5, precision
    5/5, recall 5/7, F with beta 1.2 = (1 + 1.44) P R / (R + 1.44 P)."""
    refs = tmp_path / "refs.json"
    refs.write_text(json.dumps({"images": [{"id": 1}], "annotations": [
        {"image_id": 1, "id": 10, "caption": "A red circle on a blue background."}]}))
    preds = tmp_path / "preds.json"
    preds.write_text(json.dumps([{"image_id": 1, "caption": "a red circle on blue"}]))
    m = caption_metrics(load_predictions(str(preds)), load_references(str(refs)))
    bp = math.exp(1 - 7 / 5)
    precisions = [1.0, 3 / 4, 2 / 3, 1 / 2]
    p, r = 1.0, 5 / 7
    for way in ("truncated", "untruncated"):  # no full stop: truncation changes nothing
        for n in range(1, 5):
            expected = bp * math.prod(precisions[:n]) ** (1 / n)
            assert m[f"{way}/BLEU-{n}"] == pytest.approx(expected, rel=1e-6), (way, n)
        assert m[f"{way}/ROUGE-L"] == pytest.approx(2.44 * p * r / (r + 1.44 * p), rel=1e-6)
        assert 0 < m[f"{way}/METEOR"] <= 1
        spice = m[f"{way}/SPICE"]  # a number, or why not (no Stanford models offline)
        assert isinstance(spice, float) or spice.startswith("not computed: SPICE needs Stanford CoreNLP")
    assert m["images"] == 1 and m["captions_truncated"] == 0


def test_a_perfect_caption_scores_one_truncated_and_less_with_its_second_sentence():
    refs = {"1": ["a red circle at the top"], "2": ["a blue square at the left"]}
    m = caption_metrics({"1": "a red circle at the top. it is on a white background.",
                         "2": "a blue square at the left"}, refs)
    assert m["truncated/BLEU-4"] == pytest.approx(1.0, rel=1e-6) and m["truncated/ROUGE-L"] == pytest.approx(1.0)
    assert m["untruncated/BLEU-4"] < 0.9 and m["untruncated/ROUGE-L"] < 0.9
    assert m["captions_truncated"] == 1 and "BLEU-4" not in m  # every number says which captions it scored
    with pytest.raises(ValueError, match="ids match"):
        caption_metrics({"7": "x"}, refs)


def test_caption_output_is_read_whole(tmp_path):
    """The caption stage's parquet: ``caption_whole`` is what evaluate scores (it truncates for
    itself). One of another format: tests/test_caption.py."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lverse.core.formats import mark_captions
    pq.write_table(mark_captions(pa.table({"key": ["1", "2"], "caption": ["a dog.", None],
                                           "caption_whole": ["a dog. on grass", None]})), tmp_path / "00000.parquet")
    assert load_predictions(str(tmp_path)) == {"1": "a dog. on grass"}


def test_truncation_at_the_first_full_stop():
    assert truncate_caption("a man rides a horse. the sky is blue.") == "a man rides a horse."
    assert truncate_caption("a 3.5 m boat on a lake. it is red") == "a 3.5 m boat on a lake."
    assert truncate_caption("no full stop at all") == "no full stop at all"
    assert truncate_caption(". a leading stop. then more") == ". a leading stop."
    assert truncate_caption("ends here.") == "ends here."


def test_spice_says_which_models_are_missing(monkeypatch):
    import pycocoevalcap.spice.get_stanford_models as models
    monkeypatch.setattr(models, "SPICELIB", "no-such-lib")
    reason = spice_missing()
    assert "stanford-corenlp-3.6.0.jar and stanford-corenlp-3.6.0-models.jar" in reason
    assert "no-such-lib" in reason and "nothing is downloaded" in reason


def ssim_by_scipy(x: np.ndarray, y: np.ndarray) -> float:
    """SSIM (Wang et al. 2004) of two (C, H, W) images in [0, 1] by another route: scipy's Gaussian
    filter (sigma 1.5, truncated at 3.5 sigma: the same 11 taps), then the 5-pixel border, where
    the window leaves the image, cut off."""
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    blur = lambda t: scipy.ndimage.gaussian_filter(t, sigma=(0, 1.5, 1.5), truncate=3.5)[:, 5:-5, 5:-5]  # noqa: E731
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


def test_psnr_and_ssim_on_known_inputs():
    """Identical images: PSNR at its cap (the mean squared error is floored at 1e-12: 120 dB) and
    SSIM 1 (LPIPS 0: test_reconstruction_metrics_of_the_augvae). A constant offset of d/255 gives
    exactly 20 log10(255 / d) dB; SSIM equals scipy's route on noisy images, and on flat images
    its luminance term worked out by hand."""
    u = torch.randint(0, 236, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    x = u / 255
    assert torch.equal(psnr(x, x), torch.full((2,), 120.0))
    assert torch.allclose(ssim(x, x), torch.ones(2))
    d = torch.tensor([5.0, 20.0]).view(2, 1, 1, 1)  # levels per image, kept within [0, 255]
    expected = [20 * math.log10(255 / 5), 20 * math.log10(255 / 20)]  # 34.15 and 22.11 dB
    assert psnr(x, (u + d) / 255).tolist() == pytest.approx(expected, abs=1e-4)
    y = torch.full((1, 3, 8, 8), 0.5)
    assert psnr(y, y + 0.1).item() == pytest.approx(20.0, rel=1e-4)  # 10 log10(1 / 0.01)

    noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    got = ssim(x.double(), noisy.double())
    assert got.tolist() == pytest.approx([ssim_by_scipy(a.numpy(), b.numpy()) for a, b in zip(x, noisy)], rel=1e-9)
    assert (got < 0.95).all()  # measured: 0.93 and 0.94
    flat = torch.full((1, 3, 16, 16), 0.5, dtype=torch.float64)  # no variance: only luminance counts
    c1 = 0.01 ** 2
    assert ssim(flat, flat + 0.1).item() == pytest.approx((2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1), rel=1e-9)


def test_generation_clip_score(tmp_path):
    for i, score in enumerate([0.3, -0.1]):
        (tmp_path / f"{i:05d}").mkdir()
        (tmp_path / f"{i:05d}" / "result.json").write_text(json.dumps({"prompt": "p", "clip_score": score}))
    m = generation_clip_score(str(tmp_path))
    assert m["prompts"] == 2 and m["clip_score"] == pytest.approx(15.0) and m["clip_cosine"] == pytest.approx(0.1)


@pytest.mark.slow
def test_reconstruction_metrics_of_the_augvae(data):
    """The means over images (5, in batches of 3 and 2: no mean of batch means) of each image's
    PSNR by numpy, SSIM by scipy's route (in float64: the metric's float32 is within 1e-5) and the
    distance of an LPIPS built alike, of the AugVAE's reconstructions. That LPIPS (random VGG
    features) is 0 for identical images and above 0 for every reconstruction."""
    import lpips

    from lverse.core.images import decodable_images
    from lverse.model import AugVAE
    from lverse.pipeline.evaluate import reconstruction_metrics
    torch.manual_seed(7)  # the random VGG of LPIPS without a checkpoint
    m = reconstruction_metrics(data["raw"], data["vae"], limit=5, batch_size=3, device="cpu")
    vae = AugVAE.load(data["vae"]).eval()
    x = torch.from_numpy(np.stack([image for _, image in decodable_images(data["raw"], vae.cfg.image_size)][:5]))
    torch.manual_seed(7)
    distance = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        recon = vae.reconstruct(x, 3)
        lpips_values = distance(recon, x).flatten()
        assert torch.equal(distance(x, x).flatten(), torch.zeros(5)) and (lpips_values > 0).all()
    a, b = ((x + 1) / 2).double().numpy(), ((recon + 1) / 2).double().numpy()
    psnrs = [10 * math.log10(1 / ((i - j) ** 2).mean()) for i, j in zip(a, b)]
    ssims = [ssim_by_scipy(i, j) for i, j in zip(a, b)]
    assert set(m) == {"images", "PSNR", "SSIM", "LPIPS_random_vgg"} and m["images"] == 5
    assert m["PSNR"] == pytest.approx(np.mean(psnrs), rel=1e-5)
    assert m["SSIM"] == pytest.approx(np.mean(ssims), abs=1e-5)
    assert m["LPIPS_random_vgg"] == pytest.approx(lpips_values.mean().item(), rel=1e-5)
    assert m["SSIM"] < 0.99  # a random AugVAE: no copy of its input


def test_reference_shards_are_counted_from_their_stats_without_reading_them(tmp_path):
    import shutil

    from lverse.pipeline.evaluate import _count_shard_images

    from .test_encode import make_shard
    make_shard(str(tmp_path / "00000.tar"), 0, 5, seed=1)
    make_shard(str(tmp_path / "00001.tar"), 1, 3, seed=2)
    assert _count_shard_images(str(tmp_path)) == 8  # no stats: read
    with open(tmp_path / "00000_stats.json", "w") as f:
        json.dump({"successes": 5}, f)
    shutil.copy(tmp_path / "00001.tar", tmp_path / "00002.tar")
    (tmp_path / "00000.tar").write_bytes(b"not a tar: the stats say how many images it holds")
    assert _count_shard_images(str(tmp_path)) == 5 + 3 + 3
