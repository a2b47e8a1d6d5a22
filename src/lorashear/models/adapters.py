"""Every per-family fact that tracing cannot see, read from ``model.config``.

Tracing finds *which* dimensions are coupled; an adapter says where the decoder
layers are, how many heads and KV heads a layer has, which config keys and
module attributes describe a layer's widths (so that a compacted model can be
described in ``config.json`` and rebuilt), which projections get LoRA by
default (fused ``qkv_proj`` / ``gate_up_proj`` included), how the family's
RMSNorm weight is offset, and whether hidden channels can be removed exactly.
One small adapter per family; an unknown family falls back to the generic one
if its config uses the standard names, else discovery stops with an error
naming the model type.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError, UnsupportedArchitectureError

logger = logging.getLogger(__name__)

#: The block of a decoder layer that each per-layer group kind belongs to.
BLOCK_OF_KIND: dict[str, str] = {"attention_head": "attention", "kv_group": "attention", "mlp_channel": "mlp"}

#: LoRA targets of LLaMA-style decoders (separate q/k/v and gate/up projections).
LLAMA_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LayerWidths:
    """Widths of one decoder layer after pruning."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int


class ModelAdapter:
    """Generic decoder-only adapter (LLaMA conventions); families override what differs."""

    model_types: tuple[str, ...] = ()
    #: hidden-channel removal is exact (RMSNorm rescaled, nothing else reads hidden_size at run time)
    supports_hidden_pruning: bool = False
    #: module names (last component) that get LoRA by default
    lora_targets: tuple[str, ...] = LLAMA_LORA_TARGETS
    #: the RMSNorm weight value whose effective scale is zero: the norm multiplies by
    #: ``weight - norm_offset`` (0 for ``x * w``; -1 for Gemma's ``x * (1 + w)``)
    norm_offset: float = 0.0
    #: config keys that may differ per layer after pruning
    per_layer_keys: tuple[str, ...] = ("num_attention_heads", "num_key_value_heads", "intermediate_size")

    def __init__(self, config: Any) -> None:
        self.config = config

    # -- config facts ---------------------------------------------------------------------
    def _get(self, key: str, default: Any = None) -> Any:
        getter = getattr(self.config, "_getattr_without_heterogeneous_validation", None)
        if getter is not None:
            return getter(key, default)
        return getattr(self.config, key, default)

    @property
    def model_type(self) -> str:
        return str(getattr(self.config, "model_type", "unknown"))

    @property
    def dedicated(self) -> bool:
        """A family adapter vouches for this model type (``False``: the generic adapter is tried, and
        discovery first runs the zero-invariance self-check)."""
        return self.model_type in self.model_types

    @property
    def num_layers(self) -> int:
        return int(self._get("num_hidden_layers"))

    @property
    def head_dim(self) -> int:
        hd = self._get("head_dim", None)
        return int(hd) if hd else int(self._get("hidden_size")) // int(self._get("num_attention_heads"))

    def layer_widths(self, layer: int) -> LayerWidths:
        cfg = self.layer_config(layer)
        get = getattr(cfg, "_getattr_without_heterogeneous_validation", lambda k, d=None: getattr(cfg, k, d))
        heads = int(get("num_attention_heads"))
        kv = get("num_key_value_heads", None)
        return LayerWidths(heads, int(kv) if kv is not None else heads, int(get("intermediate_size")))

    def layer_config(self, layer: int) -> Any:
        if getattr(self.config, "is_heterogeneous", False):
            return self.config.per_layer_config[layer]
        return self.config

    # -- module facts ---------------------------------------------------------------------
    def lora_target_modules(self, model: torch.nn.Module) -> tuple[str, ...]:
        """The family's :attr:`lora_targets` that name ``nn.Linear`` modules of ``model`` (``lm_head`` excluded)."""
        present = linear_module_names(model)
        targets = tuple(t for t in self.lora_targets if t in present)
        if not targets:
            raise ConfigError(f"model type '{self.model_type}': none of the LoRA targets "
                              f"{', '.join(self.lora_targets)} is a Linear module of the model "
                              f"(it has {', '.join(sorted(present)) or 'none'})")
        return targets

    def decoder_layers(self, model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
        """Return ``(qualified name, ModuleList)`` of the decoder layers."""
        n = self.num_layers
        candidates = [
            (name, mod) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.ModuleList) and len(mod) == n and name.endswith("layers")
        ]
        if not candidates:
            candidates = [(name, mod) for name, mod in model.named_modules()
                          if isinstance(mod, torch.nn.ModuleList) and len(mod) == n]
        if not candidates:
            raise UnsupportedArchitectureError(
                f"model type '{self.model_type}': no ModuleList of {n} decoder layers found "
                "(config.num_hidden_layers); structure discovery needs one")
        return min(candidates, key=lambda c: len(c[0]))

    def attention_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        for name in ("self_attn", "attention", "attn"):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise UnsupportedArchitectureError(f"model type '{self.model_type}': decoder layer has no attention module")

    def mlp_module(self, layer: torch.nn.Module) -> torch.nn.Module:
        for name in ("mlp", "feed_forward", "ffn"):
            if hasattr(layer, name):
                return getattr(layer, name)
        raise UnsupportedArchitectureError(f"model type '{self.model_type}': decoder layer has no MLP module")

    def apply_layer_widths(self, layer_module: torch.nn.Module, layer_config: Any, widths: LayerWidths) -> None:
        """Point a layer's modules at its (per-layer) config and refresh cached width attributes."""
        attn = self.attention_module(layer_module)
        mlp = self.mlp_module(layer_module)
        attn.config = layer_config
        if hasattr(mlp, "config"):
            mlp.config = layer_config
        groups = widths.num_attention_heads // max(widths.num_key_value_heads, 1)
        for attr, value in (("num_key_value_groups", groups), ("num_key_value_heads", widths.num_key_value_heads),
                            ("num_heads", widths.num_attention_heads),
                            ("num_attention_heads", widths.num_attention_heads)):
            if hasattr(attn, attr):
                setattr(attn, attr, value)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = widths.intermediate_size


