"""FID: torch-fidelity's Inception-v3 with random weights saved as its weights file (nothing is
downloaded). A set against itself scores 0, a noisier set more, and every distance the library,
the command line and the AugVAE's reconstruction FID report equals an independent numpy
computation on features of the same images; bad weights files and mismatched image sets are
refused with a message that says what to supply.

Where the time goes on two busy CPU cores: an Inception forward pass, 1-3 s an image (each is
resized to 299x299), and each 2048-d FID, 10-50 s (torch-fidelity's eigenvalues of a 2048x2048
product, however few the images). So the weights are built once a session, a set is 3 images
whose features are computed once and shared, and the library's 2048-d distance runs 4 times."""

import json
import os

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image, ImageFilter

from lverse.cli import main
from lverse.core.errors import InputError
from lverse.model.inception import WEIGHTS_FILE, frechet_distance, inception_features, load_inception, to_uint8
from lverse.pipeline.evaluate import generation_fid, image_files, reconstruction_fid

N = 3  # images a set: FID needs 2; 3 gives rank-2 covariances, so the matrix square root is no scalar


def save_random_inception(path: str) -> str:
    """torch-fidelity's network with random weights, saved as a state dict like its weights file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class RandomInception(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # keep the random init
            assert state_dict == {}

    empty = path + ".empty"
    torch.save({}, empty)  # given as the weights path, so nothing is downloaded
    net = RandomInception("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)
    os.remove(empty)
    # PyTorch's default init shrinks activations about 3x a layer: through Inception's ~20 layers the
    # features would be ~1e-8. He init (the ReLU gain) keeps them of order 1.
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    return save_random_inception(str(tmp_path_factory.mktemp("inception") / WEIGHTS_FILE))


def smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) uint8 images, blobs of colour within [40, 215]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (40 + 175 * x).round().to(torch.uint8)


def with_noise(images: torch.Tensor, sigma: float, seed: int = 1) -> torch.Tensor:
    noise = sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


@pytest.fixture(scope="session")
def sets(weights):
    """Clean images and two noisier copies, with their Inception features (computed once)."""
    x = smooth_images(N)
    images = {"clean": x, "noise 10": with_noise(x, 10), "noise 40": with_noise(x, 40)}
    net = load_inception(weights)
    return images, {name: inception_features(net, im) for name, im in images.items()}


def numpy_fid(a, b) -> float:
    """The Fréchet distance by another route: with S = B^T B (B the centred features over
    sqrt(n - 1)), tr sqrt(S_a S_b) is the sum of the singular values of B_a B_b^T."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ba = (a - a.mean(0)) / np.sqrt(len(a) - 1)
    bb = (b - b.mean(0)) / np.sqrt(len(b) - 1)
    tr_sqrt = np.linalg.svd(ba @ bb.T, compute_uv=False).sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ba ** 2).sum() + (bb ** 2).sum() - 2 * tr_sqrt)


def sqrtm_fid(a, b) -> float:
    """The textbook formula, tr sqrt(S_a S_b) from scipy's matrix square root."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * np.trace(scipy.linalg.sqrtm(sa @ sb)).real)


def write_images(folder, images: torch.Tensor) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:05d}.png"))
    return str(folder)


def blurred(images: torch.Tensor, radius: float) -> torch.Tensor:
    """Pillow's GaussianBlur(radius) of each uint8 image, the blur of the paper's FID-r."""
    out = [np.asarray(Image.fromarray(im.permute(1, 2, 0).numpy()).filter(ImageFilter.GaussianBlur(radius)))
           for im in images]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def test_frechet_distance_equals_the_closed_form():
    """Low-dimensional features (the distance is the same function at any width): torch-fidelity's
    eigenvalue route equals the singular-value route and scipy's matrix square root, and a set
    against itself is 0."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 16, generator=g)
    b = 0.5 * torch.randn(30, 16, generator=g) @ torch.randn(16, 16, generator=g) + 0.3
    assert frechet_distance(a, b) == pytest.approx(numpy_fid(a, b), rel=1e-9)
    assert frechet_distance(a, b) == pytest.approx(sqrtm_fid(a, b), rel=1e-9)
    assert frechet_distance(a, b) > 1  # not a distance that is 0 for any two sets
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(InputError, match="at least 2"):
        frechet_distance(a[:1], b)


@pytest.mark.slow
def test_fid_is_zero_against_itself_and_grows_with_the_noise(sets):
    """On 2048-d Inception features of N images (covariances of rank N - 1). That the library's
    distance equals numpy's on such features, the tests below show on every number they read."""
    _, features = sets
    clean = features["clean"]
    assert clean.shape == (N, 2048) and clean.std(0).mean() > 1e-3  # features of a usable scale
    assert frechet_distance(clean, clean) == pytest.approx(0.0, abs=1e-5)
    near, far = numpy_fid(clean, features["noise 10"]), numpy_fid(clean, features["noise 40"])
    assert 0.1 < near and 10 * near < far  # measured: 1.25 and 56


@pytest.mark.slow
def test_generation_fid_per_blur_radius_from_the_command_line(sets, weights, tmp_path):
    """Reference images = the generated ones plus pixel noise. Each FID-r equals numpy's distance
    between features of both sets blurred at radius r, and the strong blur washes the noise out,
    so FID-8 is far below FID-0."""
    images, features = sets
    generated = write_images(tmp_path / "generated", images["clean"])
    reference = write_images(tmp_path / "reference", images["noise 40"])
    out = tmp_path / "evaluate_fid.json"
    assert main(["evaluate", "fid", "--generations", generated, "--reference-images", reference, "--inception-weights",
                 weights, "--blur-radii", "0", "8", "--batch-size", "2", "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["images"] == N and set(m) == {"images", "FID-0", "FID-8"}
    assert m["FID-0"] == pytest.approx(numpy_fid(features["clean"], features["noise 40"]), rel=1e-6)
    net = load_inception(weights)
    blurred_features = [inception_features(net, blurred(images[name], 8)) for name in ("clean", "noise 40")]
    # near 0 the eigenvalue route's error is absolute: within 1e-5 of numpy's, as it is of 0 for a
    # set against itself (measured: 4e-7 here, 3e-6 there)
    assert m["FID-8"] == pytest.approx(numpy_fid(*blurred_features), rel=1e-6, abs=1e-5)
    assert 0 < 100 * m["FID-8"] < m["FID-0"]  # measured: 0.027 and 56


@pytest.mark.slow
def test_reconstruction_fid_of_the_augvae(weights, tmp_path):
    """Equals numpy's distance between features of the shards' images and of the AugVAE's
    reconstructions of them, read across two batches."""
    from lverse.core.images import decodable_images
    from lverse.model import AugVAE, save_model
    from lverse.model.augvae import PRESETS

    from .test_encode import raw_shards
    shards = raw_shards(str(tmp_path / "raw"), count=1, n=N)
    vae = str(tmp_path / "vae.safetensors")
    save_model(AugVAE(PRESETS["debug-sl"]), vae)
    m = reconstruction_fid(shards, vae, weights, batch_size=2, device="cpu")
    model = AugVAE.load(vae).eval()
    x = torch.from_numpy(np.stack([image for _, image in decodable_images(shards, model.cfg.image_size)]))
    with torch.no_grad():
        recon = model.reconstruct(x, 2)
    net = load_inception(weights)
    expected = numpy_fid(inception_features(net, to_uint8(x)), inception_features(net, to_uint8(recon)))
    assert m["images"] == N and m["FID"] == pytest.approx(expected, rel=1e-6)
    assert expected > 1  # a random AugVAE reconstructs badly: not the distance of the images to themselves


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
