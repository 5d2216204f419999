"""Run configuration: YAML files onto dataclasses, in one place.

Precedence is command line > file > dataclass defaults. Unknown keys are refused with the list of
known ones, so a typo never silently falls back to a default. PyYAML follows YAML 1.1, which reads
``3e-4`` (no dot) as a string: a number field takes such a string as the number it spells, and
refuses any other string.
"""

from __future__ import annotations

import dataclasses
import typing

import yaml

from .errors import InputError


def from_dict(cls: type, data: dict, where: str):
    """Build dataclass ``cls`` from a dict; nested dataclass fields from nested dicts."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise InputError(f"{where}: unknown keys {unknown}; known keys are {sorted(names)}")
    values = {}
    for key, value in data.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            values[key] = from_dict(kind, value, f"{where}.{key}")
        else:
            values[key] = _number(kind, value, f"{where}.{key}")
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise InputError(f"{where}: {e}") from e


def _number(kind, value, where: str):
    """``value`` for a field typed ``kind``: a string where the field is a number is parsed."""
    if not isinstance(value, str):
        return value
    allowed = set(typing.get_args(kind) or (kind,))
    if str in allowed or not allowed & {int, float}:
        return value
    try:
        number = float(value)
    except ValueError:
        raise InputError(f"{where}: expected a number, got {value!r}") from None
    if float in allowed:
        return number
    if not number.is_integer():
        raise InputError(f"{where}: expected an integer, got {value!r}")
    return int(number)


def load_config(path: str, cls: type, overrides: dict | None = None):
    """``cls`` from a YAML file, with ``overrides`` (from the command line) on top."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, path)


def dump_config(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
