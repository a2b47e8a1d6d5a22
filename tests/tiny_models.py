"""Tiny random configs of every supported family (no downloads)."""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    Qwen2Config,
    Qwen3Config,
)

COMMON = dict(hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6,
              num_key_value_heads=2, vocab_size=97, max_position_embeddings=64, head_dim=8)


def tiny_config(family: str):
    if family == "llama":
        return LlamaConfig(**COMMON)
    if family == "llama_mha":
        return LlamaConfig(**{**COMMON, "num_key_value_heads": 6})
    if family == "mistral":
        return MistralConfig(**COMMON, sliding_window=None)
    if family == "qwen2":
        return Qwen2Config(**COMMON)
    if family == "qwen3":
        return Qwen3Config(**COMMON)
    if family == "phi3":
        cfg = {k: v for k, v in COMMON.items() if k != "head_dim"}
        return Phi3Config(**cfg, pad_token_id=0)
    if family == "gemma":
        return GemmaConfig(**COMMON)
    if family == "gemma2":
        return Gemma2Config(**COMMON, sliding_window=16)
    raise KeyError(family)


FAMILIES = ("llama", "llama_mha", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    # random norms and biases so that zeroed structures are visible if they leak
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model.eval()


def with_lora(model: torch.nn.Module, rank: int = 4, seed: int = 1) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                  lora_dropout=0.0))
    torch.manual_seed(seed)
    with torch.no_grad():  # lora_B starts at zero; make it non-zero so LoRA matters
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    return peft_model.eval()
