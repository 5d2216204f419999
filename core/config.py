"""Run configuration: YAML files and command-line options onto dataclasses, in one place.

A config dataclass is the one place a stage's options are written: field names, types, defaults
and, in each field's trailing comment, the help text; the CLI's options are made from it
(``add_options``). Precedence is command line > file > dataclass defaults. Unknown keys are
refused with the list of known ones, so a typo never silently falls back to a default. PyYAML
follows YAML 1.1, which reads ``3e-4`` (no dot) as a string: a number field takes such a string as
the number it spells, and refuses any other string.

The resolved config a run writes into its folder (``write_config``) records ``format``, the run
config format (core/formats.py); ``load_run_config`` reads one back only of that format, and
``load_config`` takes such a file as a config too (its ``format`` checked, not a field).

Why not a library (tyro, jsonargparse, simple-parsing all make options from dataclasses, tyro
with help from field comments too): lverse needs a YAML file under the options with the dataclass
alone holding defaults (an option not given must not override the file), its own refusals
(InputError naming the field, the unknown keys with the known ones, YAML 1.1's numbers), the
command line's checks (existing files, positive counts) and help that loads no stage. Each of
those would be an adapter around the library; this module is those rules and about 300 lines of
argparse, with no dependency to pin.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from collections.abc import Callable, Sequence
from types import UnionType

import yaml

from .errors import InputError
from .files import atomic_output
from .formats import RUN_CONFIG_FORMAT, check_format


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
            values[key] = _typed(kind, _number(kind, value, f"{where}.{key}"), f"{where}.{key}")
    try:
        return cls(**values)
    except TypeError as e:  # a required key is missing
        raise InputError(f"{where}: {e}") from e
    except InputError as e:  # the config's own checks (__post_init__): say which file
        raise InputError(f"{where}: {e}") from None


def _typed(kind, value, where: str):
    """``value`` if it is of the field's type ``kind`` (an int is a float too; a bool is no int),
    else an InputError that names the field. Types it does not know pass as they are."""
    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, UnionType) else (kind,)
    for option in options:
        origin = typing.get_origin(option) or option
        if option is type(None) and value is None:
            return value
        if origin is typing.Literal and value in typing.get_args(option):
            return value
        if origin is bool and isinstance(value, bool):
            return value
        if origin is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if origin in (str, list, dict) and isinstance(value, origin):
            return value
        if origin not in (type(None), typing.Literal, bool, int, float, str, list, dict):
            return value
    raise InputError(f"{where}: expected {' or '.join(map(_type_name, options))}, got {value!r}")


def _type_name(option) -> str:
    if typing.get_origin(option) is typing.Literal:
        return " or ".join(map(repr, typing.get_args(option)))
    return "null" if option is type(None) else getattr(typing.get_origin(option) or option, "__name__", str(option))


def at_least(cfg, minimum: int, *names: str) -> None:
    """Refuse a config whose count fields ``names`` are below ``minimum``, naming the field."""
    for name in names:
        value = getattr(cfg, name)
        if value < minimum:
            raise InputError(f"{name} must be at least {minimum}, got {value}")


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


def _read_yaml(path: str) -> dict:
    with open(path) as f:
        try:
            data = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    return data


# what to do with a run config of another format given back as a config
_REWRITE_CONFIG = "write the config anew (configs/ holds examples) or take the one you started the run with"


def load_config(path: str, cls: type, overrides: dict | None = None):
    """``cls`` from a YAML file, with ``overrides`` (from the command line) on top. A run config
    that ``write_config`` wrote may be given too: its ``format`` must be ``RUN_CONFIG_FORMAT``."""
    data = _read_yaml(path)
    if "format" in data:
        check_format(data.pop("format"), RUN_CONFIG_FORMAT, f"run config {path}", _REWRITE_CONFIG)
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return from_dict(cls, data, path)


def load_run_config(path: str, cls: type, rewrite: str):
    """``cls`` from the run config ``write_config`` wrote at ``path``, refused unless of
    ``RUN_CONFIG_FORMAT``; ``rewrite`` says how to get one that is."""
    data = _read_yaml(path)
    check_format(data.pop("format", None), RUN_CONFIG_FORMAT, f"run config {path}", rewrite)
    return from_dict(cls, data, path)


def dump_config(cfg) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def write_config(path: str, cfg) -> None:
    """``cfg`` as YAML at ``path``, atomically, its first line the run config format: the resolved
    config a run was started with."""
    with atomic_output(path) as tmp, open(tmp, "w") as f:
        f.write(yaml.safe_dump({"format": RUN_CONFIG_FORMAT}) + dump_config(cfg))


# -- command-line options from a config dataclass ------------------------------------------------
#
# A stage's config dataclass is the one place its options are written: ``add_options`` makes a
# ``--field-name`` option of each field (type from the annotation, default and help from the
# dataclass), ``options_to_config`` builds the dataclass back from the options given. The parser
# holds no default of its own (argparse.SUPPRESS): a field the user leaves out is left out, so the
# dataclass supplies its default, and a YAML config under the options keeps its values for them.


def field_help(cls: type) -> dict[str, str]:
    """Help text of each field of dataclass ``cls``: its trailing ``# comment`` in the class source
    (or, without one, the comment lines right above the field), read from the class and its base
    classes; a subclass's comment wins over its base's."""
    helps: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            helps.update(_class_comments(klass))
    return helps


@functools.cache
def _class_comments(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):  # no source (built in a REPL): no help
        return {}
    comments = {}  # line -> (text, whether the comment is alone on its line)
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.string.lstrip("#").strip(), not tok.line[:tok.start[1]].strip())
    helps = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        lines = range(node.lineno, node.end_lineno + 1)
        text = [comments[n][0] for n in lines if n in comments and not comments[n][1]]
        above = node.lineno - 1
        while not any(n in comments for n in lines) and above in comments and comments[above][1]:
            text.insert(0, comments[above][0])
            above -= 1
        if text:
            helps[node.target.id] = " ".join(text)
    return helps


def flag(name: str) -> str:
    """The option of field ``name``: ``batch_size`` -> ``--batch-size``."""
    return "--" + name.replace("_", "-")


def _option_type(cls: type, name: str, hint) -> tuple[type, tuple | None, bool]:
    """(type, choices, whether it takes a list) of the option of a field annotated ``hint``;
    TypeError where none fits."""
    if typing.get_origin(hint) in (typing.Union, UnionType):  # X | None
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = rest[0] if len(rest) == 1 else hint
    if typing.get_origin(hint) is list and typing.get_args(hint) in ((int,), (float,), (str,)):
        return typing.get_args(hint)[0], None, True
    if typing.get_origin(hint) is typing.Literal:
        choices = typing.get_args(hint)
        return type(choices[0]), choices, False
    if hint in (int, float, str, bool):
        return hint, None, False
    raise TypeError(f"{cls.__name__}.{name} ({hint}) cannot be a command-line option: pass it in skip= and "
                    "give the command its own option, or a config file")


def _declared_by(cls: type, name: str) -> type:
    """The first class in ``cls``'s bases (``cls`` itself last) that declares field ``name``."""
    return next(k for k in reversed(cls.__mro__) if name in k.__dict__.get("__annotations__", {}))


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def add_options(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
                positional: Sequence[str] = (), required: bool | None = None,
                types: dict[str, Callable] | None = None, choices: dict[str, Sequence] | None = None) -> None:
    """Add an option ``--field-name`` for each field of dataclass ``cls`` (but those in ``skip``).

    Its type comes from the annotation (int, float, str; ``X | None``; ``Literal[...]`` gives
    choices; ``list[int]``, ``list[float]``, ``list[str]`` take one or more values), its help from
    the field's comment (``field_help``) with the dataclass default appended; for a None default,
    the comment's "(None: ...)" says what happens without the option. A bool field is a switch:
    ``--x`` when it defaults to False, ``--no-x`` when True. The fields named in ``positional``
    are positional arguments instead, in that order (optional where the field has a default). A
    field without a default is a required option, unless ``required`` says otherwise for all.
    ``types`` and ``choices`` add command-line checks to named fields (a file that must exist, a
    count that must be positive); defaults are never given here. The options hold no default of
    their own (argparse.SUPPRESS), so ``options_to_config`` leaves an option not given to the
    dataclass. A field no option can hold (a dict, a nested dataclass) raises TypeError unless
    skipped.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    types, choices = types or {}, choices or {}
    unknown = sorted((set(skip) | set(positional) | set(types) | set(choices)) - set(fields))
    if unknown:
        raise TypeError(f"{cls.__name__} has no fields {unknown}")
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    for name in positional:
        kind, allowed, many = _option_type(cls, name, hints[name])
        default = _default(fields[name])
        if many:
            nargs = "+" if default is dataclasses.MISSING else "*"
        else:
            nargs = None if default is dataclasses.MISSING else "?"
        parser.add_argument(name, type=types.get(name, kind), choices=choices.get(name, allowed), nargs=nargs,
                            default=argparse.SUPPRESS, help=helps.get(name, "").replace("%", "%%") or None)
    groups: dict[type, argparse._ActionsContainer] = {cls: parser}
    for name, f in fields.items():
        if name in skip or name in positional:
            continue
        base = _declared_by(cls, name)
        if base not in groups:  # a base class's fields (Execution's: where the stage runs) under its title
            doc = (base.__doc__ or "").strip()
            doc = None if doc.startswith(f"{base.__name__}(") else doc.split("\n")[0]  # dataclass's own __doc__
            groups[base] = parser.add_argument_group(f"{base.__name__.lower()} options", doc)
        kind, allowed, many = _option_type(cls, name, hints[name])
        default, text = _default(f), helps.get(name, "")
        kwargs: dict = {"dest": name, "default": argparse.SUPPRESS}
        option = flag(name)
        if kind is bool:
            if default is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{name}: a bool field needs a default to be a switch")
            if default:
                option, kwargs["action"], text = flag("no_" + name), "store_false", f"turn off: {text}"
            else:
                kwargs["action"] = "store_true"
        else:
            kwargs.update(type=types.get(name, kind), choices=choices.get(name, allowed), nargs="+" if many else None,
                          required=default is dataclasses.MISSING if required is None else required)
            if default is None:  # the comment's "(None: what happens)" is what happens without the option
                text = text.replace("(None: ", "(default: ")
            elif default is not dataclasses.MISSING:
                shown = " ".join(map(str, default)) if many else default
                text = f"{text} (default: {shown})".strip()
        kwargs["help"] = text.replace("%", "%%") or None
        groups[base].add_argument(option, **kwargs)


def given_options(cls: type, args: argparse.Namespace) -> dict:
    """The fields of ``cls`` the command line set (``add_options`` leaves the others out of ``args``)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.init and hasattr(args, f.name)}


def options_to_config(cls: type, args: argparse.Namespace, **fixed):
    """Dataclass ``cls`` from the options of ``add_options``: the ones given, ``fixed`` on top, the
    dataclass's defaults for the rest. A required field neither given nor fixed is an InputError."""
    values = given_options(cls, args) | fixed
    missing = [flag(f.name) for f in dataclasses.fields(cls) if f.init and f.name not in values
               and _default(f) is dataclasses.MISSING]
    if missing:
        raise InputError(f"missing {', '.join(missing)}")
    return cls(**values)
