"""Tiny random models of every supported family (no downloads), shared by all tests.

``tiny_model(family, seed, ...)`` is the one builder; tests pass ``layers=``, ``vocab=``,
``size=`` and config overrides instead of building their own configs. Adding a model
family is one entry in :data:`FAMILY_CONFIGS`.
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

#: the default shapes: hidden 48, 6 query heads / 2 KV heads of width 8, MLP 40, 2 layers, vocabulary 97
COMMON = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, head_dim=8)
#: ``size="small"``: hidden 32, 4 query heads / 2 KV heads of width 8, MLP 64, 2 layers, vocabulary 96
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, head_dim=8)
SIZES = {"default": COMMON, "small": SMALL}

#: marks a shape key the family's config must not be given (it derives the value itself)
DROP = object()

#: family -> (config class, what differs from the shared shapes). One entry per supported family.
FAMILY_CONFIGS: dict[str, tuple[type, dict]] = {
    "llama": (LlamaConfig, {}),
    "llama_mha": (LlamaConfig, {"num_key_value_heads": 6}),
    "mistral": (MistralConfig, {"sliding_window": None}),
    "qwen2": (Qwen2Config, {}),
    "qwen3": (Qwen3Config, {}),
    "phi3": (Phi3Config, {"head_dim": DROP, "pad_token_id": 0}),
    "gemma": (GemmaConfig, {}),
    "gemma2": (Gemma2Config, {"sliding_window": 16}),
    # q_norm / k_norm are RMS norms over the whole projection: removal rescales their weights, exact up to
    # eps (Hugging Face's init gives this model q/k mean squares near 1e-5, so a real eps would show)
    "olmo2": (Olmo2Config, {"rms_norm_eps": 1e-12, "eos_token_id": 2}),
}
FAMILIES = tuple(FAMILY_CONFIGS)


def tiny_config(family: str, *, layers: int | None = None, vocab: int | None = None, size: str = "default",
                **overrides):
    """The tiny config of ``family``: ``SIZES[size]``, then the family's differences, then ``overrides``
    (any config field; ``layers``/``vocab`` are short for ``num_hidden_layers``/``vocab_size``)."""
    if family not in FAMILY_CONFIGS:
        raise KeyError(family)
    config_class, differences = FAMILY_CONFIGS[family]
    values = {**SIZES[size], **differences, **overrides}
    if layers is not None:
        values["num_hidden_layers"] = layers
    if vocab is not None:
        values["vocab_size"] = vocab
    return config_class(**{k: v for k, v in values.items() if v is not DROP})


def tiny_model(family: str = "llama", seed: int = 0, *, layers: int | None = None, vocab: int | None = None,
               size: str = "default", vector_std: float | None = 0.2, matrix_std: float | None = None,
               embed_std: float | None = None, train: bool = False, dtype: torch.dtype | None = torch.float32,
               **overrides) -> torch.nn.Module:
    """A random float32 model of ``family`` built after ``torch.manual_seed(seed)``.

    After Hugging Face's own initialisation (same random stream, in this order):
    ``vector_std`` redraws every 1-D parameter (norms around 1, biases around 0) so that zeroed
    structures are visible if they leak (``None``: keep the init); ``matrix_std`` redraws every
    parameter of 2+ dimensions from N(0, std); ``embed_std`` redraws the input embedding.
    Returned in eval mode, or in training mode with ``train=True``. Parameters are float32 either
    way; ``dtype=None`` leaves ``config.dtype`` unset, as when the model class is called directly.
    """
    config = tiny_config(family, layers=layers, vocab=vocab, size=size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, **({} if dtype is None else {"dtype": dtype}))
    with torch.no_grad():
        if vector_std is not None:
            for name, p in model.named_parameters():
                if p.dim() == 1:
                    p.normal_(1.0 if "norm" in name else 0.0, vector_std)
        if matrix_std is not None:
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0.0, matrix_std)
        if embed_std is not None:
            model.get_input_embeddings().weight.normal_(0.0, embed_std)
    return model.train(train)


def plain_tiny_llama(seed: int = 0, *, vocab: int = 96, layers: int = 2, train: bool = True) -> torch.nn.Module:
    """The prune-stage tests' model: a ``size="small"`` Llama with tied embeddings and Hugging Face's own
    initialisation, in training mode (eval mode with ``train=False``), without LoRA (the stage attaches its own)."""
    return tiny_model("llama", seed, size="small", layers=layers, vocab=vocab, vector_std=None, dtype=None,
                      train=train, tie_word_embeddings=True)


def with_lora(model: torch.nn.Module, rank: int = 4, seed: int = 1) -> torch.nn.Module:
    from lorashear.models.adapters import linear_module_names
    from lorashear.models.lora import LoraSettings, attach_lora

    targets = tuple(sorted(linear_module_names(model)))  # every Linear but lm_head
    peft_model = attach_lora(model, LoraSettings(r=rank, alpha=2 * rank, dropout=0.0, targets=targets))
    torch.manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; make it non-zero so LoRA matters
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return peft_model.eval()
