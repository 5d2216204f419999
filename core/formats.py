"""The format version of each kind of file lverse writes and reads back later, in one place.

Every such file records its version when it is written; a reader takes only the version this
lverse writes. A file of another version, or one that records none, is refused with the command
that writes it anew: no reader keeps a branch for another version. When what a kind of file
holds changes, its number here goes up (and its refusal still names the command that rebuilds it).

- a training checkpoint (BiART, AugVAE): ``format`` in its marker ``lverse.json``; written by
  runtime/trainer.py, read by resume and export;
- a token shard: ``format`` in its ``NNNNN_stats.json``; written by pipeline/encode.py, read by
  core/shards.py ``check_vae`` (training, the token index, caption, encode's rerun);
- a caption parquet: ``lverse_caption_format`` in its schema metadata; written by
  pipeline/caption.py, read by evaluate, report and the demo;
- a run config: ``format`` in ``RUN_DIR/config.yaml``; written by core/config.py ``write_config``,
  read by export, and by ``load_config`` when such a file is given back as a config;
- a model file (an exported BiART, an AugVAE, each a .safetensors): ``format`` in its metadata
  beside its config; written by model/checkpoint.py ``save_model``, read by ``read_config`` (every
  load of a model file); a CLIP file of `lverse train-clip` the same, beside its architecture's
  name, read by model/clip.py ``check_clip_file`` (open_clip's own checkpoints record none and are
  taken as they are);
- the token index: ``version`` in ``_index/meta.json``; written by runtime/token_index_build.py,
  read by runtime/token_index.py.
"""

from __future__ import annotations

from . import storage
from .errors import InputError

CHECKPOINT_FORMAT = 2  # the marker of a training checkpoint (BiART, AugVAE): what resume and export read
TOKEN_SHARD_FORMAT = 1  # a token shard and its stats file: members, and stats with ``vae`` and ``crops``
CAPTION_FORMAT = 1  # a caption parquet: key, url, caption, caption_whole, clip_score, error[, candidates]
RUN_CONFIG_FORMAT = 1  # the resolved config a run writes into its folder
MODEL_FORMAT = 1  # a model file: the weights, the model's name, its whole config[, its provenance]; a CLIP file
TOKEN_INDEX_FORMAT = 1  # the token index: its files and its meta.json's fields

CAPTION_FORMAT_KEY = b"lverse_caption_format"  # the caption parquet's schema-metadata key of its version
_REWRITE_CAPTIONS = "caption its shards again with `lverse caption` into a new --output folder"


def check_format(found: object, expected: int, what: str, rewrite: str) -> None:
    """Refuse ``what`` unless the format version it records, ``found`` (None: it records none), is
    ``expected``; ``rewrite`` is the command that writes it anew."""
    if found == expected:
        return
    held = "records no format version" if found is None else f"is of format {found!r}"
    raise InputError(f"{what} {held}; this lverse reads format {expected} only: {rewrite}")


def metadata_format(value: str | bytes | None) -> int | str | None:
    """The format version a file's metadata records, which holds strings (safetensors) or bytes
    (parquet): the number it spells, else the text as it is (refused by ``check_format``)."""
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return int(value) if value is not None and value.isdigit() else value


def mark_captions(table):
    """A caption table (pyarrow) with ``CAPTION_FORMAT`` in its schema metadata, as it is written."""
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          CAPTION_FORMAT_KEY: str(CAPTION_FORMAT).encode()})


def is_caption_table(table) -> bool:
    """Whether a parquet table is caption output (of any version): its format key, or the columns
    of one (img2dataset's parquet has ``key`` and ``caption`` too, but no ``clip_score``)."""
    return CAPTION_FORMAT_KEY in (table.schema.metadata or {}) or \
        {"key", "caption", "clip_score"} <= set(table.column_names)


def check_captions(table, path: str) -> None:
    """Refuse a caption table of another format than ``CAPTION_FORMAT`` (``path``: where it was read)."""
    found = metadata_format((table.schema.metadata or {}).get(CAPTION_FORMAT_KEY))
    check_format(found, CAPTION_FORMAT, f"caption file {path}", _REWRITE_CAPTIONS)


def read_captions(path: str):
    """The pyarrow table of a caption parquet (local or object store), refused unless of ``CAPTION_FORMAT``."""
    table = storage.read_parquet(path)
    check_captions(table, path)
    return table
