"""L-Verse models, single-device: distributed wrapping happens in the training stage.

Modules:
    augvae      AugVAE (ML and SL), presets, ML -> SL conversion, official checkpoint key map
    vae_blocks  the VQGAN-style encoder and decoder AugVAE is made of
    quantizer   the EMA codebook shared by all AugVAE levels
    biart       BiART, the bidirectional transformer: sequences, loss, KV-cache generation
    head        BiART's output layer in training: restricted or full head, chunked cross-entropy
    losses      the AugVAE training loss (MSE + LPIPS + commitment)
    checkpoint  safetensors save/load with config, safe loading of foreign PyTorch checkpoints
    clip        ClipScorer: open_clip reranking (clip_configs/lverse-tiny.json for tests and the demo)
    inception   Inception-v3 features from a local weights file and the Fréchet distance (FID)

Public names: AugVAE, AugVAEConfig, ml_to_sl, BiART, BiARTConfig, Direction, build_sequence,
prompt_for, ReconstructionLoss, save_model, load_model. Presets: ``augvae.PRESETS``, ``biart.PRESETS``.
"""

from .augvae import AugVAE, AugVAEConfig, ml_to_sl
from .biart import BiART, BiARTConfig, Direction, build_sequence, prompt_for
from .checkpoint import load_model, save_model
from .losses import ReconstructionLoss

__all__ = ["AugVAE", "AugVAEConfig", "ml_to_sl", "BiART", "BiARTConfig", "Direction", "build_sequence",
           "prompt_for", "ReconstructionLoss", "save_model", "load_model"]
