"""Models a worker process loads once and keeps between items (shards, prompts).

One cache per process, one model of each kind: a new key of the same kind (another checkpoint,
another device) drops the old model before loading the new one, so a long-lived worker never
holds two copies. ``Generator`` is what caption and generate run: a BiART with the AugVAE and
tokenizer it was trained with, checked once by the driver (``check_generator``) before any worker
starts.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import NamedTuple, TypeVar

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
        from lverse.model.augvae import AugVAE
        vae = AugVAE.load(path)
        if vae.cfg.codebook_size > 1 << 16:
            raise InputError(f"{vae.cfg.codebook_size} codes do not fit the token shards' uint16")
        return vae.eval().float().requires_grad_(False).to(device)
    return cached("vae", (path, device), load)


class Generator(NamedTuple):
    model: object  # BiART, eval mode
    tokenizer: object  # CaptionTokenizer at the model's text offset
    vae: object  # AugVAE, FP32
    clip: object | None  # ClipScorer, when candidates are ranked


def load_generator(checkpoint: str, vae: str, tokenizer: str, device: str, clip: str | None = None,
                   clip_checkpoint: str | None = None, precision: str = "auto") -> Generator:
    """BiART (in ``precision``: core.resources.compute_dtype), tokenizer, AugVAE and (with ``clip``,
    an open_clip architecture) the CLIP scorer, loaded once per process and checked to fit each
    other. The AugVAE and CLIP stay FP32."""
    from lverse.core.resources import compute_dtype
    dtype = compute_dtype(precision, device)

    def load():
        from lverse.model.biart import BiART, BiARTConfig
        from lverse.model.checkpoint import load_model
        from lverse.preprocessing.text_tokenizer import CaptionTokenizer
        model = load_model(checkpoint, BiART, BiARTConfig).to(device=device, dtype=dtype).eval()
        tok = CaptionTokenizer(tokenizer, offset=model.cfg.text_offset)
        scorer = None
        if clip:
            from lverse.model.clip import ClipScorer
            scorer = ClipScorer(clip, clip_checkpoint, device)
        return model, tok, scorer
    model, tok, scorer = cached("generator", (checkpoint, tokenizer, clip, clip_checkpoint, device, dtype), load)
    found = Generator(model, tok, load_vae(vae, device), scorer)
    _check_fit(model.cfg, found.tokenizer, found.vae, checkpoint, vae, tokenizer)
    return found


def check_generator(checkpoint: str, vae: str, tokenizer: str, ignore_provenance: bool = False,
                    clip: str | None = None, clip_checkpoint: str | None = None) -> None:
    """Once, before any worker starts: the three files exist, fit each other (sizes), and the AugVAE
    and tokenizer are those the BiART was trained with (their hashes), unless ``ignore_provenance``;
    a CLIP file of `lverse train-clip` is of the architecture ``clip``. Reads the BiART's config,
    not its weights."""
    import os

    from lverse.model.biart import BiARTConfig
    from lverse.model.checkpoint import check_provenance, read_config, read_provenance
    from lverse.model.clip import check_clip_file
    from lverse.preprocessing.text_tokenizer import CaptionTokenizer
    if clip and clip_checkpoint:
        check_clip_file(clip_checkpoint, clip)
    for name, path in (("checkpoint", checkpoint), ("vae", vae), ("tokenizer", tokenizer)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--{name} {path} does not exist")
    bcfg = read_config(checkpoint, BiARTConfig)
    _check_fit(bcfg, CaptionTokenizer(tokenizer, offset=bcfg.text_offset), load_vae(vae), checkpoint, vae, tokenizer)
    if not ignore_provenance:
        check_provenance(read_provenance(checkpoint), vae, tokenizer, checkpoint, "--ignore-provenance")


def _check_fit(bcfg, tok, vae_model, checkpoint: str, vae: str, tokenizer: str) -> None:
    """Sizes that must agree between a BiART config, its tokenizer and its AugVAE."""
    if tok.vocab_size != bcfg.text_vocab:
        raise InputError(f"tokenizer {tokenizer} has {tok.vocab_size} pieces, {checkpoint} was trained "
                         f"with {bcfg.text_vocab}: give the tokenizer of its training run")
    if vae_model.cfg.num_tokens != bcfg.image_len or vae_model.cfg.codebook_size != bcfg.image_vocab:
        raise InputError(f"{vae} makes {vae_model.cfg.num_tokens} tokens of {vae_model.cfg.codebook_size} codes, "
                         f"{checkpoint} takes {bcfg.image_len} of {bcfg.image_vocab}: give the AugVAE it was "
                         "trained with")
