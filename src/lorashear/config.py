"""Typed configs as dataclasses, shared by the CLI, YAML files and the Python API.

Every field carries ``metadata={"help": ...}``; validation lives in each
dataclass's ``__post_init__`` and raises :class:`~lorashear.errors.ConfigError`.
:func:`add_dataclass_arguments` turns a dataclass into argparse options
(``field_name`` -> ``--field-name``), :func:`dataclass_from_args` builds the
dataclass back from the parsed namespace (YAML values first, then flags given
on the command line), and :func:`to_json_dict` records a config with the
library version so a run can be reproduced.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError

T = TypeVar("T")

_MISSING = object()


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _parse_list(item_type: Any):
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            return [item_type(p) for p in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}: {text!r}") from exc

    return parse


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """Add one ``--flag`` per field of dataclass ``cls`` (defaults stay in the dataclass)."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.init or f.metadata.get("cli") is False:
            continue
        tp, _optional = _unwrap_optional(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)  # type: ignore[misc]
        if default is not None and default != "":
            help_text = f"{help_text} (default: {default})"
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            item = typing.get_args(tp)[0] if typing.get_args(tp) else str
            kwargs["type"] = _parse_list(item)
            kwargs["metavar"] = f"{item.__name__.upper()}[,...]"
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        group.add_argument(flag, **kwargs)


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def dataclass_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in values if k.replace("-", "_") not in names)
    if unknown:
        raise ConfigError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        tp, _ = _unwrap_optional(hints[name])
        if typing.get_origin(tp) is tuple and isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"bad options for {cls.__name__}: {exc}") from exc


def check_known_keys(values: dict[str, Any], *classes: type) -> None:
    """Reject YAML keys that belong to none of ``classes`` (a typo must not pass silently)."""
    names = {f.name for cls in classes for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(k for k in values if k.replace("-", "_") not in names)
    if unknown:
        raise ConfigError(f"unknown option(s) in config file: {', '.join(unknown)}")


def dataclass_from_args(cls: type[T], namespace: argparse.Namespace, yaml_values: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from YAML values overridden by the flags given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k.replace("-", "_"): v for k, v in (yaml_values or {}).items() if k.replace("-", "_") in names}
    values.update({k: v for k, v in vars(namespace).items() if k in names})
    return dataclass_from_dict(cls, values)


def to_json_dict(config: Any) -> dict[str, Any]:
    """Config as JSON-ready dict, with the lorashear version that produced it."""
    from . import __version__

    def convert(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: convert(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [convert(v) for v in value]
        if isinstance(value, dict):
            return {str(k): convert(v) for k, v in value.items()}
        if isinstance(value, Path):
            return str(value)
        return value

    out = convert(config)
    out["lorashear_version"] = __version__
    return out


def dumps(config: Any) -> str:
    return json.dumps(to_json_dict(config), indent=2)