def linear_module_names(model: torch.nn.Module) -> set[str]:
    """Last name components of the ``nn.Linear`` modules of ``model``, ``lm_head`` excluded."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name}


# Families whose forward reads ``hidden_size`` or shares the norm epsilon with per-head norms
# (Gemma's embedding scale, Qwen3's q/k norms, Phi-3) keep ``supports_hidden_pruning = False``:
# hidden channels are reported, never pruned.

class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")
    supports_hidden_pruning = True


class Qwen3Adapter(ModelAdapter):
    model_types = ("qwen3",)


class GemmaAdapter(ModelAdapter):
    """Gemma's RMSNorm computes ``x * (1 + w)``: a zero scale is the weight -1."""

    model_types = ("gemma", "gemma2")
    norm_offset = -1.0


class Phi3Adapter(ModelAdapter):
    """Phi-3 fuses the q/k/v and the gate/up projections."""

    model_types = ("phi3",)
    lora_targets = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


_ADAPTERS: dict[str, type[ModelAdapter]] = {
    t: cls for cls in (LlamaAdapter, Qwen3Adapter, GemmaAdapter, Phi3Adapter) for t in cls.model_types
}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_ADAPTERS))


def adapter_for(config: Any) -> ModelAdapter:
    """The adapter for ``config.model_type`` (generic with a warning when unknown).

    ``config`` may also be a model (transformers or peft-wrapped): its base model's config is used.
    """
    if isinstance(config, torch.nn.Module):
        base = config.get_base_model() if hasattr(config, "get_base_model") else config
        config = base.config
    model_type = str(getattr(config, "model_type", "unknown"))
    cls = _ADAPTERS.get(model_type)
    if cls is None:
        missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not hasattr(config, k)]
        if missing:
            raise UnsupportedArchitectureError(
                f"model type '{model_type}' is not supported: its config lacks {', '.join(missing)}; "
                f"supported types: {', '.join(SUPPORTED_MODEL_TYPES)}")
        logger.warning("model type '%s' has no dedicated adapter; trying the generic decoder adapter", model_type)
        cls = ModelAdapter
    return cls(config)
