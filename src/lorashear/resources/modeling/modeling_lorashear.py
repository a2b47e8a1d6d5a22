# Written by lorashear next to a pruned model whose decoder layers have different widths.
# It needs torch and transformers only (no lorashear), so that
#
#     AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
#
# loads the model anywhere (peft, lm-eval, TRL, ...). config.json keeps the family's own
# model_type and transformers' `per_layer_config` (layer index -> num_attention_heads,
# num_key_value_heads, intermediate_size); transformers parses that schema but its families do not
# yet build their layers from it. Each class below is the family's own transformers class; the only
# change is that every decoder layer is built from its layer's config. When the installed
# transformers builds `per_layer_config` itself, these classes step aside and build nothing of their own.
"""Per-layer widths for pruned checkpoints: the families' own transformers classes, each decoder
layer built from ``config.per_layer_config[i]``."""

from __future__ import annotations

import copy
import logging

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


def _layer_list(model: torch.nn.Module, count: int) -> torch.nn.ModuleList:
    """The decoder layers: the shortest-named ModuleList of ``count`` modules (``model.layers``)."""
    found = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) == count and name.endswith("layers")]
    if not found:
        raise ValueError(f"{type(model).__name__}: no list of {count} decoder layers")
    return min(found, key=lambda item: len(item[0]))[1]


def _builds_per_layer_itself(family_class: type, config) -> bool:
    """Whether ``family_class`` (transformers' own) already builds each layer from ``per_layer_config``
    (checked on the meta device: no memory, no weights)."""
    # the probe reads the global widths on purpose: keep transformers' warning about that for real readers
    quiet = logging.getLogger("transformers.integrations.heterogeneity.configuration_utils")
    was_disabled, quiet.disabled = quiet.disabled, True
    try:
        with torch.device("meta"):
            probe = family_class(copy.deepcopy(config))
            layers = _layer_list(probe, config.num_hidden_layers)
            return all(_shapes(layer) == _shapes(type(layer)(config.per_layer_config[idx], idx))
                       for idx, layer in enumerate(layers))
    except Exception:  # noqa: BLE001 - any failure means: it does not
        return False
    finally:
        quiet.disabled = was_disabled


class _PerLayerWidths:
    """Mixin placed before a family's ``*ForCausalLM``: build every decoder layer from its layer config."""

    def __init__(self, config, *args, **kwargs):
        mro = type(self).__mro__
        family_class = mro[mro.index(_PerLayerWidths) + 1]  # transformers' <Family>ForCausalLM
        if not getattr(config, "is_heterogeneous", False) or _builds_per_layer_itself(family_class, config):
            super().__init__(config, *args, **kwargs)
            return
        # build with the global (largest) widths, then replace each layer by one built from its own config
        global_config = copy.deepcopy(config)
        global_config.per_layer_config = None
        super().__init__(global_config, *args, **kwargs)
        # the attention implementation is resolved while building; the layer configs inherit it
        config._attn_implementation = global_config._attn_implementation
        layers = _layer_list(self, config.num_hidden_layers)
        for idx in range(len(layers)):
            old = layers[idx]
            param = next(old.parameters(), None)
            with torch.device(param.device if param is not None else "cpu"):
                layers[idx] = type(old)(config.per_layer_config[idx], idx)
            if param is not None:
                layers[idx].to(param.dtype)
            del old
        for module in self.modules():
            if getattr(module, "config", None) is global_config:
                module.config = config
        # the family's own weight init for the new layers (only modules not initialised yet; nothing on meta)
        self.init_weights()


class LorashearLlamaConfig(LlamaConfig):
    model_type = "llama"


class LorashearLlamaForCausalLM(_PerLayerWidths, LlamaForCausalLM):
    config_class = LorashearLlamaConfig


class LorashearMistralConfig(MistralConfig):
    model_type = "mistral"


class LorashearMistralForCausalLM(_PerLayerWidths, MistralForCausalLM):
    config_class = LorashearMistralConfig


class LorashearQwen2Config(Qwen2Config):
    model_type = "qwen2"


class LorashearQwen2ForCausalLM(_PerLayerWidths, Qwen2ForCausalLM):
    config_class = LorashearQwen2Config


class LorashearQwen3Config(Qwen3Config):
    model_type = "qwen3"


class LorashearQwen3ForCausalLM(_PerLayerWidths, Qwen3ForCausalLM):
    config_class = LorashearQwen3Config


class LorashearGemmaConfig(GemmaConfig):
    model_type = "gemma"


class LorashearGemmaForCausalLM(_PerLayerWidths, GemmaForCausalLM):
    config_class = LorashearGemmaConfig


class LorashearGemma2Config(Gemma2Config):
    model_type = "gemma2"


class LorashearGemma2ForCausalLM(_PerLayerWidths, Gemma2ForCausalLM):
    config_class = LorashearGemma2Config


class LorashearPhi3Config(Phi3Config):
    model_type = "phi3"


class LorashearPhi3ForCausalLM(_PerLayerWidths, Phi3ForCausalLM):
    config_class = LorashearPhi3Config


class LorashearOlmo2Config(Olmo2Config):
    model_type = "olmo2"


class LorashearOlmo2ForCausalLM(_PerLayerWidths, Olmo2ForCausalLM):
    config_class = LorashearOlmo2Config


#: model_type -> (config class, model class), read by lorashear when it writes ``auto_map``
FAMILIES = {
    cls.config_class.model_type: (cls.config_class.__name__, cls.__name__)
    for cls in (LorashearLlamaForCausalLM, LorashearMistralForCausalLM, LorashearQwen2ForCausalLM,
                LorashearQwen3ForCausalLM, LorashearGemmaForCausalLM, LorashearGemma2ForCausalLM,
                LorashearPhi3ForCausalLM, LorashearOlmo2ForCausalLM)
}
