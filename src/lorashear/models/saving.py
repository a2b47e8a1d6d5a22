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
from ..errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


def write_pretrained(model: "torch.nn.Module", directory: str | os.PathLike[str],
                     tokenizer: "PreTrainedTokenizerBase | None" = None) -> Path:
    """Write ``model`` (safetensors + config.json) and ``tokenizer`` into the existing ``directory``
    (not atomic: a stage calls it inside its own :func:`~lorashear.atomic.atomic_directory`).

    A peft-wrapped model is merged first (``merge_and_unload``).
    """
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def save_pretrained(model: "torch.nn.Module", path: str | os.PathLike[str],
                    tokenizer: "PreTrainedTokenizerBase | None" = None) -> Path:
    """Write ``model`` (safetensors + config.json) and ``tokenizer`` to ``path`` atomically.

    A peft-wrapped model is merged first (``merge_and_unload``) so the directory
    holds a plain transformers model. An existing directory is replaced as a whole (no file of
    an earlier model survives beside the new one); an existing regular file is refused.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file; save_pretrained writes a directory, choose another path")
    with atomic_directory(path) as tmp:
        write_pretrained(model, tmp, tokenizer)
    return path
