"""The EMA vector-quantizer codebook that every AugVAE level shares.

Nearest code by L2 distance, straight-through gradient, commitment loss ``beta * MSE(sg(z_q), z)``
and an exponential-moving-average codebook with Laplace smoothing (van den Oord et al. 2017,
appendix A.1; the official AugVAE code, ``latent_verse/modules/vqvae/quantize.py``).

Two changes from the official code, both deliberate:
- One EMA update per optimisation step, from the statistics of every level at once (the official
  code updates the shared codebook once per level, so the coarse levels see a decay of 0.99^4).
- Those statistics are all-reduced across data-parallel ranks, so every rank keeps the same
  codebook (the official code lets them drift apart). Use ``broadcast_buffers=False`` under DDP:
  broadcasting rank 0's buffers would overwrite the reduced update with rank 0's alone.

One addition: the codebook starts from data. The official code draws it from N(0, 1), far larger
than a fresh encoder's features, so every feature picks the same smallest code and the others never
come back (seen on the debug preset: 1 code of 512 in use after 120 steps). With ``data_init`` the
first training update sets every code to a feature vector of that batch, drawn on rank 0 and
broadcast. ``initialized`` is saved with the model, so loaded and resumed codebooks are left alone.

One option, off by default (the paper's models train without it): ``restart_below`` > 0 restarts
dead codes during training, as Jukebox does (Dhariwal et al. 2020, section 2.3): after each EMA
step every code whose EMA count fell below ``restart_below`` becomes a feature vector of this
batch (drawn on rank 0 and broadcast, so ranks stay identical) with count 1. The threshold sets the
churn: with about as many features per step as codes, a threshold of 1 restarts many codes every
step, spreading one flat colour over many codes; a threshold of 0.05 restarts a code only after
about 300 steps unused (0.99^300 = 0.05), which brings dead codes back without churn. Small
codebooks that collapse to a handful of codes are what the option is for (the demo's ``tiny-ml``).

Everything here runs in FP32 with autocast off: in half precision the squared distances of
256-dimensional codes lose the bits that separate near neighbours, and the EMA sums underflow.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

# Rows per distance matrix: 16384 x 8192 fp32 is 512 MiB. The 64x64 level of one 256x256 image
# is 4096 rows, so single images are never split.
_DISTANCE_CHUNK = 16384


class EMACodebook(nn.Module):
    """A codebook of ``num_codes`` vectors of size ``dim``, updated by EMA rather than gradients.

    Its state lives in buffers (``embed``, ``cluster_size``, ``embed_avg``), so optimizers never
    touch it and it is saved with the model.
    """

    def __init__(self, num_codes: int, dim: int, decay: float = 0.99, eps: float = 1e-5,
                 beta: float = 0.25, data_init: bool = True, restart_below: float = 0.0):
        super().__init__()
        self.num_codes, self.dim = num_codes, dim
        self.decay, self.eps, self.beta = decay, eps, beta
        self.restart_below = restart_below
        embed = torch.randn(num_codes, dim)
        self.register_buffer("embed", embed)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", embed.clone())
        self.register_buffer("initialized", torch.tensor(not data_init))

    def nearest(self, flat: Tensor) -> Tensor:
        """Index of the nearest code for each row of ``flat`` (N, dim) -> (N,)."""
        # ||z||^2 + ||e||^2 - 2 z.e, the same expression and order as the official code, so that
        # near-ties break the same way and official checkpoints give identical tokens.
        e2 = self.embed.pow(2).sum(dim=1)
        out = []
        for rows in flat.split(_DISTANCE_CHUNK):
            d = rows.pow(2).sum(dim=1, keepdim=True) + e2 - 2 * torch.einsum(
                "bd,nd->bn", rows, self.embed)
            out.append(d.argmin(dim=1))
        return torch.cat(out)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantize a feature map.

        Args:
            z: (B, dim, H, W) pre-quantization features.
        Returns:
            z_q: (B, dim, H, W) codes; straight-through (gradients flow to ``z``) when ``z``
                requires grad, the exact codebook vectors otherwise.
            indices: (B, H*W) code indices, row-major.
            commit: scalar commitment loss ``beta * MSE(sg(z_q), z)``.
        """
        with torch.autocast(device_type=z.device.type, enabled=False):
            z = z.float()
            B, D, H, W = z.shape
            flat = z.permute(0, 2, 3, 1).reshape(-1, D)  # (B*H*W, D)
            with torch.no_grad():
                idx = self.nearest(flat)
            z_q = self.lookup(idx.view(B, H * W), (H, W))
            commit = self.beta * F.mse_loss(z_q, z)
            if z.requires_grad:
                z_q = z + (z_q - z).detach()
        return z_q, idx.view(B, H * W), commit

    def lookup(self, indices: Tensor, hw: tuple[int, int]) -> Tensor:
        """Exact inverse of ``quantize``: (B, H*W) indices -> (B, dim, H, W) codes."""
        B = indices.shape[0]
        H, W = hw
        return F.embedding(indices, self.embed).view(B, H, W, self.dim).permute(0, 3, 1, 2)

    @torch.no_grad()
    def ema_update(self, features: list[Tensor], indices: list[Tensor]) -> None:
        """One EMA step from all levels' (pre-quantization features, indices) pairs.

        Counts and sums are all-reduced when a process group with more than one rank exists, so
        every rank applies the same update.
        """
        with torch.autocast(device_type=self.embed.device.type, enabled=False):
            flat = torch.cat([f.float().permute(0, 2, 3, 1).reshape(-1, self.dim)
                              for f in features])
            if not self.initialized:
                self._init_from(flat)
                return
            idx = torch.cat([i.reshape(-1) for i in indices])
            counts = torch.bincount(idx, minlength=self.num_codes).float()
            sums = torch.zeros_like(self.embed).index_add_(0, idx, flat)
            if _distributed():
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_avg.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
            if self.restart_below > 0:
                self._restart_dead(flat)

    def _restart_dead(self, flat: Tensor) -> None:
        """Codes whose EMA count is below ``restart_below`` become features of this batch."""
        dead = self.cluster_size < self.restart_below  # the same on every rank: counts are all-reduced
        if not dead.any():
            return
        fresh = self._batch_features(flat)
        self.embed[dead] = fresh[dead]
        self.embed_avg[dead] = fresh[dead]
        self.cluster_size[dead] = 1.0

    def _batch_features(self, flat: Tensor) -> Tensor:
        """``num_codes`` feature vectors drawn from rank 0's batch, the same on every rank."""
        drawn = flat[torch.randint(len(flat), (self.num_codes,), device=flat.device)]
        if _distributed():
            dist.broadcast(drawn, src=0)
        return drawn

    def _init_from(self, flat: Tensor) -> None:
        """Every code a feature vector of this batch (rank 0's, broadcast); this step's update."""
        embed = self._batch_features(flat)
        self.embed.copy_(embed)
        self.embed_avg.copy_(embed)
        self.cluster_size.fill_(1.0)
        self.initialized.fill_(True)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def codebook_usage(indices: Tensor, num_codes: int) -> tuple[float, int]:
    """Perplexity and number of unused codes of a batch of indices, from counts (no one-hot)."""
    counts = torch.bincount(indices.reshape(-1), minlength=num_codes).double()
    p = counts / counts.sum().clamp_min(1)
    perplexity = torch.exp(-(p * torch.log(p + 1e-10)).sum()).item()
    return perplexity, int((counts == 0).sum())
