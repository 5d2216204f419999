"""Run configuration: YAML files onto dataclasses, in one place.

Precedence is command line > file > dataclass defaults. Unknown keys are refused with the list of
known ones, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml


def from_dict(cls: type, data: dict, where: str):
    """Build dataclass ``cls`` from a dict; nested dataclass fields from nested dicts."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known keys are {sorted(names)}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        values[key] = from_dict(kind, value, f"{where}.{key}") if dataclasses.is_dataclass(kind) else value
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise ValueError(f"{where}: {e}") from e


def load_config(path: str, cls: type, overrides: dict | None = None):
    """``cls`` from a YAML file, with ``overrides`` (from the command line) on top."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, path)


def dump_config(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
