"""Parameter counts as lorashear reports them (tied weights once, LoRA factors apart)."""

from __future__ import annotations

import torch


LORA_MARKERS = (".lora_A.", ".lora_B.", ".lora_embedding_A.", ".lora_embedding_B.", ".lora_magnitude_vector.")


def is_lora_name(name: str) -> bool:
    """True for the parameters of a peft LoRA factor."""
    return any(m in name for m in LORA_MARKERS)


def count_params(model: torch.nn.Module, *, lora: bool = False) -> int:
    """Unique parameters (tied weights once), LoRA factors excluded unless ``lora``."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (not lora and is_lora_name(name)):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def embedding_params(model: torch.nn.Module) -> int:
    """Parameters of the input embedding and, when untied, the output embedding."""
    inp = model.get_input_embeddings()
    total = inp.weight.numel() if inp is not None else 0
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and inp is not None and out.weight.data_ptr() != inp.weight.data_ptr():
        total += out.weight.numel()
    return total
