"""What every stage command shares: flags and ``--config`` from one config dataclass."""

from __future__ import annotations

import argparse
from typing import Any, TypeVar

from ..config import add_config_arguments, add_config_file_argument, resolve_config

T = TypeVar("T")


def add_stage_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """``--config YAML`` plus one flag per option of ``cls``."""
    add_config_file_argument(parser)
    add_config_arguments(parser, cls, exclude=exclude)


def stage_config(cls: type[T], args: argparse.Namespace, **fixed: Any) -> T:
    """``cls`` from defaults < ``--config`` YAML < flags < ``fixed`` (positionals given on the command line)."""
    return resolve_config(cls, args, yaml_path=getattr(args, "config", None), fixed=fixed)
