"""Inception-v3 features and the Fréchet distance between them: FID, from a local weights file.

FID (Heusel et al. 2017, https://arxiv.org/abs/1706.08500) is the Fréchet distance between two
Gaussians fitted to the 2048-d pool features of Inception-v3 as TensorFlow released it on
2015-12-05. L-Verse reports it with torch-fidelity (https://github.com/toshas/torch-fidelity);
this module runs torch-fidelity's own ``FeatureExtractorInceptionV3`` (uint8 images of any size,
resized to 299x299 the way TensorFlow 1 did) and its own statistics and distance
(``metric_fid.fid_features_to_statistics``, ``fid_statistics_to_metric``), so a number here is
torch-fidelity's number on the same images.

Nothing is downloaded: the weights come from a file the user supplies, torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (``WEIGHTS_URL``). pytorch-fid's
``pt_inception-2015-12-05-6726825d.pth``, a port of the same TensorFlow graph, has the same keys and
shapes and loads too. The file is read with ``torch.load(weights_only=True)``: no code in it runs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from torch import Tensor, nn

from lverse.core.errors import InputError

WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{WEIGHTS_FILE}"
FEATURES = "2048"  # the pool features FID uses (torch-fidelity's default layer for FID)
SUPPLY = (f"supply torch-fidelity's {WEIGHTS_FILE} ({WEIGHTS_URL}; pytorch-fid's "
          "pt_inception-2015-12-05-6726825d.pth works too) with --inception-weights; nothing is downloaded")


def _extractor_class():
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError("FID needs torch-fidelity: pip install -c constraints.txt 'lverse[eval]'") from e
    return FeatureExtractorInceptionV3


def load_inception(path: str | None, device: str | torch.device = "cpu") -> nn.Module:
    """torch-fidelity's Inception-v3 with the weights of ``path``, eval mode, on ``device``.

    Args:
        path: the weights file (a state dict); None or a missing file is an InputError naming the
            file to supply, as is a file that is no state dict or does not fit the network.
        device: where the network runs.
    Returns:
        A module mapping uint8 images (B, 3, H, W) to a one-tuple of (B, 2048) float32 features.
    """
    if not path or not os.path.isfile(path):
        where = "no Inception weights were given" if not path else f"{path} does not exist"
        raise InputError(f"FID needs the Inception-v3 weights as a local file, and {where}: {SUPPLY}")
    from .checkpoint import load_torch_state_dict, weights_only_loads
    load_torch_state_dict(path)  # a readable state dict of tensors, or an InputError saying what it is
    cls = _extractor_class()
    try:
        with weights_only_loads([], what=path):  # torch-fidelity itself loads with weights_only=False
            net = cls("inception-v3-compat", [FEATURES], feature_extractor_weights_path=path)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
        detail = " ".join(str(e).split())[:300]
        raise InputError(f"{path} is not the Inception-v3 FID uses ({detail}): {SUPPLY}") from None
    return net.to(device)


@torch.no_grad()
def inception_features(net: nn.Module, images: Tensor) -> Tensor:
    """(B, 3, H, W) uint8 images -> (B, 2048) float32 features on the CPU."""
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
    device = next(net.parameters()).device
    (features,) = net(images.to(device))
    return features.float().cpu()


def to_uint8(images: Tensor) -> Tensor:
    """Images in [-1, 1] (the AugVAE's range) -> uint8 in [0, 255]: the inverse of
    ``core.images.preprocess``, so decoded shard images come back to their own pixels."""
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def frechet_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """FID between two sets of features (N, D), torch-fidelity's computation: mean and covariance
    in float64 (``np.cov``), then |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrt(S_a S_b), the
    trace from the eigenvalues of S_a S_b. Each set needs at least 2 samples."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric
    stats = []
    for f in (a, b):
        f = torch.as_tensor(f).detach().cpu().double()
        if f.dim() != 2 or len(f) < 2:
            raise InputError(f"FID needs at least 2 images a set, got {tuple(f.shape)} features")
        stats.append(fid_features_to_statistics(f))
    return fid_statistics_to_metric(stats[0], stats[1], verbose=False)[KEY_METRIC_FID]
