"""Load a causal LM by hub id, local directory or built-in name.

Loading uses the real ``from_pretrained``; only the built-in name
:data:`~lorashear.models.reference.REFERENCE_MODEL_NAME` resolves to the
offline reference model. Directories written by :func:`lorashear.compact`
with per-layer sizes are rebuilt by :func:`lorashear.load_pretrained`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ModelNotFoundError
from .reference import ensure_reference_model, is_reference_name

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def resolve_dtype(dtype: "str | torch.dtype | None") -> "torch.dtype":
    import torch

    if dtype is None or dtype == "auto":
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise ModelNotFoundError(f"unknown dtype {dtype!r}; use one of float32, bfloat16, float16")
    return getattr(torch, _DTYPES[key])


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> str:
    """Map a user-supplied model name to something ``from_pretrained`` accepts.

    - the built-in reference name -> the converted local copy (converted on first use);
    - an existing local directory -> itself (it must contain ``config.json``);
    - anything else -> treated as a hub id.
    """
    text = os.fspath(name_or_path)
    if is_reference_name(text):
        return str(ensure_reference_model())
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"{text} is a file; pass the model directory that holds config.json")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{text} has no config.json; pass a Hugging Face model directory")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise ModelNotFoundError(f"model directory {text} does not exist")
    return text


def load_model(
    name_or_path: str | os.PathLike[str],
    dtype: "str | torch.dtype | None" = "float32",
    device: "str | torch.device | None" = None,
    *,
    attn_implementation: str | None = None,
) -> "PreTrainedModel":
    """Load a causal LM for pruning or evaluation.

    Args:
        name_or_path: a hub id (``meta-llama/Llama-3.1-8B``), a local directory, or
            ``"smollm2-135m-instruct"`` for the built-in offline reference model.
        dtype: parameter dtype (``float32``, ``bfloat16``, ``float16`` or a torch dtype).
        device: where to put the model (default: CPU).
        attn_implementation: forwarded to ``from_pretrained`` (default: the library's choice).

    Directories saved with per-layer sizes (``per_layer_config``) are rebuilt
    with those shapes.
    """
    from ..export import load_pretrained  # local import: export depends on graph code

    resolved = resolve_model_path(name_or_path)
    model = load_pretrained(resolved, dtype=resolve_dtype(dtype), attn_implementation=attn_implementation)
    if device is not None:
        model.to(device)
    model.eval()
    return model


def load_tokenizer(name_or_path: str | os.PathLike[str]) -> "PreTrainedTokenizerBase":
    """Load the tokenizer that belongs to ``name_or_path`` (same resolution rules as :func:`load_model`)."""
    from transformers import AutoTokenizer

    resolved = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved)
    except OSError as exc:
        raise ModelNotFoundError(_hub_message(resolved, exc)) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _hub_message(name: str, exc: BaseException) -> str:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (
        f"could not load model {name!r}: not a local directory, not a built-in name, and the hub "
        f"could not provide it ({first}). Pass a local directory or 'smollm2-135m-instruct'."
    )
