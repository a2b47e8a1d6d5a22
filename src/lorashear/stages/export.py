"""The export stage: a (pruned) model directory -> one file a serving engine runs.

Recipe::

    export_gguf(config.model, config.out, outtype=config.outtype, empty_ffn=config.empty_ffn)

``format="gguf"`` is the one format so far (llama.cpp: ``llama`` for uniform models, ``deci``
for models whose layers differ; see :mod:`lorashear.export.gguf`). Hugging Face directories
are what ``prune`` and ``recover`` already write.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..export.gguf import EMPTY_FFN_POLICIES, OUTTYPES, GGUFExport

#: formats the stage writes
FORMATS: tuple[str, ...] = ("gguf",)


@dataclass
class ExportConfig:
    """What ``lorashear export`` writes."""

    model: str = field(default="", metadata={"help": "model directory, hub id or built-in name", "cli": False})
    out: str = field(default="", metadata={"help": "the file to write (FILE.gguf)", "cli": False})
    format: str = field(default="gguf", metadata={"help": f"output format: {', '.join(FORMATS)}"})
    outtype: str = field(default="f16", metadata={
        "help": f"tensor type: {', '.join(OUTTYPES)} (1-D tensors stay f32; q8_0 falls back to f16 for row "
                "widths not divisible by 32, and says which)"})
    empty_ffn: str = field(default="pad", metadata={
        "help": "a layer with attention but no FFN channel left: 'pad' writes one zero FFN channel (exact; "
                "llama.cpp would drop that layer's attention), 'refuse' stops"})
    tokenizer_pre: str | None = field(default=None, metadata={
        "help": "llama.cpp pre-tokenizer name (default: recognised from the tokenizer, else 'default')"})

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"unknown export format {self.format!r}; use one of {', '.join(FORMATS)}")
        if self.outtype not in OUTTYPES:
            raise ConfigError(f"unknown --outtype {self.outtype!r}; use one of {', '.join(OUTTYPES)}")
        if self.empty_ffn not in EMPTY_FFN_POLICIES:
            raise ConfigError(f"unknown --empty-ffn {self.empty_ffn!r}; use one of {', '.join(EMPTY_FFN_POLICIES)}")


@dataclass
class ExportResult:
    """What the export stage wrote (``gguf`` holds every tensor, fallback and per-layer width)."""

    model: str
    format: str
    path: str
    seconds: float
    gguf: GGUFExport = field(repr=False)

    @property
    def arch(self) -> str:
        return self.gguf.arch

    @property
    def fallbacks(self) -> list[dict[str, Any]]:
        return self.gguf.fallbacks

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format, "path": self.path, "seconds": self.seconds,
                "gguf": self.gguf.to_dict()}


def run(config: ExportConfig, *, model: Any = None, tokenizer: Any = None) -> ExportResult:
    """Export ``config.model`` (or the loaded ``model`` with ``tokenizer``) to ``config.out``."""
    from ..export.gguf import export_gguf

    if model is None and not config.model:
        raise ConfigError("no model given")
    if not config.out:
        raise ConfigError("no output file given (--out FILE.gguf)")
    start = time.perf_counter()
    written = export_gguf(model if model is not None else config.model, config.out, tokenizer=tokenizer,
                          outtype=config.outtype, empty_ffn=config.empty_ffn, tokenizer_pre=config.tokenizer_pre)
    return ExportResult(model=config.model or type(model).__name__, format=config.format, path=written.path,
                        seconds=time.perf_counter() - start, gguf=written)
