"""LHSPG's step hooks for the training loop: its update, and the activation statistics it scores and
transfers by, gathered during ordinary training steps (no extra passes).

:class:`ActivationFisher` scores every structure by the data: for a structure
whose output enters a consumer linear layer through input columns ``J``
(an MLP channel -> its ``down_proj`` column; a query-head slot or KV group ->
its ``o_proj`` columns), removing it changes the loss, to first order, by
``-sum_t sum_{j in J} h_tj dL/dh_tj`` on a sequence (``h`` the consumer's
input). Squared and summed over sequences this is the empirical Fisher of the
structure's removal. It is invariant to rescalings that leave the function
unchanged, which weight-only scores are not.

The hook sits on each consumer's forward (it keeps ``h``) and on ``h``'s
gradient (it multiplies and reduces): one element-wise product and a few small
index-adds per consumer and micro-batch. Scores accumulate per period and are
smoothed across periods by ``decay``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ..graph.groups import Group
from ..models.params import is_lora_name
from ..training.hooks import StepHook
from .optimizer import LHSPG
from .transfer import consumer_module

logger = logging.getLogger(__name__)


class LHSPGHook(StepHook):
    """LHSPG's post-step update (progressive forgetting, projection, selection, merges) as a step hook."""

    state_name = "lhspg"

    def __init__(self, lhspg: LHSPG) -> None:
        self.lhspg = lhspg

    def after_optimizer_step(self, step: int) -> None:
        self.lhspg.post_step()

    def log_fields(self) -> dict[str, Any]:
        lh = self.lhspg
        return {"group_sparsity": lh.sparsity(), "committed": len(lh.committed), "redundant": len(lh.redundant),
                "phase": lh.phase}

    def progress_fields(self) -> dict[str, str]:
        return {"sparsity": f"{self.lhspg.sparsity():.3f}"}

    def mutable_parameter_names(self) -> Iterable[str]:
        lh = self.lhspg
        return set(lh.loras) | {s.name for g in lh.candidates for s in g.slices}

    def state_dict(self) -> dict[str, Any]:
        return self.lhspg.state_dict(include_optimizer=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lhspg.load_state_dict(state)


def consumer_columns(group: Group) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, input columns)`` of the consumer layers the group's output enters."""
    out = []
    for s in group.slices:
        if s.dim == 1 and not is_lora_name(s.name) and s.name.endswith("weight"):
            out.append((consumer_module(s.name), s.indices))
    return out


class ActivationFisher(StepHook):
    """Per-structure activation Fisher ``sum_seq (sum_t sum_J h * dL/dh)^2``, gathered by hooks.

    Args:
        model: the (peft) model the groups are named on.
        groups: structures to score; those without a consumer column get no score (``nan``).
        decay: at each :meth:`roll` the running score is multiplied by ``decay`` before the new
            period's statistics are added (1 = plain sum over the run, 0 = last period only).
    """

    state_name = "activation_fisher"

    def __init__(self, model: torch.nn.Module, groups: Sequence[Group], *, decay: float = 0.5) -> None:
        self.groups = list(groups)
        self.decay = float(decay)
        self._pos = {g.id: i for i, g in enumerate(self.groups)}
        n = len(self.groups)
        self.current = torch.zeros(n, dtype=torch.float64)
        self.smoothed = torch.zeros(n, dtype=torch.float64)
        self.has_score = torch.zeros(n, dtype=torch.bool)
        # per consumer module: list of (column index tensor, local group ids, global positions)
        cols: dict[str, dict[str, tuple[list[int], list[int]]]] = defaultdict(dict)
        for pos, g in enumerate(self.groups):
            for module, indices in consumer_columns(g):
                idx, owner = cols[module].setdefault(g.kind, ([], []))
                idx.extend(indices)
                owner.extend([pos] * len(indices))
                self.has_score[pos] = True
        modules = dict(model.named_modules())
        self._maps: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for module, by_kind in cols.items():
            if module not in modules:
                raise ValueError(f"consumer module {module} not found in the model")
            maps = []
            for idx, owner in by_kind.values():
                owner_t = torch.tensor(owner, dtype=torch.long)
                uniq, local = torch.unique(owner_t, return_inverse=True)
                maps.append((torch.tensor(idx, dtype=torch.long), local, uniq))
            self._maps[module] = maps
        self._handles = [modules[name].register_forward_hook(self._make_forward_hook(name))
                         for name in self._maps]
        self.enabled = True

    # -- hooks ---------------------------------------------------------------------------------
    def _make_forward_hook(self, name: str):
        def forward_hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.enabled or not torch.is_grad_enabled() or not args:
                return
            h = args[0]
            if not isinstance(h, torch.Tensor) or not h.requires_grad:
                return
            saved = h.detach()
            h.register_hook(lambda grad: self._accumulate(name, saved, grad))

        return forward_hook

    @torch.no_grad()
    def _accumulate(self, name: str, h: torch.Tensor, grad: torch.Tensor) -> None:
        # c[b, j] = sum_t h_btj g_btj  (first-order change of the loss from removing column j, per sequence)
        c = (h.float() * grad.float()).sum(dim=tuple(range(1, h.dim() - 1))) if h.dim() > 2 else h.float() * grad.float()
        c = c.double()
        maps = self._maps[name]
        if maps and maps[0][0].device != c.device:
            maps = self._maps[name] = [(i.to(c.device), l.to(c.device), u) for i, l, u in maps]
        for idx, local, uniq in maps:
            per_seq = torch.zeros(c.shape[0], uniq.numel(), dtype=torch.float64, device=c.device)
            per_seq.index_add_(1, local, c.index_select(1, idx))
            self.current.index_add_(0, uniq, (per_seq * per_seq).sum(0).cpu())

    # -- scores --------------------------------------------------------------------------------
    def roll(self) -> None:
        """Fold the statistics gathered since the last roll into the smoothed score."""
        self.smoothed.mul_(self.decay).add_(self.current)
        self.current.zero_()

    def scores(self, groups: Iterable[Group] | None = None) -> torch.Tensor:
        """Smoothed Fisher (including what was gathered since the last roll) per group, ``nan`` if unscored."""
        total = self.smoothed * self.decay + self.current
        total = torch.where(self.has_score, total, torch.full_like(total, float("nan")))
        if groups is None:
            return total
        return total[[self._pos[g.id] for g in groups]]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.clone(), "smoothed": self.smoothed.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current.copy_(state["current"])
        self.smoothed.copy_(state["smoothed"])


