"""Compute of a training run: token-passes at the width trained, and an estimate of the FLOPs.

Tokens are not compute (METHOD.md section 8). A run counts, in tokens:

- ``student_fwd`` / ``student_bwd``: forward and backward token-passes of the model being trained, at the
  width it has at that step (lorashear's prune stage trains the full-width masked model until it compacts);
- ``teacher_fwd``: forward token-passes of the dense teacher (distillation);
- ``prep_fwd`` / ``prep_bwd``: everything before training: the knowledge analysis, calibration passes of a
  one-shot pruner (importance gradients, activation statistics).

FLOPs per token of a forward pass: ``2 x`` the weights of every matrix multiply (``nn.Linear``, the
``lm_head`` included; embedding look-ups are free) plus attention's scores and mixing, ``4 x heads x
head_dim x`` the mean causal context ``(L + 1) / 2`` per layer. A backward pass costs one forward for the
activation gradients, plus one more for the weight gradients of what is trained: about ``1x`` forward
with LoRA (its factors are tiny), ``2x`` with full-parameter training. This is the usual ``6N`` rule
(Kaplan et al. 2020) with LoRA's ``4N`` variant; it ignores norms, activations and the optimiser.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .models.params import is_lora_name


def forward_flops_per_token(model: torch.nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of ``model`` on sequences of ``seq_len`` tokens (see the module docstring)."""
    seen: set[int] = set()
    matmul = 0
    for name, module in model.named_modules():
        if is_lora_name(f"{name}."):  # a LoRA factor (the docstring's rule: LoRA's own matmuls are left out)
            continue
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            matmul += module.weight.numel()
    attention = 0.0
    ctx = (seq_len + 1) / 2
    for module in model.modules():
        width = getattr(getattr(module, "q_proj", None), "out_features", None)  # a Linear or a LoRA layer
        if width and getattr(module, "head_dim", None):
            attention += 4 * width * ctx  # QK^T and AV: 2 FLOPs x (heads x head_dim) x context, each
    return 2.0 * matmul + attention


@dataclass
class Compute:
    """Token-passes of one row and their FLOPs."""

    student_fwd: int = 0
    student_bwd: int = 0
    teacher_fwd: int = 0
    prep_fwd: int = 0
    prep_bwd: int = 0
    flops: float = 0.0

    def train(self, tokens: int, fwd_flops_per_token: float, *, full: bool = False) -> None:
        """``tokens`` of training at one width: forward + backward (LoRA: 1x forward; full: 2x)."""
        self.student_fwd += tokens
        self.student_bwd += tokens
        self.flops += tokens * fwd_flops_per_token * (3.0 if full else 2.0)

    def teacher(self, tokens: int, fwd_flops_per_token: float) -> None:
        self.teacher_fwd += tokens
        self.flops += tokens * fwd_flops_per_token

    def prep(self, fwd_tokens: int, fwd_flops_per_token: float, bwd_tokens: int = 0, *,
             full_grad: bool = False) -> None:
        """Analysis or calibration passes; ``full_grad``: the backward computes weight gradients too."""
        self.prep_fwd += fwd_tokens
        self.prep_bwd += bwd_tokens
        self.flops += fwd_tokens * fwd_flops_per_token + bwd_tokens * fwd_flops_per_token * (2.0 if full_grad
                                                                                              else 1.0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def pflops(self) -> float:
        return self.flops / 1e15


__all__ = ["Compute", "forward_flops_per_token"]
