"""Typed configs as dataclasses, shared by the CLI, YAML files and the Python API.

A stage config is a dataclass composed of component configs (LoRA, LHSPG, the
training loop, data, ...). A component is embedded with :func:`section`; its
fields become *flat options* named ``prefix + field`` (``LoraSettings.r`` with
prefix ``lora_`` is ``--lora-r`` on the command line and ``lora_r`` in YAML).
Every option is declared once, in the component that owns it; a flat name may
be overridden with ``metadata={"name": ...}``.

One resolver serves every command::

    parser = argparse.ArgumentParser(); add_config_arguments(parser, PruneConfig)
    config = resolve_config(PruneConfig, parser.parse_args(argv), yaml_path=args.config)

Values come from the dataclass defaults, then the YAML file (flat keys, or
nested ``section: {field: value}`` mappings), then the flags actually given.
An unknown key or a value of the wrong type is rejected with one line naming
it (:class:`~lorashear.errors.ConfigError`, exit code 2 on the CLI); each
dataclass's ``__post_init__`` validates ranges. :func:`to_json_dict` records a
resolved config (nested) with the library version; :func:`to_flat_dict` gives
the flat form that ``--config`` reads back.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ._version import __version__
from .errors import ConfigError

T = TypeVar("T")


def section(cls: type, *, prefix: str = "", help: str = "", **defaults: Any) -> Any:
    """A component config embedded in a stage config; ``defaults`` override the component's own."""

    def make() -> Any:
        return cls(**defaults)

    return dataclasses.field(default_factory=make, metadata={"section": True, "prefix": prefix, "help": help,
                                                             "defaults": dict(defaults)})


@dataclass(frozen=True)
class Option:
    """One flat option: where it lives in the nested config and what type it has."""

    key: str                      #: flat name (``lora_r``); the flag is ``--lora-r``
    path: tuple[str, ...]         #: attribute path in the nested config (``("lora", "r")``)
    type: Any                     #: the field's annotation
    field: dataclasses.Field      #: the dataclass field
    default: Any                  #: default as seen from the stage config

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def cli(self) -> bool:
        return self.field.metadata.get("cli", True) is not False


def _is_section(f: dataclasses.Field) -> bool:
    return bool(f.metadata.get("section"))


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def options(cls: type) -> dict[str, Option]:
    """Every flat option of ``cls`` (sections expanded), keyed by flat name."""
    out: dict[str, Option] = {}
    _collect(cls, (), "", {}, out)
    return out


def sections(cls: type) -> dict[str, tuple[str, ...]]:
    """Section attribute name -> path, for nested YAML mappings (``lora: {r: 8}``)."""
    out: dict[str, tuple[str, ...]] = {}

    def walk(c: type, path: tuple[str, ...]) -> None:
        for f in dataclasses.fields(c):
            if _is_section(f):
                out.setdefault(f.name, path + (f.name,))
                walk(_section_type(c, f), path + (f.name,))

    walk(cls, ())
    return out


def _section_type(owner: type, f: dataclasses.Field) -> type:
    tp = typing.get_type_hints(owner)[f.name]
    tp, _ = _unwrap_optional(tp)
    if not dataclasses.is_dataclass(tp):
        raise TypeError(f"section {owner.__name__}.{f.name} must be a dataclass type, got {tp!r}")
    return tp  # type: ignore[return-value]


def _collect(cls: type, path: tuple[str, ...], prefix: str, overrides: dict[str, Any],
             out: dict[str, Option]) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if _is_section(f):
            sub = _section_type(cls, f)
            _collect(sub, path + (f.name,), prefix + f.metadata.get("prefix", ""),
                     dict(f.metadata.get("defaults", {})), out)
            continue
        key = f.metadata.get("name") or prefix + f.name
        if key in out:
            raise TypeError(f"option {key!r} is declared twice in {cls.__name__} "
                            f"({'.'.join(out[key].path)} and {'.'.join(path + (f.name,))})")
        default = overrides[f.name] if f.name in overrides else _field_default(f)
        out[key] = Option(key, path + (f.name,), hints[f.name], f, default)


# -- types -----------------------------------------------------------------------------------
def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    tp, optional = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        name = "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    elif origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        name = f"a list of {_type_name(args[0]) if args else 'values'}"
    else:
        name = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
            tp, getattr(tp, "__name__", str(tp)))
    return name + (" (or null)" if optional else "")


