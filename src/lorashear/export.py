"""Save and load (pruned) models in Hugging Face format.

Uniform models load with plain ``AutoModelForCausalLM.from_pretrained``.
Models whose layers differ carry transformers' ``per_layer_config`` in
``config.json`` (layer index -> width overrides); transformers 5.23 parses
and serialises that schema but does not yet build layers from it, so
:func:`load_pretrained` builds the model with the global widths on the meta
device, rebuilds each overridden decoder layer from its layer config, and
loads the safetensors weights into it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .atomic import atomic_directory
from .errors import ModelNotFoundError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike[str],
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


def _read_config_dict(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read {path / 'config.json'}: {exc}") from exc


def load_pretrained(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                    attn_implementation: str | None = None) -> "PreTrainedModel":
    """Load a causal LM saved by :func:`save_pretrained` or any Hugging Face directory / hub id.

    Heterogeneous models (``per_layer_config`` in config.json) are rebuilt with
    their per-layer shapes; everything else goes through ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    local = Path(os.fspath(path))
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if local.is_dir() and _read_config_dict(local).get("per_layer_config"):
        return _load_heterogeneous(local, dtype=dtype, attn_implementation=attn_implementation)
    try:
        return AutoModelForCausalLM.from_pretrained(os.fspath(path), **kwargs)
    except OSError as exc:
        from .models.loading import _hub_message

        raise ModelNotFoundError(_hub_message(os.fspath(path), exc)) from exc


def _load_heterogeneous(path: Path, *, dtype: torch.dtype, attn_implementation: str | None) -> "PreTrainedModel":
    import copy

    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from .graph.adapters import adapter_for

    config = AutoConfig.from_pretrained(path)
    if attn_implementation:
        config._attn_implementation = attn_implementation  # noqa: SLF001 - the documented override slot
    global_config = copy.deepcopy(config)
    global_config.per_layer_config = None
    # parameters on meta (no memory, no random init); buffers such as RoPE tables are real
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(global_config, dtype=dtype)
    # the attention implementation is resolved while building the model; the per-layer configs inherit it
    config._attn_implementation = global_config._attn_implementation  # noqa: SLF001
    adapter = adapter_for(config)
    _, layers = adapter.decoder_layers(model)
    for idx in range(len(layers)):
        layer_config = config.per_layer_config[idx]
        with init_empty_weights(include_buffers=False):
            layers[idx] = type(layers[idx])(layer_config, idx)
        layers[idx].to(dtype)
    model.config = config
    for module in model.modules():
        if module is not model and hasattr(module, "config") and module.config is global_config:
            module.config = config
    state: dict[str, torch.Tensor] = {}
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelNotFoundError(f"{path} has no .safetensors weights")
    for shard in shards:
        state.update(load_file(str(shard)))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    if still_meta or unexpected:
        raise ModelNotFoundError(
            f"{path}: weights do not match the per-layer config (missing {still_meta[:3]}, unexpected {unexpected[:3]})")
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise ModelNotFoundError(f"{path}: buffer {name} was not initialised")
    model.eval()
    return model