class ActivationGram(StepHook):
    """Input Gram matrices ``H = sum_t h_t h_t^T`` of consumer layers, gathered by forward hooks during
    training steps (the statistics of LHSPG's explicit transfer, :mod:`lorashear.lhspg.transfer`).

    Only forward passes with gradients enabled count (training, not evaluation). At each :meth:`roll`
    (a period's selection) the running sums are multiplied by ``decay``, so newer steps weigh more. In a
    multi-process run :meth:`gram` sums the processes' matrices, so every process computes the same
    compensation. Memory: ``in_features^2`` floats per consumer layer. ``token_stride`` N uses every
    N-th token of each forward pass (N times cheaper; the transfer maps do not depend on the Gram's scale).
    """

    state_name = "activation_gram"

    def __init__(self, model: torch.nn.Module, modules: Iterable[str], *, decay: float = 0.5,
                 token_stride: int = 1) -> None:
        if token_stride < 1:
            raise ValueError(f"token_stride must be >= 1, got {token_stride}")
        self.decay = float(decay)
        self.token_stride = int(token_stride)
        named = dict(model.named_modules())
        self.grams: dict[str, torch.Tensor] = {}
        self._handles = []
        for name in sorted(set(modules)):
            if name not in named:
                raise ValueError(f"consumer module {name} not found in the model")
            self._handles.append(named[name].register_forward_hook(self._make_hook(name)))
        self.enabled = True

    @classmethod
    def for_groups(cls, model: torch.nn.Module, groups: Iterable[Group], *, decay: float = 0.5,
                   token_stride: int = 1) -> "ActivationGram":
        """Hooks on every consumer layer of ``groups``."""
        return cls(model, {module for g in groups for module, _ in consumer_columns(g)}, decay=decay,
                   token_stride=token_stride)

    def _make_hook(self, name: str):
        def forward_hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            if not self.enabled or not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
                return
            with torch.no_grad():
                h = args[0].detach().reshape(-1, args[0].shape[-1])[::self.token_stride].float()
                gram = self.grams.get(name)
                if gram is None:
                    gram = self.grams[name] = torch.zeros(h.shape[1], h.shape[1], device=h.device)
                gram.addmm_(h.t(), h)

        return forward_hook

    def gram(self, module: str) -> torch.Tensor | None:
        """The (decayed) Gram matrix of ``module``'s input, summed over processes; None before any data."""
        gram = self.grams.get(module)
        if gram is None:
            return None
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gram = gram.clone()
            dist.all_reduce(gram)
        return gram

    def roll(self) -> None:
        for gram in self.grams.values():
            gram.mul_(self.decay)

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"grams": {name: g.clone() for name, g in self.grams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grams = {name: g.clone() for name, g in state.get("grams", {}).items()}


__all__ = ["ActivationFisher", "ActivationGram", "LHSPGHook", "consumer_columns"]
