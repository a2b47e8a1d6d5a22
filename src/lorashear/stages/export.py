"""The export stage: a (pruned) model directory -> one file a serving engine runs.

Recipe::

    export_gguf(config.model, config.out, outtype=config.outtype, empty_ffn=config.empty_ffn)
    probe_llama_cpp(config.out)   # with check_llama_cpp: does the installed llama.cpp run it here?

``format="gguf"`` is the one format so far (llama.cpp: ``llama`` for uniform models, ``deci``
for models whose layers differ; see :mod:`lorashear.export.gguf`). Hugging Face directories
are what ``prune`` and ``recover`` already write.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ..atomic import validate_out_file
from ..errors import ConfigError
from ..export import llama_cpp_check
from ..export.gguf import EMPTY_FFN_POLICIES, OUTTYPES, GGUFExport
from ..export.llama_cpp_check import LlamaCppCheck

logger = logging.getLogger(__name__)

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
    check_llama_cpp: bool = field(default=True, metadata={
        "help": "after writing, load the file in the installed llama.cpp (llama-cpp-python) in a subprocess and "
                "evaluate a 2-token prompt; a warning says if it cannot run it on this CPU (skipped when "
                "llama-cpp-python is not installed)"})

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
    llama_cpp: LlamaCppCheck | None = None  #: the llama.cpp check (None: not asked for)

    @property
    def arch(self) -> str:
        return self.gguf.arch

    @property
    def fallbacks(self) -> list[dict[str, Any]]:
        return self.gguf.fallbacks

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "format": self.format, "path": self.path, "seconds": self.seconds,
                "gguf": self.gguf.to_dict(), "llama_cpp": self.llama_cpp.to_dict() if self.llama_cpp else None}


def check_llama_cpp(path: str) -> LlamaCppCheck:
    """Probe ``path`` in the installed llama.cpp; warn in one line when it cannot run the file here."""
    check = llama_cpp_check.probe_llama_cpp(path)
    if check.status in ("crashed", "failed", "timeout"):
        logger.warning("%s", check.message)
    else:
        logger.info("%s", check.message)
    return check


def run(config: ExportConfig, *, model: Any = None, tokenizer: Any = None) -> ExportResult:
    """Export ``config.model`` (or the loaded ``model`` with ``tokenizer``) to ``config.out``."""
    from ..export.gguf import check_exportable, export_gguf
    from ..models.loading import check_causal_lm

    if model is None and not config.model:
        raise ConfigError("no model given")
    if not config.out:
        raise ConfigError("no output file given (--out FILE.gguf)")
    validate_out_file(config.out)
    if model is None:
        check_causal_lm(config.model)
        check_exportable(config.model)
    start = time.perf_counter()
    written = export_gguf(model if model is not None else config.model, config.out, tokenizer=tokenizer,
                          outtype=config.outtype, empty_ffn=config.empty_ffn, tokenizer_pre=config.tokenizer_pre)
    seconds = time.perf_counter() - start
    checked = check_llama_cpp(written.path) if config.check_llama_cpp else None
    return ExportResult(model=config.model or type(model).__name__, format=config.format, path=written.path,
                        seconds=seconds, gguf=written, llama_cpp=checked)
