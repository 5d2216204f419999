"""Images of image shards as the AugVAE takes them: JPEG bytes -> (3, size, size) in [-1, 1]."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from .shards import expand_shards, iter_samples


def preprocess(jpg: bytes, size: int) -> np.ndarray | None:
    """JPEG bytes -> (3, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.
    None when the image does not decode."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            im = im.convert("RGB")
            scale = size / min(im.size)
            im = im.resize((max(size, round(im.width * scale)), max(size, round(im.height * scale))),
                           Image.BICUBIC)
            left, top = (im.width - size) // 2, (im.height - size) // 2
            im = im.crop((left, top, left + size, top + size))
            return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def decodable_images(shards: str, size: int) -> Iterator[tuple[dict, np.ndarray]]:
    """(sample, its image) for every sample of ``shards`` whose ``jpg`` decodes, in order."""
    for shard in expand_shards(shards):
        for sample in iter_samples(shard):
            image = preprocess(sample.get("jpg", b""), size)
            if image is not None:
                yield sample, image