class _BadValue(Exception):
    pass


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (YAML/API values), or :class:`_BadValue`."""
    inner, optional = _unwrap_optional(tp)
    if value is None:
        if optional or tp is Any:
            return None
        raise _BadValue
    tp = inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise _BadValue
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        item = args[0] if args else Any
        if isinstance(value, str):
            value = [p.strip() for p in value.split(",") if p.strip()]
            if item in (int, float):
                try:
                    value = [item(v) for v in value]
                except ValueError as exc:
                    raise _BadValue from exc
        if not isinstance(value, (list, tuple)):
            raise _BadValue
        items = [coerce(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, dict):
            raise _BadValue
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _BadValue
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _BadValue
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _BadValue
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, Path):
            return str(value)
        raise _BadValue
    return value


# -- argparse --------------------------------------------------------------------------------
def _parse_list(item_type: Any):
    def parse(text: str) -> list[Any]:
        parts = [p.strip() for p in str(text).split(",") if p.strip()]
        try:
            return [item_type(p) for p in parts]
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {item_type.__name__}: {text!r}") from exc

    return parse


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """One ``--flag`` per flat option of ``cls`` (defaults stay in the dataclass)."""
    group = parser.add_argument_group(cls.__name__)
    for opt in options(cls).values():
        if opt.key in exclude or not opt.cli:
            continue
        tp, _ = _unwrap_optional(opt.type)
        help_text = opt.field.metadata.get("help", "").replace("%", "%%")
        if opt.default not in (None, "", ()):
            shown = ",".join(map(str, opt.default)) if isinstance(opt.default, (list, tuple)) else opt.default
            help_text = f"{help_text} (default: {shown})"
        kwargs: dict[str, Any] = {"dest": opt.key, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool:
            group.add_argument(opt.flag, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        origin = typing.get_origin(tp)
        if origin in (list, tuple):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            item = args[0] if args else str
            kwargs["type"] = _parse_list(item)
            kwargs["metavar"] = f"{getattr(item, '__name__', 'VALUE').upper()}[,...]"
        elif origin is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
        elif tp in (int, float, str):
            kwargs["type"] = tp
        else:
            kwargs["type"] = str
        group.add_argument(opt.flag, **kwargs)


def add_config_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="options from a YAML file, with the same names as the flags (flags win)")


# -- resolution ------------------------------------------------------------------------------
def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(f"config file {path} is not valid YAML{at}; fix its syntax") from exc
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option: value")
    return data


def flatten_values(cls: type, values: Mapping[str, Any], *, source: str = "config") -> dict[str, Any]:
    """Flat ``key -> value`` from flat keys and nested section mappings; unknown keys rejected."""
    opts = options(cls)
    secs = sections(cls)
    flat: dict[str, Any] = {}

    def unknown(key: str) -> ConfigError:
        close = difflib.get_close_matches(key, list(opts) + list(secs), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see `--help` for the options"
        return ConfigError(f"unknown option {key!r} in {source}{hint}")

    def visit(mapping: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for raw_key, value in mapping.items():
            key = str(raw_key).replace("-", "_")
            sub_path = path + (key,)
            sec_match = [name for name, p in secs.items() if p == sub_path] if path else (
                [key] if key in secs else [])
            if sec_match and isinstance(value, Mapping):
                visit(value, sub_path)
                continue
            if path:
                match = [o.key for o in opts.values() if o.path == sub_path]
                if not match:
                    raise unknown(".".join(sub_path))
                key = match[0]
            elif key not in opts:
                raise unknown(key)
            flat[key] = value

    visit(values, ())
    return flat


def _check_types(cls: type, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    opts = options(cls)
    out = {}
    for key, value in values.items():
        opt = opts[key]
        try:
            out[key] = coerce(value, opt.type)
        except _BadValue:
            raise ConfigError(f"option {key!r} in {source} must be {_type_name(opt.type)}, got {value!r}") from None
    return out


def apply_recipe(cls: type, flat: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Fill options not in ``flat`` from the recipe it names (``cls.RECIPES``, option ``recipe``)."""
    recipes = getattr(cls, "RECIPES", None)
    opts = options(cls)
    if not recipes or "recipe" not in opts:
        return {**_preset_flags(cls, flat), **flat}
    name = flat.get("recipe", opts["recipe"].default)
    if name not in recipes:
        raise ConfigError(f"unknown recipe {name!r} in {source}; choose from {', '.join(recipes)}")
    preset = _check_types(cls, recipes[name], f"recipe {name}")
    return {**preset, **_preset_flags(cls, flat), **flat}


def _preset_flags(cls: type, flat: dict[str, Any]) -> dict[str, Any]:
    """Options filled by boolean preset flags that are on (``cls.PRESET_FLAGS``: flag -> values).

    They sit between the recipe and what the user gave: ``--quick --steps 40`` runs 40 steps.
    """
    filled: dict[str, Any] = {}
    for flag, values in getattr(cls, "PRESET_FLAGS", {}).items():
        if flat.get(flag):
            filled.update(_check_types(cls, values, f"preset {flag}"))
    return filled


