"""LoRA settings and :func:`attach_lora`: the only place lorashear attaches LoRA to a model.

By default LoRA goes on the model family's projections (its adapter's
``lora_targets``: q/k/v/o/gate/up/down for LLaMA-style decoders, the fused
``qkv_proj`` / ``gate_up_proj`` for Phi-3), restricted to those the model has.
LoRA initialisation draws from torch's global RNG inside ``get_peft_model``;
seed it (``torch.manual_seed``) before calling :func:`attach_lora` for
reproducible factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from ..errors import ConfigError
from .adapters import adapter_for
from .gap_dropout import use_gap_dropout

if TYPE_CHECKING:
    from peft import PeftModel


@dataclass
class LoraSettings:
    """LoRA factors attached for pruning and fine-tuning."""

    r: int = field(default=8, metadata={"help": "LoRA rank"})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale s = alpha / r)"})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    dropout_sampler: Literal["gaps", "torch"] = field(default="gaps", metadata={
        "help": "how LoRA dropout masks are drawn on a CPU: 'gaps' draws only the dropped positions (the same "
                "distribution, about 1/p fewer random numbers; models/gap_dropout.py), 'torch' one number per "
                "element as torch.nn.Dropout does (the masks of runs before 2026-12-06). Accelerators use torch's"})
    targets: tuple[str, ...] = field(default=(), metadata={
        "help": "module names that get LoRA (default: the model family's projections, fused ones included)"})

    def __post_init__(self) -> None:
        if isinstance(self.targets, str):
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        self.targets = tuple(self.targets)
        if self.r < 1:
            raise ConfigError(f"LoRA rank r must be >= 1, got {self.r}")
        if self.alpha < 1:
            raise ConfigError(f"LoRA alpha must be >= 1, got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        """The LoRA scale ``s = alpha / r``."""
        return self.alpha / self.r


def _linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and "lm_head" not in name]


def lora_targets(model: torch.nn.Module, settings: LoraSettings | None = None) -> tuple[str, ...]:
    """The module names :func:`attach_lora` puts LoRA on: ``settings.targets`` (each must name a
    Linear module of ``model``, by its last name components) or the family's default targets."""
    settings = settings or LoraSettings()
    if not settings.targets:
        return adapter_for(model).lora_target_modules(model)
    names = _linear_names(model)
    unknown = [t for t in settings.targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        present = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ConfigError(f"LoRA target(s) {', '.join(unknown)} name no Linear module of the model; "
                          f"it has {', '.join(present) or 'none'}")
    return settings.targets


def attach_lora(model: torch.nn.Module, settings: LoraSettings | None = None) -> PeftModel:
    """Wrap ``model`` in a peft model with LoRA factors on :func:`lora_targets` and return it.

    The base weights are frozen by peft; ``lora_B`` starts at zero, so the wrapped
    model computes what ``model`` did. Only the LoRA initialisation consumes random
    numbers (torch's global RNG), exactly as ``peft.get_peft_model`` does. With
    ``dropout_sampler="gaps"`` peft's dropout modules are replaced by
    :class:`~lorashear.models.gap_dropout.GapDropout`.
    """
    from peft import LoraConfig, get_peft_model

    settings = settings or LoraSettings()
    if hasattr(model, "peft_config"):
        raise ConfigError("the model already carries peft adapters; merge them first (merge_and_unload)")
    targets = lora_targets(model, settings)
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=list(targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    if settings.dropout_sampler == "gaps":
        use_gap_dropout(peft_model)
    return peft_model


__all__ = ["LoraSettings", "attach_lora", "lora_targets"]
