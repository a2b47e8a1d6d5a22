"""Exporting (pruned) models.

- Hugging Face format: :func:`save_pretrained` (saving lives in :mod:`lorashear.models.saving`,
  loading in :mod:`lorashear.models.loading`; both are re-exported here for compatibility).
- GGUF for llama.cpp: :func:`export_gguf` (:mod:`lorashear.export.gguf`): uniform models as the
  ``llama`` architecture, models whose layers differ as ``deci`` with per-layer widths.
- Does the installed llama.cpp run a file on this CPU? :func:`probe_llama_cpp`
  (:mod:`lorashear.export.llama_cpp_check`; a 2-token prompt in a subprocess).
"""

from ..models.loading import load_pretrained
from ..models.saving import save_pretrained
from .gguf import GGUFExport, export_gguf
from .llama_cpp_check import LlamaCppCheck, probe_llama_cpp

__all__ = ["GGUFExport", "LlamaCppCheck", "export_gguf", "load_pretrained", "probe_llama_cpp", "save_pretrained"]
