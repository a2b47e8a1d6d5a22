"""Exporting (pruned) models.

- Hugging Face format: :func:`save_pretrained` (saving lives in :mod:`lorashear.models.saving`,
  loading in :mod:`lorashear.models.loading`; both are re-exported here for compatibility).
- GGUF for llama.cpp: :func:`export_gguf` (:mod:`lorashear.export.gguf`): uniform models as the
  ``llama`` architecture, models whose layers differ as ``deci`` with per-layer widths.
"""

from ..models.loading import load_pretrained
from ..models.saving import save_pretrained
from .gguf import GGUFExport, export_gguf

__all__ = ["GGUFExport", "export_gguf", "load_pretrained", "save_pretrained"]
