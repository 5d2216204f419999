"""Images of image shards as the AugVAE takes them: JPEG bytes -> (3, size, size) in [-1, 1]."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np

from .shards import expand_shards, iter_samples

# Images beyond this aspect ratio take another path in ``preprocess``: resizing the whole of a
# 65000x1 image to a shorter side of 256 would make a 16.6-million-pixel-wide intermediate.
MAX_ASPECT = 16


def decode(jpg: bytes):
    """JPEG (or any image) bytes -> an RGB PIL image; None when they do not decode."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(jpg)) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def to_model_input(im) -> np.ndarray:
    """An RGB PIL image -> (3, H, W) float32 in [-1, 1], as the AugVAE takes it."""
    return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def preprocess(jpg: bytes, size: int) -> np.ndarray | None:
    """JPEG bytes -> (3, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.
    None when the image does not decode (``centre_crop`` of ``decode``)."""
    im = decode(jpg)
    return None if im is None else centre_crop(im, size)


def centre_crop(im, size: int) -> np.ndarray:
    """An RGB PIL image -> (3, size, size) float32 in [-1, 1]: shorter side to ``size``, centre crop.

    The whole image is resized, then cropped, as long as the resized image holds at most
    ``MAX_ASPECT`` crops' worth of pixels (aspect ratios up to 16:1; CC3M's are rarely beyond
    3:1). Beyond that only the part of the source under the crop is resized (Pillow's ``box``,
    which still reads the pixels around it that the bicubic filter needs), so the work stays that
    of one ``size`` x ``size`` image whatever the shape. The trade-off: this path may round its
    intermediate pass differently (Pillow picks the cheaper pass order for a box), so its pixels
    can differ from a whole-image resize by a level or two on natural images (more on pure noise).
    Ordinary images keep the whole-image path, and so the bytes of token shards already encoded.
    """
    from PIL import Image
    scale = size / min(im.size)
    width, height = max(size, round(im.width * scale)), max(size, round(im.height * scale))
    left, top = (width - size) // 2, (height - size) // 2
    if width * height <= MAX_ASPECT * size * size:
        im = im.resize((width, height), Image.BICUBIC).crop((left, top, left + size, top + size))
    else:  # the crop's box in source pixels: the same sampling positions, none of the rest
        sx, sy = im.width / width, im.height / height
        im = im.resize((size, size), Image.BICUBIC, box=(left * sx, top * sy, (left + size) * sx, (top + size) * sy))
    return to_model_input(im)


def decodable_images(shards: str, size: int) -> Iterator[tuple[dict, np.ndarray]]:
    """(sample, its image) for every sample of ``shards`` whose ``jpg`` decodes, in order."""
    for shard in expand_shards(shards):
        for sample in iter_samples(shard):
            image = preprocess(sample.get("jpg", b""), size)
            if image is not None:
                yield sample, image
