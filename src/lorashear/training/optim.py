"""The trainable parameters of a LoRA model and the inner optimizer over them (AdamW or SGD): general
pieces of the training loop, which LHSPG wraps (:mod:`lorashear.lhspg.optimizer`)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import ConfigError


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of a peft model (the LoRA factors)."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "adamw", lr: float = 2e-4,
                   weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """AdamW or SGD over ``params`` (the inner optimizer of :class:`LHSPG`)."""
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ConfigError(f"unknown optimizer {name!r}; use adamw or sgd")


__all__ = ["lora_parameters", "make_optimizer"]
