"""Compatibility re-exports: saving lives in :mod:`lorashear.models.saving`, loading in
:mod:`lorashear.models.loading`."""

from .models.loading import load_pretrained
from .models.saving import save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
