"""Training configs are typed dataclasses; this module turns one into a command line and a config-file reader.

Each field ``learning_rate`` is the flag ``--learning-rate`` and the key ``learning_rate`` (or ``learning-rate``) in a
YAML or TOML file passed with ``--config``. Precedence: field defaults < config file < flags. Types come from the
annotations (``int``, ``float``, ``str``, ``bool``, ``Literal[...]``, ``X | None``, ``list[str]``), help texts from
``field(metadata={"help": ...})``. An unknown key, a value of the wrong type or a choice outside a ``Literal`` is an
error that names the field and the allowed values; cross-field rules live in the dataclass's ``validate()``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from common.files import NotUTF8Error, read_utf8
from ldm.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A bad config key or value; the message names the field and what is allowed (a :class:`UserError`, so a
    command reports it in one line)."""


def help_field(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with a help text (list defaults are copied per instance)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _describe(tp: Any) -> str:
    inner, optional = _unwrap_optional(tp)
    if get_origin(inner) is Literal:
        text = "one of " + ", ".join(repr(a) for a in get_args(inner))
    elif get_origin(inner) is list:
        text = f"a list of {get_args(inner)[0].__name__}"
    else:
        text = {int: "an int", float: "a float", str: "a string", bool: "true or false"}.get(inner, str(inner))
    return text + (" or null" if optional else "")


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check (and, for strings from the command line, convert) ``value`` against the annotation ``tp``."""
    inner, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{name} must be {_describe(tp)}; got null")
    try:
        if get_origin(inner) is Literal:
            choices = get_args(inner)
            if value not in choices:
                raise ConfigError(f"{name} must be {_describe(tp)}; got {value!r}")
            return value
        if get_origin(inner) is list:
            (item_type,) = get_args(inner)
            items = [value] if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ConfigError(f"{name} must be {_describe(tp)}; got {value!r}")
            return [coerce(name, v, item_type) for v in items]
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                return value.lower() in ("true", "yes", "1")
            raise ConfigError(f"{name} must be true or false; got {value!r}")
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ConfigError(f"{name} must be an int; got {value!r}")
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ConfigError(f"{name} must be a float; got {value!r}")
            return float(value)
        if inner is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ConfigError(f"{name} must be a string; got {value!r}")
            return str(value)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{name} must be {_describe(tp)}; got {value!r}") from None
    raise TypeError(f"unsupported config annotation {tp!r} for field {name}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``), TOML (``.toml``) or JSON (``.json``) file of ``key: value`` pairs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml, .toml or .json")
    try:
        text = read_utf8(path)
    except NotUTF8Error as err:
        raise ConfigError(f"config file {err}") from None
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib
        parse, errors = tomllib.loads, (tomllib.TOMLDecodeError,)
    elif path.suffix == ".json":
        parse, errors = json.loads, (json.JSONDecodeError,)
    else:
        import yaml

        parse, errors = (lambda text: yaml.safe_load(text) or {}), (yaml.YAMLError,)
    try:
        data = parse(text)
    except errors as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold key: value pairs at the top level")
    return data


def from_dict(cls: type[T], data: dict[str, Any], *, source: str = "config") -> T:
    """Build ``cls`` from a mapping of field names (``-`` or ``_``), rejecting unknown keys with suggestions."""
    types_ = _field_types(cls)
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types_:
            close = difflib.get_close_matches(name, list(types_), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown key {key!r} in {source}{hint}")
        values[name] = coerce(name, value, types_[name])
    config = cls(**values)
    if hasattr(config, "validate"):
        config.validate()
    return config


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain data (for logs, model cards and checkpoint metadata)."""
    return dataclasses.asdict(config)


def build_parser(cls: type, prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one flag per field of ``cls`` (all default to "not given") plus ``--config``."""
    parser = argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", help="a YAML/TOML/JSON file with the same keys as the flags (flags win)")
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        inner, _ = _unwrap_optional(tp)
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if inner is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        elif get_origin(inner) is list:
            parser.add_argument(flag, nargs="+", metavar="VALUE", help=help_text)
        elif get_origin(inner) is Literal:
            parser.add_argument(flag, metavar="{" + ",".join(map(str, get_args(inner))) + "}", help=help_text)
        else:
            parser.add_argument(flag, metavar=f.name.upper(), help=help_text)
    return parser


def parse_config(cls: type[T], argv: list[str] | None, *, prog: str, description: str) -> T:
    """Defaults < ``--config FILE`` < flags.

    An unknown flag exits as argparse does (status 2); a bad value, key or config file raises :class:`ConfigError`
    naming the field, which a command reports in one line (:func:`ldm.errors.run_reporting`).
    """
    parser = build_parser(cls, prog, description)
    args = vars(parser.parse_args(argv))
    config_file = args.pop("config", None)
    data = read_config_file(config_file) if config_file else {}
    data = {str(k).replace("-", "_"): v for k, v in data.items()}
    data.update(args)
    return from_dict(cls, data, source=f"config file {config_file}" if config_file else "the arguments")
