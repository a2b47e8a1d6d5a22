"""Cross-entropy and the KL to a teacher in one pass over the vocabulary (the distillation loss's kernel).

``(1 - w) CE + w T^2 KL(teacher_T || student_T)`` per next-token position, written as autograd would
evaluate it, reads and writes several tensors of ``positions x vocabulary`` floats: the student's
log-softmax for the cross-entropy (inside the model), again for the KL, the teacher's, their product, and
as many again backwards. For a 49k vocabulary that is 100 MB per tensor at 2 x 256 tokens, and on the
reference model it cost more than the teacher's forward pass (``benchmarks/distill_loss_speed.py``).

:func:`soft_target_loss` takes both terms in one pass over the logits, a few positions at a time on a CPU
(so the working set stays in cache), and computes the gradient with respect to the student's logits
in the same pass, where it is known in closed form:
``(1 - w) (softmax(z) - onehot(y)) + w T (softmax(z / T) - softmax(u / T))``, divided by the number of
positions that count. The backward pass only scales it. The result equals the composed losses
(:func:`~lorashear.training.losses.kl_to_teacher`, :func:`~lorashear.training.losses.next_token_losses`)
to float rounding; ``tests/test_soft_targets.py`` checks the values and the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: a target that takes no loss (a prompt token, or the last position, which predicts nothing)
IGNORE_INDEX = -100
#: floats per temporary slice (positions x vocabulary): on a CPU about 1.5 MiB, so a slice stays in the core's
#: cache (8 positions of a 49k vocabulary; measured fastest of 8..512 positions on the reference model); on an
#: accelerator 256 MiB, so the loop launches few kernels
CHUNK_ELEMENTS = {"cpu": 400_000, "accelerator": 64 * 2**20}


def chunk_rows(vocab: int, device: torch.device) -> int:
    """Positions per slice for ``vocab`` on ``device``."""
    budget = CHUNK_ELEMENTS["cpu" if device.type == "cpu" else "accelerator"]
    return max(1, budget // vocab)


class _SoftTargetLoss(torch.autograd.Function):
    """Forward: the mixed loss and its two terms; the gradient of the loss is computed there too."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                weight: float, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        vocab = logits.shape[-1]
        z = logits.reshape(-1, vocab)
        u = teacher_logits.reshape(-1, vocab) if teacher_logits is not None else None
        y = targets.reshape(-1)
        valid = y != IGNORE_INDEX
        count = int(valid.sum())
        scale = 1.0 / max(count, 1)
        grad = torch.zeros_like(z) if ctx.needs_input_grad[0] else None
        ce = torch.zeros((), dtype=torch.float32, device=z.device)
        kl = torch.zeros((), dtype=torch.float32, device=z.device)
        tau = temperature
        step = chunk_rows(vocab, z.device)
        for start in range(0, z.shape[0], step):
            rows = slice(start, start + step)
            keep = valid[rows]
            if not bool(keep.any()):
                continue
            zc = z[rows].float()
            yc = y[rows].clamp(min=0).unsqueeze(1)
            keep_f = keep.to(torch.float32)
            log_p = F.log_softmax(zc, dim=-1)
            ce -= (log_p.gather(1, yc).squeeze(1) * keep_f).sum()
            p_t = None
            if weight > 0.0:
                assert u is not None
                log_p_t = F.log_softmax(u[rows].float() / tau, dim=-1)
                log_p_tau = log_p if tau == 1.0 else F.log_softmax(zc / tau, dim=-1)
                p_t = log_p_t.exp()
                kl += (((p_t * (log_p_t - log_p_tau)).sum(-1)) * keep_f).sum()
            if grad is None:
                continue
            # (1 - w) (p - onehot) + w T (p_T - p_t), zero where the target takes no loss
            g = log_p.exp_()
            if p_t is not None and tau == 1.0:
                g.sub_(p_t, alpha=weight)  # p - w p_t = (1 - w) p + w (p - p_t)
            else:
                g.mul_(1.0 - weight)
                if p_t is not None:
                    g.add_(log_p_tau.exp().sub_(p_t), alpha=weight * tau)
            g.scatter_add_(1, yc, torch.full_like(yc, -(1.0 - weight), dtype=g.dtype))
            g.mul_((keep_f * scale).unsqueeze(1))
            grad[rows] = g.to(grad.dtype)
        ce = ce * scale
        kl = kl * scale * tau**2
        loss = (1.0 - weight) * ce + weight * kl
        ctx.save_for_backward(grad.view_as(logits) if grad is not None else None)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _ce: torch.Tensor, _kl: torch.Tensor):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return grad * grad_loss.to(grad.dtype), None, None, None, None


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """Position ``t``'s target is ``labels[t + 1]``; the last position has none (``IGNORE_INDEX``)."""
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


def soft_target_loss(logits: torch.Tensor, teacher_logits: torch.Tensor | None, labels: torch.Tensor,
                     weight: float, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, ce, kl)``: ``loss = (1 - weight) ce + weight kl`` with ``ce`` the mean next-token
    cross-entropy and ``kl`` the mean ``T^2 KL(teacher_T || student_T)``, both over the positions whose next
    label is not ``IGNORE_INDEX`` (``labels`` ``(B, T)``, unshifted, as a causal LM takes them). ``ce`` and
    ``kl`` are detached (for the log); ``teacher_logits`` may be ``None`` when ``weight`` is 0."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight must be in [0, 1], got {weight}")
    if weight > 0.0 and teacher_logits is None:
        raise ValueError("a KL share above 0 needs the teacher's logits")
    if teacher_logits is not None and teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(logits.shape)}")
    return _SoftTargetLoss.apply(logits, teacher_logits, next_token_targets(labels), float(weight),
                                 float(temperature))


__all__ = ["CHUNK_ELEMENTS", "IGNORE_INDEX", "chunk_rows", "next_token_targets", "soft_target_loss"]
