"""Explicit transfer: least-squares compensation of fading structures through their consumer.

A structure's output reaches the rest of the network through input columns ``S`` of one consumer
linear layer (an MLP channel: its ``down_proj`` column; a head: its ``o_proj`` columns). When those
columns lose ``R`` (``W[:, S] -> W[:, S] - R``), the consumer's output moves by ``-R h_S``. The kept
columns ``K`` can absorb most of it: over the data, ``h_S ~ T^T h_K`` with

    T = argmin_T  E || h_S - T^T h_K ||^2 + lambda ||T||^2  =  (H_KK + lambda I)^{-1} H_KS

(``H = sum_t h_t h_t^T``, the consumer's input Gram matrix gathered by hooks during training), so
adding ``R T^T`` to ``W[:, K]`` keeps ``W h`` as close as a linear map of ``h_K`` can. This is the
one-shot reconstruction of FLAP / SlimGPT / ZipLM, applied step by step while LHSPG fades the
structures: every step moves exactly what the fade removed. ``lambda = damp * mean(diag H_KK)``.
"""

from __future__ import annotations

from typing import Protocol

import torch


class GramSource(Protocol):
    """Where consumer input Gram matrices come from (``lorashear.lhspg.hooks.ActivationGram``)."""

    def gram(self, module: str) -> torch.Tensor | None: ...

    def roll(self) -> None: ...


def transfer_matrix(gram: torch.Tensor, fading: torch.Tensor, kept: torch.Tensor, damp: float) -> torch.Tensor:
    """``T`` of shape ``(|S|, |K|)``: removing ``R`` (``(out, |S|)``) from columns ``fading`` is
    compensated by adding ``R @ T`` to columns ``kept`` (ridge least squares over ``gram``'s data)."""
    h = gram.double()
    hkk = h.index_select(0, kept).index_select(1, kept)
    hks = h.index_select(0, kept).index_select(1, fading)
    lam = damp * hkk.diagonal().mean().clamp_min(1e-12) if kept.numel() else h.new_tensor(0.0)
    hkk.diagonal().add_(lam)
    factor, info = torch.linalg.cholesky_ex(hkk)
    if int(info) != 0:  # not positive definite (e.g. no data yet): no compensation
        return torch.zeros(fading.numel(), kept.numel(), dtype=torch.float32, device=gram.device)
    return torch.cholesky_solve(hks, factor).t().float()


def consumer_module(weight_name: str) -> str:
    """``a.b.down_proj.base_layer.weight`` -> ``a.b.down_proj`` (the module whose forward gets ``h``)."""
    name = weight_name.rsplit(".", 1)[0]
    if name.endswith(".base_layer"):
        name = name[: -len(".base_layer")]
    return name


def kept_columns(width: int, dead: torch.Tensor) -> torch.Tensor:
    """Column indices ``0..width-1`` not in ``dead``."""
    alive = torch.ones(width, dtype=torch.bool, device=dead.device)
    alive[dead] = False
    return alive.nonzero().flatten()


__all__ = ["GramSource", "consumer_module", "kept_columns", "transfer_matrix"]
