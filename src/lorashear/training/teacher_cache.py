"""Distillation from cached top-k teacher logits instead of an online teacher.

The training loop's batch order is a pure function of the data size, the seed and the step
(:func:`~lorashear.training.loop.batch_indices`), so every sequence a run will train on is known
before it starts. :func:`build_topk_cache` runs the dense teacher once over exactly those sequences
and keeps, per token, the ``k`` largest logits and their token ids (values fp16, ids int32: 6 bytes
x k per token, in CPU memory); the teacher can then be freed, so training holds one model instead of
two. :func:`topk_distillation_loss` reads the cache by sequence content, so it does not depend on the
order in which batches come, and a resumed run rebuilds the same cache.

The KL is taken over the teacher's top ``k`` tokens, renormalised (the usual sparse distillation);
with ``k`` = the vocabulary it is the full KL.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .losses import IGNORE_INDEX, KLShare, LossFn, freeze, masked_lm_loss, next_token_losses, split_prompt_mask

logger = logging.getLogger(__name__)


def _key(row: torch.Tensor) -> bytes:
    return hashlib.sha1(row.detach().to("cpu", torch.int64).numpy().tobytes()).digest()


@dataclass
class TopKCache:
    """The teacher's top-k logits per cached sequence: ``values``/``indices`` of shape ``(n, T, k)``."""

    values: torch.Tensor
    indices: torch.Tensor
    rows: dict[bytes, int]

    @property
    def k(self) -> int:
        return self.values.shape[-1]

    @property
    def nbytes(self) -> int:
        return self.values.numel() * self.values.element_size() + self.indices.numel() * self.indices.element_size()

    def lookup(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(values, indices)`` for the rows of ``batch`` (``(B, T, k)`` each, on ``batch``'s device)."""
        try:
            pos = [self.rows[_key(row)] for row in batch]
        except KeyError:
            raise KeyError("a training sequence is missing from the teacher cache: the cache was built for "
                           "another data order (steps, batch size, seed or process count)") from None
        idx = torch.tensor(pos, dtype=torch.long)
        return (self.values.index_select(0, idx).to(batch.device, torch.float32),
                self.indices.index_select(0, idx).to(batch.device, torch.long))


def rows_used(num_sequences: int, *, steps: int, batch_size: int, grad_accum: int, seed: int, rank: int = 0,
              world: int = 1, start_step: int = 0) -> list[int]:
    """Sorted indices of the sequences a run reads (this process's share) from ``start_step`` on."""
    from .loop import batch_indices

    used: set[int] = set()
    for micro in range(start_step * grad_accum, steps * grad_accum):
        used.update(batch_indices(num_sequences, micro, batch_size, seed=seed, rank=rank, world=world))
        if len(used) == num_sequences:
            break
    return sorted(used)


@torch.no_grad()
def build_topk_cache(teacher: torch.nn.Module, data: torch.Tensor, rows: Iterable[int], *, k: int,
                     batch_size: int = 8, device: torch.device | str | None = None) -> TopKCache:
    """Run ``teacher`` over ``data[rows]`` once and keep each token's top ``k`` logits."""
    freeze(teacher)
    rows = list(rows)
    device = device or next(teacher.parameters()).device
    vocab = teacher.get_output_embeddings().weight.shape[0]
    k = min(k, vocab)
    n, t = len(rows), data.shape[1]
    values = torch.empty(n, t, k, dtype=torch.float16 if k < vocab else torch.float32)
    indices = torch.empty(n, t, k, dtype=torch.int32)
    keys: dict[bytes, int] = {}
    for start in range(0, n, batch_size):
        chunk = data[rows[start:start + batch_size]]
        ids, _ = split_prompt_mask(chunk)
        logits = teacher(input_ids=ids.to(device), use_cache=False).logits.float()
        top = logits.topk(k, dim=-1)
        values[start:start + len(chunk)] = top.values.cpu().to(values.dtype)
        indices[start:start + len(chunk)] = top.indices.cpu().to(torch.int32)
        for j, row in enumerate(chunk):
            keys[_key(row)] = start + j
    cache = TopKCache(values=values, indices=indices, rows=keys)
    logger.info("teacher cache: top-%d logits of %d sequences x %d tokens (%.1f MiB)", k, n, t, cache.nbytes / 2**20)
    return cache


def kl_topk(student_logits: torch.Tensor, values: torch.Tensor, indices: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean per-token ``T^2 KL(teacher_topk || student)`` over next-token positions, the teacher's
    distribution renormalised over its top-k tokens (:func:`~lorashear.training.losses.kl_to_teacher`'s
    sparse counterpart; equal to it when k is the vocabulary)."""
    log_p_s = F.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    log_p_t = F.log_softmax(values[:, :-1] / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s.gather(-1, indices[:, :-1]))).sum(-1)
    if mask is None:
        return kl.mean() * temperature**2
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature**2


def topk_distillation_loss(cache: TopKCache, weight: float | KLShare, temperature: float = 1.0) -> LossFn:
    """``(1 - weight) CE + weight T^2 KL`` with the teacher read from ``cache``; ``weight`` may be a
    :class:`KLShare` that a step hook changes (read at every call)."""
    mix = weight if isinstance(weight, KLShare) else KLShare(weight)

    def loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
        weight = mix.value
        if weight == 0.0:
            return masked_lm_loss(model, batch)
        values, indices = cache.lookup(batch)
        if not bool((batch < 0).any()):  # plain text: every next token counts
            out = model(input_ids=batch, labels=batch, use_cache=False)
            kl = kl_topk(out.logits, values, indices, temperature)
            return kl if weight == 1.0 else (1.0 - weight) * out.loss + weight * kl
        ids, labels = split_prompt_mask(batch)  # instruction data: responses only
        logits = model(input_ids=ids, use_cache=False).logits
        total, count = next_token_losses(logits, labels)
        kl = kl_topk(logits, values, indices, temperature, mask=labels[:, 1:] != IGNORE_INDEX)
        ce = total / count.clamp(min=1)
        return kl if weight == 1.0 else (1.0 - weight) * ce + weight * kl

    return loss


__all__ = ["TopKCache", "build_topk_cache", "kl_topk", "rows_used", "topk_distillation_loss"]
