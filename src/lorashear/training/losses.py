"""Training losses: each a function ``loss(model, batch) -> scalar tensor``.

The training loop (:func:`lorashear.training.loop.train`) takes any of them; a new
loss is one function here. ``batch`` is a ``LongTensor[B, seq_len]`` of token ids.

- :func:`lm_loss`: next-token cross-entropy (labels = inputs).
- :func:`distillation_loss`: KL divergence from a frozen teacher's next-token distribution,
  mixed with the cross-entropy: ``(1 - w) CE + w T^2 KL(teacher_T || student_T)`` per token.
  The teacher runs online (one forward pass per micro-batch, no gradient); for the
  reference model that costs about a third of a training step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..errors import ConfigError

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the model on its own batch (labels = inputs, shifted inside)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@dataclass
class DistillConfig:
    """Knowledge distillation from the dense model (the teacher) during training."""

    weight: float = field(default=0.0, metadata={
        "help": "share of the KL-to-teacher term in the loss, (1-w) CE + w KL; 0 = off (cross-entropy only)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"distill weight must be in [0, 1], got {self.weight}")
        if not self.temperature > 0:
            raise ConfigError(f"distill temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        return self.weight > 0


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean per-token ``T^2 KL(teacher || student)`` over next-token positions (all but the last)."""
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T-1)
    return kl.mean() * temperature**2


def distillation_loss(teacher: torch.nn.Module, config: DistillConfig) -> LossFn:
    """A loss mixing cross-entropy with the KL to ``teacher`` (frozen, evaluated without gradient)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    w, temp = config.weight, config.temperature

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=batch, labels=batch, use_cache=False)
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        kl = kl_to_teacher(out.logits, t_logits, temp)
        return kl if w == 1.0 else (1.0 - w) * out.loss + w * kl

    return loss


def make_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of ``model`` (before LoRA is attached) to distil from."""
    import copy

    teacher = copy.deepcopy(model)
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher
