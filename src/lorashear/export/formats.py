"""Export formats as a registry: what ``lorashear export --format NAME`` and ``lorashear run --export NAME`` write.

A format is one :class:`ExportFormat` registered with :func:`register_format`: its file suffix, its tensor
types, a check that a model directory can be written (before any work, from its files alone), the writer,
and optionally a probe that the installed engine runs the written file on this machine. A new format is
one such entry (its writer in its own module). ``gguf`` (llama.cpp) is the one format so far.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str                                   #: the written file's suffix, e.g. ``.gguf``
    outtypes: tuple[str, ...]                     #: tensor types, the first the default
    options: tuple[str, ...]                      #: the ExportConfig options its writer takes
    check: Callable[[str], None]                  #: refuse a model directory it cannot write (one line)
    #: ``write(model, out, *, tokenizer, outtype, **options)`` -> the record of what was written (``.path``,
    #: ``.to_dict()``)
    write: Callable[..., Any]
    probe: Callable[[str], Any] | None = None     #: does the installed engine run the file here?


FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    FORMATS[fmt.name] = fmt
    return fmt


def get_format(name: str) -> ExportFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown export format {name!r}; use one of {', '.join(FORMATS)}")
    return FORMATS[name]


def _gguf_check(model: str) -> None:
    from .gguf import check_exportable

    check_exportable(model)


def _gguf_write(model: Any, out: str, *, tokenizer: Any, outtype: str, **options: Any) -> Any:
    from .gguf import export_gguf

    return export_gguf(model, out, tokenizer=tokenizer, outtype=outtype, **options)


def _gguf_probe(path: str) -> Any:
    from .llama_cpp_check import probe_llama_cpp

    return probe_llama_cpp(path)


def _register_gguf() -> None:
    from .gguf import OUTTYPES

    register_format(ExportFormat(name="gguf", suffix=".gguf", outtypes=("f16", *[t for t in OUTTYPES if t != "f16"]),
                                 options=("empty_ffn", "tokenizer_pre"), check=_gguf_check, write=_gguf_write,
                                 probe=_gguf_probe))


_register_gguf()

__all__ = ["FORMATS", "ExportFormat", "get_format", "register_format"]
