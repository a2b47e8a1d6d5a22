"""Model loading: hub ids, local directories and the built-in reference model."""

from .loading import load_model, load_tokenizer, resolve_model_path
from .reference import REFERENCE_MODEL_NAME, ensure_reference_model

__all__ = ["REFERENCE_MODEL_NAME", "ensure_reference_model", "load_model", "load_tokenizer", "resolve_model_path"]
