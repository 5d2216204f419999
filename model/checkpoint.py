"""Checkpoint I/O for the models: our own format, and foreign PyTorch pickles loaded safely.

Our format is one safetensors file: the state dict, plus the model's name and its config as JSON in
the file's metadata, so a file alone rebuilds its model. Foreign checkpoints (the official
Lightning ``.ckpt``) are read with ``torch.load(weights_only=True)``: no code in them runs. Code
that calls ``torch.load`` itself with full pickle (DeepSpeed's loaders) runs inside
``weights_only_loads``, which makes those calls safe as well.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from safetensors.torch import load_file, safe_open, save
from torch import Tensor, nn

from lverse.core.errors import InputError
from lverse.core.files import atomic_output
from lverse.core.formats import MODEL_FORMAT, check_format, metadata_format
from lverse.core.shards import file_sha256

log = logging.getLogger(__name__)

def save_model(model: nn.Module, path: str, provenance: dict[str, str] | None = None) -> None:
    """Write ``model``'s state dict and config to ``path`` atomically (temporary file, rename); the
    same weights and config give the same bytes. ``provenance`` (``provenance_of``) records the
    files a BiART was trained with."""
    meta = {"format": str(MODEL_FORMAT), "model": type(model).__name__,
            "config": json.dumps(dataclasses.asdict(model.cfg), sort_keys=True)}
    if provenance:
        meta["provenance"] = json.dumps(provenance, sort_keys=True)
    save_state(model.state_dict(), path, meta)


# -- provenance: the AugVAE and tokenizer a BiART was trained with ------------------------------
#
# A BiART's image codes mean something only for the AugVAE that made its token shards, and its
# text ids only for its tokenizer; another file of the same shape loads without complaint and gives
# garbage. Training records both files' sha256 in every checkpoint, export copies them into the
# safetensors metadata, and resume, caption and generate compare them with the files they are given.

PROVENANCE = {"vae_sha256": "AugVAE", "tokenizer_sha256": "tokenizer"}


def provenance_of(vae: str, tokenizer: str) -> dict[str, str]:
    """The record of an AugVAE file and a tokenizer file: their sha256."""
    return {"vae_sha256": file_sha256(vae), "tokenizer_sha256": file_sha256(tokenizer)}


def read_provenance(path: str) -> dict[str, str] | None:
    """The provenance stored in a file written by ``save_model`` (None: none recorded)."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["provenance"]) if "provenance" in meta else None


def check_provenance(recorded: dict[str, str] | None, vae: str, tokenizer: str, what: str, override: str) -> None:
    """Refuse an AugVAE or a tokenizer file other than those ``what`` was trained with, naming the
    files and both hashes; ``override`` says how to go on anyway. Nothing recorded (a model saved
    outside a training run: random weights for a benchmark or a test) is let through with a
    warning."""
    if recorded is None:
        log.warning("%s records no AugVAE or tokenizer hash: %s and %s cannot be checked against its training run",
                    what, vae, tokenizer)
        return
    given = provenance_of(vae, tokenizer)
    wrong = [f"{PROVENANCE[key]} {path} has sha256 {given[key][:16]}, {what} was trained with {recorded[key][:16]}"
             for key, path in (("vae_sha256", vae), ("tokenizer_sha256", tokenizer))
             if recorded.get(key) and recorded[key] != given[key]]
    if wrong:
        raise InputError("; ".join(wrong) + f": give the files of its training run ({override} to use these anyway)")


def save_state(state: dict[str, Tensor], path: str, metadata: dict[str, str]) -> None:
    """A state dict as safetensors, atomically; the same tensors and metadata give the same bytes."""
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    data = memoryview(save(state, metadata=metadata))
    # safetensors writes its header's maps in hash order, another in every process: the header goes
    # out again with its keys sorted (the tensors' offsets are relative to the data, which is unchanged).
    size = int.from_bytes(data[:8], "little")
    header = json.dumps(json.loads(bytes(data[8:8 + size])), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        f.write(data[8 + size:])


def read_config(path: str, config_cls: type) -> Any:
    """The config stored in a file written by ``save_model``: of this lverse's model-file format
    (core/formats.py), with every field of ``config_cls`` and no other."""
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise InputError(f"{path} has no lverse config in its metadata; was it written by "
                         "lverse.model.checkpoint.save_model?")
    check_format(metadata_format(meta.get("format")), MODEL_FORMAT, f"model file {path}",
                 "write it again with this lverse (`lverse export RUN_DIR` for a BiART, `lverse convert-vae` or "
                 "`lverse train-vae` for an AugVAE)")
    fields = {f.name for f in dataclasses.fields(config_cls)}
    values = json.loads(meta["config"])
    unknown, missing = sorted(set(values) - fields), sorted(fields - set(values))
    if unknown or missing:
        raise InputError(f"{path}: its config does not match {config_cls.__name__} (unknown fields {unknown}, "
                         f"missing {missing})")
    # JSON has no tuples; the configs are frozen dataclasses whose sequences are tuples.
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return config_cls(**values)


def load_model(path: str, model_cls: type, config_cls: type) -> nn.Module:
    """Rebuild a model from a file written by ``save_model``."""
    model = model_cls(read_config(path, config_cls))
    result = model.load_state_dict(load_file(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{path} does not match {model_cls.__name__}: missing "
                         f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}")
    return model


class _Inert:
    """Stands in for any class a checkpoint's pickle names: keeps its arguments, runs nothing."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.state = state


def load_torch_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a PyTorch checkpoint (``state_dict`` inside, as Lightning writes, or flat).

    ``torch.load(weights_only=True)`` refuses pickles that name classes outside its allowlist,
    such as the ``argparse.Namespace`` of Lightning's saved hyperparameters. Each such class is
    mapped to an inert stand-in, so the file loads without importing or running any of them.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as e:  # not a zip-format torch file
        raise InputError(f"{path} is not a PyTorch checkpoint: {e}") from e
    stand_ins = [(type(name.rsplit(".", 1)[-1], (_Inert,), {}), name) for name in names]
    try:
        with torch.serialization.safe_globals(stand_ins):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch refuses os/sys globals even when allowlisted
        raise InputError(f"{path} was refused by the safe loader: {str(e).strip().splitlines()[-1]}") from e
    state = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise InputError(f"{path} holds no state dict of tensors")
    return state


@contextlib.contextmanager
def weights_only_loads(allowed: Sequence[type], what: str) -> Iterator[None]:
    """Every ``torch.load`` inside the block unpickles weights only, even where its caller asks for
    full pickle (DeepSpeed passes ``weights_only=False`` everywhere): besides tensors and plain
    containers, only the classes ``allowed`` may be built, so a tampered file cannot run code.

    The switch is PyTorch's own ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which ``torch.load`` reads at
    every call; it is set for the block and restored after, and processes started inside the block
    inherit it. A file that names any other global is an InputError naming ``what`` was loaded.
    """
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed)):
            yield
    except pickle.UnpicklingError as e:
        refused = next((line.strip() for line in str(e).splitlines() if "global" in line.lower()),
                       str(e).strip().splitlines()[-1])
        raise InputError(f"{what} holds a pickle that names more than weights ({refused}); lverse loads it only "
                         "with torch.load(weights_only=True), so it was refused: it was not written by lverse, or "
                         "was changed since") from None
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
