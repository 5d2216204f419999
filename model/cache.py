"""Models a worker process loads once and keeps between items (shards, prompts).

One cache per process, one model of each kind: a new key of the same kind (another checkpoint,
another device) drops the old model before loading the new one, so a long-lived worker never
holds two copies.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

from lverse.core.errors import InputError

T = TypeVar("T")
_HELD: dict[str, tuple[Hashable, object]] = {}


def cached(kind: str, key: Hashable, load: Callable[[], T]) -> T:
    """``load()``'s result for ``key``, loaded once per process."""
    held = _HELD.get(kind)
    if held is None or held[0] != key:
        _HELD.pop(kind, None)
        _HELD[kind] = (key, load())
    return _HELD[kind][1]


def load_vae(path: str, device: str = "cpu"):
    """The AugVAE of a checkpoint, frozen, eval mode, FP32, on ``device``; cached per process."""
    def load():
        from .augvae import AugVAE
        vae = AugVAE.load(path)
        if vae.cfg.codebook_size > 1 << 16:
            raise InputError(f"{vae.cfg.codebook_size} codes do not fit the token shards' uint16")
        return vae.eval().float().requires_grad_(False).to(device)
    return cached("vae", (path, device), load)
