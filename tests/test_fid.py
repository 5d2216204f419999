"""FID: torch-fidelity's Inception-v3 with random weights saved as its weights file (nothing is
downloaded). A set against itself scores 0, a shifted set more the more it is shifted, and the
distance equals an independent numpy computation on the same features; bad weights files and
mismatched image sets are refused with a message that says what to supply."""

import json
import os
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from lverse.cli import main
from lverse.core.errors import InputError
from lverse.model.inception import WEIGHTS_FILE, frechet_distance, inception_features, load_inception
from lverse.pipeline.evaluate import generation_fid, image_files, reconstruction_fid


def save_random_inception(path: str) -> str:
    """torch-fidelity's network with random weights, saved as a state dict like its weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fidelity
    cls = fidelity.FeatureExtractorInceptionV3
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(cls, "load_state_dict", lambda self, state: None):
        net = cls("inception-v3-compat", ["2048"])
    # PyTorch's default init shrinks activations about 3x a layer: through Inception's ~20 layers the
    # features would be ~1e-8. He init (the ReLU gain) keeps them of order 1.
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_random_inception(str(tmp_path_factory.mktemp("inception") / WEIGHTS_FILE))


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 images, blobs of colour within [40, 215] so a shift of up to 40 levels
    never clips."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (40 + 175 * x).round().to(torch.uint8)


def numpy_fid(a, b) -> float:
    """The Fréchet distance by another route: with S = B^T B (B the centred features over
    sqrt(n - 1)), tr sqrt(S_a S_b) is the sum of the singular values of B_a B_b^T."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ba = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    bb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(ba @ bb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ba ** 2).sum() + (bb ** 2).sum() - 2 * tr_sqrt)


def write_images(folder, images: torch.Tensor) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))
    return str(folder)


def test_frechet_distance_equals_the_closed_form():
    """Low-dimensional features (the distance is the same function at any width): torch-fidelity's
    eigenvalue route equals the singular-value route, and a set against itself is 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 16, generator=g)
    b = 0.5 * torch.randn(30, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.3
    assert frechet_distance(a, b) == pytest.approx(numpy_fid(a, b), rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError, match="at least 2"):
        frechet_distance(a[:1], b)


@pytest.mark.slow
def test_fid_is_zero_against_itself_grows_with_a_shift_and_matches_numpy(weights):
    net = load_inception(weights)
    x = smooth_images(12)
    real = inception_features(net, x)
    shifted = {s: inception_features(net, x + s) for s in (10, 40)}  # every pixel s levels brighter
    assert real.shape == (12, 2048) and real.std(0).mean() > 1e-3  # features of a usable scale
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-5)
    near, far = (frechet_distance(real, shifted[s]) for s in (10, 40))
    assert 1e-3 < near < far
    assert near == pytest.approx(numpy_fid(real, shifted[10]), rel=1e-3)


@pytest.mark.slow
def test_generation_fid_per_blur_radius_from_the_command_line(weights, tmp_path):
    """Reference images = the generated ones plus pixel noise: a strong blur both sets share
    washes the noise out, so FID-8 is below FID-0."""
    x = smooth_images(8)
    noisy = (x.float() + 40 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 255)
    generated = write_images(tmp_path / "generated", x)
    reference = write_images(tmp_path / "reference", noisy.round().to(torch.uint8))
    out = tmp_path / "evaluate_fid.json"
    assert main(["evaluate", "fid", "--generations", generated, "--reference-images", reference, "--inception-weights",
                 weights, "--blur-radii", "0", "8", "--batch-size", "4", "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["images"] == 8 and set(m) == {"images", "FID-0", "FID-8"}
    assert 0 < m["FID-8"] < m["FID-0"]


@pytest.mark.slow
def test_reconstruction_fid_of_the_augvae(weights, tmp_path):
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS

    from .test_encode import raw_shards
    shards = raw_shards(str(tmp_path / "raw"), count=1, n=6)
    vae = str(tmp_path / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    m = reconstruction_fid(shards, vae, weights, batch_size=4, device="cpu")
    assert m["images"] == 6 and np.isfinite(m["FID"]) and m["FID"] > 0  # a random AugVAE reconstructs badly


def test_missing_or_wrong_inception_weights_name_the_file_to_supply(tmp_path):
    for path in (None, str(tmp_path / "absent.pth")):
        with pytest.raises(InputError, match=WEIGHTS_FILE):
            load_inception(path)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(10, 2048), "fc.bias": torch.zeros(10)}, wrong)
    with pytest.raises(InputError, match=f"wrong.pth is not the Inception-v3 FID uses.*{WEIGHTS_FILE}"):
        load_inception(str(wrong))
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(InputError, match="notes.pth is not a PyTorch checkpoint"):
        load_inception(str(text))


def test_image_sets_of_different_sizes_or_resolutions_are_refused(tmp_path):
    """Checked before any network is loaded (no weights given here)."""
    generated = write_images(tmp_path / "generated", smooth_images(4))
    fewer = write_images(tmp_path / "fewer", smooth_images(3))
    with pytest.raises(InputError, match="4 generated and 3 reference.*--limit 3"):
        generation_fid(generated, fewer, None)
    with pytest.raises(InputError, match="--limit 5 takes 5 images"):
        generation_fid(generated, fewer, None, limit=5)
    larger = write_images(tmp_path / "larger", smooth_images(4, size=48))
    with pytest.raises(InputError, match="is 48x48 but .* is 32x32.*resize the reference images to 32x32"):
        generation_fid(generated, larger, None)
    with pytest.raises(InputError, match="blur radii must be >= 0"):
        generation_fid(generated, generated, None, blur_radii=(0, -1))
    with pytest.raises(InputError, match="no Inception weights were given"):  # the sets pass; the weights are next
        generation_fid(generated, generated, None)


def test_generate_output_counts_each_prompts_chosen_image_once(tmp_path):
    for i in range(2):
        folder = tmp_path / f"{i:05d}"
        write_images(folder / "candidates", smooth_images(2))
        write_images(folder, smooth_images(1))
        os.rename(folder / "00000.png", folder / "best.png")
        (folder / "result.json").write_text(json.dumps({"prompt": "p", "clip_score": 0.1}))
    assert image_files(str(tmp_path)) == [str(tmp_path / f"{i:05d}" / "best.png") for i in range(2)]


def test_the_command_line_says_which_fid_inputs_go_together(tmp_path, caplog):
    images = write_images(tmp_path / "images", smooth_images(2))
    assert main(["evaluate", "fid", "--generations", images]) == 2
    assert "--generations and --reference-images" in caplog.text
    assert main(["evaluate", "fid", "--shards", images, "--vae", __file__, "--blur-radii", "0", "1"]) == 2
    assert "--blur-radii applies to" in caplog.text
