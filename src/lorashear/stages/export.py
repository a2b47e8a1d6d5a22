"""The export stage: a (pruned) model directory -> one file a serving engine runs.

Recipe::

    export_gguf(config.model, config.out, outtype=config.outtype, empty_ffn=config.empty_ffn)
    probe_llama_cpp(config.out)   # with check_llama_cpp: does the installed llama.cpp run it here?

Formats are a registry (:mod:`lorashear.export.formats`); ``gguf`` is the one so far (llama.cpp:
``llama`` for uniform models, ``deci`` for models whose layers differ; see :mod:`lorashear.export.gguf`).
Hugging Face directories are what ``prune`` and ``recover`` already write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..atomic import validate_out_file
from ..errors import ConfigError
from ..export.formats import FORMATS as REGISTRY
from ..export.formats import get_format
from ..export.gguf import EMPTY_FFN_POLICIES, OUTTYPES
from ..export.llama_cpp_check import LlamaCppCheck

logger = logging.getLogger(__name__)

#: formats the stage writes (the registry's names)
FORMATS: tuple[str, ...] = tuple(REGISTRY)


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
    check_llama_cpp: bool = field(default=True, metadata={
        "help": "after writing, load the file in the installed llama.cpp (llama-cpp-python) in a subprocess and "
                "evaluate a 2-token prompt; a warning says if it cannot run it on this CPU (skipped when "
                "llama-cpp-python is not installed)"})

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if self.outtype not in fmt.outtypes:
            raise ConfigError(f"unknown --outtype {self.outtype!r}; use one of {', '.join(fmt.outtypes)}")
        if self.empty_ffn not in EMPTY_FFN_POLICIES:
            raise ConfigError(f"unknown --empty-ffn {self.empty_ffn!r}; use one of {', '.join(EMPTY_FFN_POLICIES)}")


@dataclass
class ExportResult:
    """What the export stage wrote: ``written`` is the format writer's record (for ``gguf``, a
    :class:`~lorashear.export.gguf.GGUFExport`: every tensor, fallback and per-layer width)."""

    model: str
    format: str
    path: str
    seconds: float
    written: Any = field(repr=False)
    llama_cpp: LlamaCppCheck | None = None  #: the engine check (None: not asked for, or the format has none)

    @property
    def gguf(self) -> Any:
        if self.format != "gguf":
            raise AttributeError(f"a {self.format} export has no GGUF record")
        return self.written

    @property
    def arch(self) -> str:
        return self.written.arch

    @property
    def fallbacks(self) -> list[dict[str, Any]]:
        return self.written.fallbacks

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format, "path": self.path, "seconds": self.seconds,
                self.format: self.written.to_dict(),
                "llama_cpp": self.llama_cpp.to_dict() if self.llama_cpp else None}


def check_llama_cpp(path: str, fmt: str = "gguf") -> LlamaCppCheck | None:
    """Probe ``path`` in the format's engine; warn in one line when it cannot run the file here."""
    probe = get_format(fmt).probe
    if probe is None:
        return None
    check = probe(path)
    if check.status in ("crashed", "failed", "timeout"):
        logger.warning("%s", check.message)
    else:
        logger.info("%s", check.message)
    return check


def run(config: ExportConfig, *, model: Any = None, tokenizer: Any = None) -> ExportResult:
    """Export ``config.model`` (or the loaded ``model`` with ``tokenizer``) to ``config.out``."""
    from ..models.loading import check_causal_lm

    if model is None and not config.model:
        raise ConfigError("no model given")
    if not config.out:
        raise ConfigError("no output file given (--out FILE.gguf)")
    validate_out_file(config.out)
    fmt = get_format(config.format)
    if model is None:
        check_causal_lm(config.model)
        fmt.check(config.model)
    start = time.perf_counter()
    written = fmt.write(model if model is not None else config.model, config.out, tokenizer=tokenizer,
                        outtype=config.outtype, **{name: getattr(config, name) for name in fmt.options})
    seconds = time.perf_counter() - start
    checked = check_llama_cpp(written.path, config.format) if config.check_llama_cpp else None
    return ExportResult(model=config.model or type(model).__name__, format=config.format, path=written.path,
                        seconds=seconds, written=written, llama_cpp=checked)
