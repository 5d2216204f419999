"""The AugVAE training loss: mean(MSE + 0.1 * LPIPS) + the commitment losses.

LPIPS is Zhang et al. 2018 (github.com/richzhang/PerceptualSimilarity, the ``lpips`` package) over
VGG16 features. The package ships its linear calibration layers; the VGG16 backbone comes from
torchvision, which downloads it unless given a local file. With no file the backbone is random,
which serves tests and the offline demo, and a warning says so.
"""

from __future__ import annotations

import logging
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)


class ReconstructionLoss(nn.Module):
    """MSE + ``perceptual_weight`` * LPIPS(VGG) + commitment, on images in [-1, 1].

    LPIPS stays frozen and in eval mode whatever mode its owner is put in.

    Args:
        perceptual_weight: weight of the LPIPS term (0.1 in L-Verse; 0 skips LPIPS).
        vgg_checkpoint: a torchvision VGG16 state dict (``vgg16-397923af.pth``); None for random
            VGG features (tests and the offline demo only).
    """

    def __init__(self, perceptual_weight: float = 0.1, vgg_checkpoint: str | None = None):
        super().__init__()
        self.perceptual_weight = perceptual_weight
        self.lpips = None
        if perceptual_weight > 0:
            self.lpips = build_lpips(vgg_checkpoint)

    def train(self, mode: bool = True) -> ReconstructionLoss:
        super().train(mode)
        if self.lpips is not None:
            self.lpips.eval()
        return self

    def forward(self, recon: Tensor, target: Tensor, commit: Tensor) -> dict[str, Tensor]:
        """Returns {"loss", "mse", "lpips", "commit"}; ``loss`` is what to optimise."""
        mse = F.mse_loss(recon.float(), target.float())
        lp = recon.new_zeros((), dtype=torch.float32)
        if self.lpips is not None:
            lp = self.lpips(recon.float(), target.float()).mean()
        loss = mse + self.perceptual_weight * lp + commit
        return {"loss": loss, "mse": mse.detach(), "lpips": lp.detach(), "commit": commit.detach()}


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB per image, images in [0, 1]: (B,)."""
    mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(1.0 / mse)


def build_lpips(vgg_checkpoint: str | None) -> nn.Module:
    try:
        import lpips
    except ImportError as e:
        raise ImportError("the AugVAE loss needs lpips: pip install 'lverse[vae]'") from e
    with warnings.catch_warnings():  # lpips still passes torchvision's deprecated `pretrained`
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)
    if vgg_checkpoint is None:
        log.warning("LPIPS uses a random VGG16 backbone: give a local vgg16 checkpoint for real training")
    else:
        features = torch.load(vgg_checkpoint, map_location="cpu", weights_only=True)
        # lpips splits torchvision's vgg16.features into slices that keep the original indices.
        own = model.net.state_dict()
        mapped = {k: features[f"features.{k.split('.', 1)[1]}"] for k in own}
        model.net.load_state_dict(mapped)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