def build_config(cls: type[T], flat: Mapping[str, Any]) -> T:
    """Construct the nested config ``cls`` from already-checked flat values."""
    opts = options(cls)
    by_path: dict[tuple[str, ...], Any] = {opts[k].path: v for k, v in flat.items()}

    def make(c: type, path: tuple[str, ...], defaults: dict[str, Any]) -> Any:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(c):
            if not f.init:
                continue
            p = path + (f.name,)
            if _is_section(f):
                sub_defaults = dict(f.metadata.get("defaults", {}))
                if any(q[: len(p)] == p for q in by_path) or sub_defaults:
                    kwargs[f.name] = make(_section_type(c, f), p, sub_defaults)
            elif p in by_path:
                kwargs[f.name] = by_path[p]
            elif f.name in defaults:
                kwargs[f.name] = defaults[f.name]
        try:
            return c(**kwargs)
        except TypeError as exc:
            raise ConfigError(f"bad options for {c.__name__}: {exc}") from exc

    return make(cls, (), {})


def config_from_dict(cls: type[T], values: Mapping[str, Any], *, source: str = "config") -> T:
    """``cls`` from flat or nested values (YAML, Python), with unknown keys and wrong types rejected."""
    flat = _check_types(cls, flatten_values(cls, values, source=source), source)
    return build_config(cls, apply_recipe(cls, flat, source))


def resolve_config(cls: type[T], namespace: argparse.Namespace | None = None, *, yaml_path: str | Path | None = None,
                   fixed: Mapping[str, Any] | None = None) -> T:
    """Defaults, then the YAML file, then flags given on the command line, then ``fixed`` (positionals)."""
    values: dict[str, Any] = {}
    if yaml_path:
        source = str(yaml_path)
        values.update(_check_types(cls, flatten_values(cls, load_yaml(yaml_path), source=source), source))
    opts = options(cls)
    if namespace is not None:
        # Only the flags add_config_arguments registered: an option with "cli": False (MODEL, --out)
        # shares its dest with a positional whose None must not hide the YAML value; it comes via ``fixed``.
        flags = {k: v for k, v in vars(namespace).items() if k in opts and opts[k].cli}
        values.update(_check_types(cls, flags, "arguments"))
    if fixed:
        values.update(_check_types(cls, {k: v for k, v in fixed.items() if v is not None}, "arguments"))
    return build_config(cls, apply_recipe(cls, values, str(yaml_path or "arguments")))


# -- compatibility with flat single-dataclass callers -----------------------------------------
def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    add_config_arguments(parser, cls, exclude=exclude)


def dataclass_from_dict(cls: type[T], values: dict[str, Any]) -> T:
    return config_from_dict(cls, values)


def check_known_keys(values: dict[str, Any], *classes: type) -> None:
    """Reject keys that belong to none of ``classes`` (a typo must not pass silently)."""
    names = {k for cls in classes for k in options(cls)} | {k for cls in classes for k in sections(cls)}
    bad = sorted(k for k in values if k.replace("-", "_") not in names)
    if bad:
        raise ConfigError(f"unknown option(s) in config file: {', '.join(bad)}")


def dataclass_from_args(cls: type[T], namespace: argparse.Namespace, yaml_values: dict[str, Any] | None = None) -> T:
    """Build ``cls`` from YAML values (already loaded; keys of other classes ignored) overridden by flags."""
    opts = options(cls)
    values = {k.replace("-", "_"): v for k, v in (yaml_values or {}).items() if k.replace("-", "_") in opts}
    checked = _check_types(cls, values, "config file")
    checked.update(_check_types(cls, {k: v for k, v in vars(namespace).items() if k in opts}, "arguments"))
    return build_config(cls, checked)


# -- records ---------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Path):
        return str(value)
    return value


def to_json_dict(config: Any) -> dict[str, Any]:
    """Config as a JSON-ready nested dict, with the lorashear version that produced it."""
    out = _jsonable(config)
    out["lorashear_version"] = __version__
    return out


def to_flat_dict(config: Any) -> dict[str, Any]:
    """Config as flat ``option: value`` (what ``--config`` reads back)."""
    out = {}
    for key, opt in options(type(config)).items():
        value: Any = config
        for part in opt.path:
            value = getattr(value, part)
        out[key] = _jsonable(value)
    return out


def dumps(config: Any) -> str:
    return json.dumps(to_json_dict(config), indent=2)
