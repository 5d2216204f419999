"""CLIP reranking with open_clip (github.com/mlfoundations/open_clip).

L-Verse samples many candidates (64 captions per image, 64 images per prompt) and keeps the one
CLIP scores highest. ``ClipScorer`` wraps an open_clip model: a named architecture with a local
checkpoint (``pretrained=PATH``, loaded with ``weights_only=True``), or, with no checkpoint, random
weights (tests only: no weights can be downloaded here). ``lverse-tiny`` is a small architecture of
our own (64x64 images, ``clip_configs/lverse-tiny.json``) for tests and the offline demo.

Scores are cosine similarities of the L2-normalised image and text embeddings, in [-1, 1].
"""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from torch import Tensor

from lverse.core.errors import InputError
from lverse.core.formats import MODEL_FORMAT, check_format, metadata_format

log = logging.getLogger(__name__)

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "clip_configs")


def register_configs() -> None:
    """Make our model configs (``clip_configs/*.json``) known to open_clip."""
    import open_clip
    if "lverse-tiny" not in open_clip.list_models():
        open_clip.add_model_config(CONFIGS)


def check_clip_file(path: str, model: str) -> None:
    """Refuse a CLIP file that `lverse train-clip` wrote (a .safetensors whose metadata names its
    architecture) of another model-file format than this lverse's, or of another architecture than
    ``model``, which open_clip would refuse with a list of every mismatched tensor. open_clip's own
    checkpoints record neither and load as they are."""
    if not path.endswith(".safetensors") or not os.path.isfile(path):
        return  # open_clip's own (.pt, .bin), or a missing file, which open_clip names
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "model" not in meta:
        return
    check_format(metadata_format(meta.get("format")), MODEL_FORMAT, f"CLIP file {path}",
                 "train it again with `lverse train-clip`")
    if meta["model"] != model:
        raise InputError(f"CLIP file {path} holds the weights of {meta['model']}, not of {model}: "
                         f"give --clip {meta['model']}")


class ClipScorer:
    def __init__(self, model: str = "ViT-B-32", checkpoint: str | None = None, device: str | torch.device = "cpu"):
        import open_clip
        register_configs()
        if checkpoint is None:
            log.warning("CLIP %s has random weights (no --clip-checkpoint): reranking is meaningless "
                        "except in tests", model)
            torch.manual_seed(0)  # at least the same random CLIP in every process
        else:
            check_clip_file(checkpoint, model)
        self.model, _, self.preprocess = open_clip.create_model_and_transforms(model, pretrained=checkpoint,
                                                                               device=device)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(model)
        self.device = torch.device(device)
        self.name = model

    @torch.no_grad()
    def image_features(self, images: list) -> Tensor:
        """PIL images -> (N, D) normalised embeddings."""
        batch = torch.stack([self.preprocess(im) for im in images]).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_image(batch).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: list[str]) -> Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1)

    def scores(self, images: list, texts: list[str]) -> Tensor:
        """Cosine similarity of images[i] with texts[i], (N,)."""
        return (self.image_features(images) * self.text_features(texts)).sum(-1)

    def best_captions(self, images: list, candidates: list[list[str]]) -> tuple[list[int], Tensor]:
        """For each image, the index of its best candidate caption and all candidates' scores (N, C)."""
        n, c = len(candidates), len(candidates[0])
        img = self.image_features(images)  # (N, D)
        txt = self.text_features([t for row in candidates for t in row]).view(n, c, -1)  # (N, C, D)
        scores = torch.einsum("nd,ncd->nc", img, txt)
        return scores.argmax(dim=1).tolist(), scores

    def best_images(self, images: list, prompts: list[str], per_prompt: int) -> tuple[list[int], Tensor]:
        """images holds ``per_prompt`` candidates of each prompt in turn; the best of each and all
        scores (P, per_prompt)."""
        img = self.image_features(images).view(len(prompts), per_prompt, -1)
        scores = torch.einsum("pd,pcd->pc", self.text_features(prompts), img)
        return scores.argmax(dim=1).tolist(), scores


def to_pil(images: Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    from PIL import Image
    arrays = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arrays]
