"""Training losses: each a function ``loss(model, batch) -> scalar tensor``.

The training loop (:func:`lorashear.training.loop.train`) takes any of them; a new
loss is one function here. ``batch`` is a ``LongTensor[B, seq_len]`` of token ids.

- :func:`lm_loss`: next-token cross-entropy (labels = inputs).
- :func:`distillation_loss`: KL divergence from a frozen teacher's next-token distribution,
  mixed with the cross-entropy: ``(1 - w) CE + w T^2 KL(teacher_T || student_T)`` per token.
  The teacher runs online (one forward pass per micro-batch, no gradient); for the
  reference model that costs about a third of a training step. The KL's share ``w`` may
  change during training (:class:`KLShare`, set by a step hook); while it is 0 the teacher
  is not run at all.
- :func:`masked_lm_loss` / :func:`masked_distillation_loss`: the same for batches whose
  prompt tokens carry no loss (instruction data): such a token is stored as ``~id``
  (a negative number, :func:`mask_prompt`); it is fed to the model as ``id`` and never
  predicted (:func:`split_prompt_mask`). On batches without negative entries they are
  next-token cross-entropy and the distillation mix over every position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .soft_targets import IGNORE_INDEX, soft_target_loss

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]

#: the online teacher's dtype choices (:attr:`DistillConfig.teacher_dtype`)
TeacherDType = Literal["model", "bfloat16", "auto"]
TEACHER_DTYPES: tuple[str, ...] = get_args(TeacherDType)


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the model on its own batch (labels = inputs, shifted inside)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@dataclass
class DistillConfig:
    """Knowledge distillation from the dense model (the teacher) during training."""

    weight: float = field(default=0.0, metadata={
        "help": "share of the KL-to-teacher term in the loss, (1-w) CE + w KL; 0 = off (cross-entropy only)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student"})
    after_pruning: float | None = field(default=None, metadata={
        "help": "prune stage only: the KL share once pruning has ended (the steps that only fine-tune); "
                "default: the same share throughout"})
    before_pruning: float | None = field(default=None, metadata={
        "help": "prune stage only: the KL share during the warm-up, before the first pruning period (0 = no "
                "teacher pass in those steps); default: the same share as while pruning"})
    teacher_dtype: TeacherDType = field(default="model", metadata={
        "help": "prune stage only: the online teacher's dtype: model = the model's; bfloat16; auto = bfloat16 where "
                "the device computes it natively (CUDA with bf16, a CPU with AVX512-BF16/AMX) and the model is "
                "float32, else the model's (the KL is taken in float32 either way)"})
    topk: int = field(default=0, metadata={
        "help": "0 = online teacher (a second copy of the dense model during training); K > 0 = the teacher's "
                "top-K logits of every training sequence, computed once before training (6 x K bytes per token, "
                "CPU memory), then the teacher is freed; the KL is over those K tokens"})

    def __post_init__(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise ConfigError(f"distill weight must be in [0, 1], got {self.weight}")
        for name in ("after_pruning", "before_pruning"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value <= 1.0:
                raise ConfigError(f"distill {name} must be in [0, 1], got {value}")
        if self.teacher_dtype not in TEACHER_DTYPES:
            raise ConfigError(f"distill teacher_dtype must be one of {', '.join(TEACHER_DTYPES)}, "
                              f"got {self.teacher_dtype!r}")
        if self.topk < 0:
            raise ConfigError(f"distill topk must be >= 0, got {self.topk}")
        if not self.temperature > 0:
            raise ConfigError(f"distill temperature must be > 0, got {self.temperature}")

    @property
    def enabled(self) -> bool:
        """Whether a teacher is needed at any step."""
        return self.weight > 0 or bool(self.after_pruning) or bool(self.before_pruning)

    def shares(self, warmup_end: int, prune_end: int) -> list[tuple[int, float]]:
        """The prune stage's KL share by the step, piecewise constant: ``(first step, share)`` for the warm-up,
        the pruning periods and the steps after them."""
        during = self.weight
        before = during if self.before_pruning is None else self.before_pruning
        after = during if self.after_pruning is None else self.after_pruning
        return [(0, before), (warmup_end, during), (prune_end, after)]


@dataclass
class LossParts:
    """The two terms of a distillation loss over one optimizer step's micro-batches (for the step log: the mixed
    objective changes meaning when the KL share does, cross-entropy alone stays comparable)."""

    ce_sum: float = 0.0
    kl_sum: float = 0.0
    ce_count: int = 0
    kl_count: int = 0

    def reset(self) -> None:
        self.ce_sum = self.kl_sum = 0.0
        self.ce_count = self.kl_count = 0

    def add(self, ce: torch.Tensor, kl: torch.Tensor | None) -> None:
        self.ce_sum += float(ce.detach())
        self.ce_count += 1
        if kl is not None:
            self.kl_sum += float(kl.detach())
            self.kl_count += 1

    def fields(self) -> dict[str, float]:
        out = {}
        if self.ce_count:
            out["ce"] = self.ce_sum / self.ce_count
        if self.kl_count:
            out["kl"] = self.kl_sum / self.kl_count
        return out


@dataclass
class KLShare:
    """The KL term's share ``w`` in a distillation loss, read at every call; a step hook may change it.
    ``parts``, when set, receives each call's cross-entropy and KL."""

    value: float
    parts: LossParts | None = None


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token ``T^2 KL(teacher || student)`` over next-token positions (all but the last).

    ``mask`` (``(B, T-1)`` bool, optional): average over the positions where it is true only
    (0 when there are none).
    """
    s = student_logits[:, :-1].float() / temperature
    t = teacher_logits[:, :-1].float() / temperature
    log_p_s = F.log_softmax(s, dim=-1)
    log_p_t = F.log_softmax(t, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # (B, T-1)
    if mask is None:
        return kl.mean() * temperature**2
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def distillation_loss(teacher: torch.nn.Module, config: DistillConfig, share: KLShare | None = None) -> LossFn:
    """A loss mixing cross-entropy with the KL to ``teacher`` (frozen, evaluated without gradient).

    ``share``: the KL's share, read at every call (default: fixed at ``config.weight``).
    """
    freeze(teacher)
    temp = config.temperature
    mix = share or KLShare(config.weight)

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        w = mix.value
        if w == 0.0:
            out = model(input_ids=batch, labels=batch, use_cache=False)
            if mix.parts is not None:
                mix.parts.add(out.loss, None)
            return out.loss
        logits = model(input_ids=batch, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        total, ce, kl = soft_target_loss(logits, t_logits, batch, w, temp)
        if mix.parts is not None:
            mix.parts.add(ce, kl)
        return total

    return loss


def freeze(teacher: torch.nn.Module) -> torch.nn.Module:
    """``teacher`` in eval mode with no parameter requiring a gradient (in place; returned)."""
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def make_teacher(model: torch.nn.Module, dtype: TeacherDType = "model") -> torch.nn.Module:
    """A frozen copy of ``model`` (before LoRA is attached) to distil from, in ``dtype``
    (:attr:`DistillConfig.teacher_dtype`)."""
    import copy

    teacher = freeze(copy.deepcopy(model))
    target = teacher_dtype(model, dtype)
    return teacher.to(target) if target is not None else teacher


def teacher_dtype(model: torch.nn.Module, choice: TeacherDType) -> torch.dtype | None:
    """The dtype the teacher of ``model`` runs in for ``choice``; ``None``: the model's own."""
    if choice == "model":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    param = next(model.parameters())
    if param.dtype != torch.float32 or not native_bf16(param.device):
        return None
    return torch.bfloat16


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 matrix products natively (fast), not by emulation."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and torch.cpu._is_avx512_bf16_supported()
        except (AttributeError, RuntimeError):  # torch builds without oneDNN or these probes
            return False
    return False


