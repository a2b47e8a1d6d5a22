"""Save (pruned) models in Hugging Face format: safetensors, ``config.json`` and the tokenizer.

Uniform models reload with plain ``AutoModelForCausalLM.from_pretrained``; models
whose layers differ carry ``per_layer_config`` and reload with
:func:`lorashear.models.loading.load_pretrained`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_directory

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def save_pretrained(model: "torch.nn.Module", path: str | os.PathLike[str],
                    tokenizer: "PreTrainedTokenizerBase | None" = None) -> Path:
    """Write ``model`` (safetensors + config.json) and ``tokenizer`` to ``path`` atomically.

    A peft-wrapped model is merged first (``merge_and_unload``) so the directory
    holds a plain transformers model.
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    path = Path(path)
    with atomic_directory(path) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path
