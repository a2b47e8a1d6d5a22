"""Models: loading (hub ids, local directories, the built-in reference model), saving, per-family
adapters (:mod:`.adapters`) and LoRA attachment (:mod:`.lora`, imported on use: it needs torch)."""

from .loading import load_model, load_pretrained, load_tokenizer, resolve_model_path
from .reference import REFERENCE_MODEL_NAME, ensure_reference_model
from .saving import save_pretrained

__all__ = ["REFERENCE_MODEL_NAME", "ensure_reference_model", "load_model", "load_pretrained", "load_tokenizer",
           "resolve_model_path", "save_pretrained"]