# -- batches whose prompt tokens carry no loss (instruction data) -------------------------------


def mask_prompt(ids: torch.Tensor) -> torch.Tensor:
    """Mark token ids as prompt (fed to the model, never predicted): ``~id``, i.e. ``-id - 1``."""
    return ~ids


def split_prompt_mask(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of a batch that may hold prompt tokens as ``~id``; labels are
    ``IGNORE_INDEX`` there (not shifted: position ``t`` is the target of position ``t - 1``)."""
    prompt = batch < 0
    ids = torch.where(prompt, ~batch, batch)
    return ids, ids.masked_fill(prompt, IGNORE_INDEX)


def next_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed next-token cross-entropy over the labelled positions, and how many there are.

    ``logits`` ``(B, T, V)``, ``labels`` ``(B, T)`` with ``IGNORE_INDEX`` where no loss is taken.
    """
    targets = labels[:, 1:]  # (B, T-1)
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    total = F.cross_entropy(flat, targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return total, (targets != IGNORE_INDEX).sum()


def masked_lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the non-prompt targets of ``batch`` (0 if it has none)."""
    ids, labels = split_prompt_mask(batch)
    total, count = next_token_losses(model(input_ids=ids, use_cache=False).logits, labels)
    return total / count.clamp(min=1)


def masked_distillation_loss(teacher: torch.nn.Module, config: DistillConfig) -> LossFn:
    """:func:`distillation_loss` for batches with prompt tokens: CE and KL over non-prompt targets only."""
    freeze(teacher)
    w, temp = config.weight, config.temperature

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        ids, labels = split_prompt_mask(batch)
        logits = model(input_ids=ids, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, use_cache=False).logits
        return soft_target_loss(logits, t_logits, labels, w, temp)[0]

    return loss
