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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..compaction import index_positions
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


def consumer_slices(group: Group) -> list[tuple[str, str, tuple[int, ...]]]:
    """``(module name, weight name, input columns)`` of the consumer layers the group's output enters."""
    return [(consumer_module(s.name), s.name, s.indices) for s in group.slices
            if s.dim == 1 and not is_lora_name(s.name) and s.name.endswith("weight")]


def consumer_columns(group: Group) -> list[tuple[str, tuple[int, ...]]]:
    """``(module name, input columns)`` of the consumer layers the group's output enters."""
    return [(module, indices) for module, _, indices in consumer_slices(group)]


#: per consumer module: ``(input column indices, local owner index, owners' positions)`` per group kind
ColumnMaps = dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def column_maps(model: torch.nn.Module, groups: Sequence[Group]) -> tuple[torch.Tensor, ColumnMaps, dict[str, str]]:
    """Which input columns of which consumer module belong to which group.

    Returns whether each group has a consumer column, the maps (``index_add`` of per-column values by
    ``local`` into ``uniq`` positions sums them per group), and each consumer module's weight name.
    """
    has = torch.zeros(len(groups), dtype=torch.bool)
    cols: dict[str, dict[str, tuple[list[int], list[int]]]] = defaultdict(dict)
    weights: dict[str, str] = {}
    for pos, g in enumerate(groups):
        for module, weight, indices in consumer_slices(g):
            weights[module] = weight
            idx, owner = cols[module].setdefault(g.kind, ([], []))
            idx.extend(indices)
            owner.extend([pos] * len(indices))
            has[pos] = True
    modules = dict(model.named_modules())
    maps: ColumnMaps = {}
    for module, by_kind in cols.items():
        if module not in modules:
            raise ValueError(f"consumer module {module} not found in the model")
        maps[module] = []
        for idx, owner in by_kind.values():
            uniq, local = torch.unique(torch.tensor(owner, dtype=torch.long), return_inverse=True)
            maps[module].append((torch.tensor(idx, dtype=torch.long), local, uniq))
    return has, maps, weights


class _ConsumerScores(StepHook):
    """What the per-structure data scorers share: the column maps of the groups' consumer layers, one forward
    hook per consumer (``_make_forward_hook`` of the subclass), and scores returned per group."""

    def __init__(self, model: torch.nn.Module, groups: Sequence[Group], *, decay: float = 0.5) -> None:
        self.groups = list(groups)
        self.decay = float(decay)
        self._pos = {g.id: i for i, g in enumerate(self.groups)}
        self.has_score, self._maps, self._weight_names = column_maps(model, self.groups)
        self._setup(model)
        modules = dict(model.named_modules())
        self._handles = [modules[name].register_forward_hook(self._make_forward_hook(name))
                         for name in self._maps]
        self.enabled = True

    def _setup(self, model: torch.nn.Module) -> None:
        """Allocate the statistics (before the hooks are registered)."""

    def _make_forward_hook(self, name: str):  # pragma: no cover - every subclass defines it
        raise NotImplementedError

    def rebind(self, model: torch.nn.Module, kept: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """Follow structures cut out of ``model`` in place (:class:`lorashear.compaction.Compactions`): ``kept``
        holds, per cut parameter and dimension, the positions it kept. Each consumer's columns are re-indexed
        (a cut group loses its columns and its score); the statistics gathered so far stay with the groups that
        remain."""
        owned = torch.zeros(len(self.groups), dtype=torch.bool)
        for module, entries in self._maps.items():
            cols = kept.get(self._weight_names[module], {}).get(1)
            remapped = []
            for idx, local, uniq in entries:
                if cols is not None:
                    cut = cols.to(idx.device)
                    width = int(max(idx.max(), cut.max() if cut.numel() else idx.max())) + 1
                    moved = index_positions(cut, width)[idx]
                    alive = moved >= 0
                    owners = uniq.to(idx.device)[local][alive]
                    if not owners.numel():
                        continue
                    uniq, local = torch.unique(owners.cpu(), return_inverse=True)
                    idx, local = moved[alive], local.to(idx.device)
                remapped.append((idx, local, uniq))
                owned[uniq.cpu()] = True
            self._maps[module] = remapped  # an emptied consumer keeps its (empty) entry: its hook still runs
        self.has_score &= owned
        self._after_cut(model, kept)

    def _after_cut(self, model: torch.nn.Module, kept: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """Per-column statistics of a subclass follow the cut (nothing to do for per-group statistics)."""

    def _for_groups(self, total: torch.Tensor, groups: Iterable[Group] | None) -> torch.Tensor:
        """``total`` (one value per group of the scorer) with ``nan`` where a group has no consumer column,
        restricted to ``groups`` in their order."""
        total = torch.where(self.has_score, total, torch.full_like(total, float("nan")))
        if groups is None:
            return total
        return total[[self._pos[g.id] for g in groups]]

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class ActivationFisher(_ConsumerScores):
    """Per-structure activation Fisher ``sum_seq (sum_t sum_J h * dL/dh)^2``, gathered by hooks.

    Args:
        model: the (peft) model the groups are named on.
        groups: structures to score; those without a consumer column get no score (``nan``).
        decay: at each :meth:`roll` the running score is multiplied by ``decay`` before the new
            period's statistics are added (1 = plain sum over the run, 0 = last period only).
    """

    state_name = "activation_fisher"

    def _setup(self, model: torch.nn.Module) -> None:
        self.current = torch.zeros(len(self.groups), dtype=torch.float64)
        self.smoothed = torch.zeros(len(self.groups), dtype=torch.float64)

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
        if not maps:
            return
        if maps[0][0].device != c.device:
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
        return self._for_groups(self.smoothed * self.decay + self.current, groups)

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.clone(), "smoothed": self.smoothed.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current.copy_(state["current"])
        self.smoothed.copy_(state["smoothed"])


class ActivationFluctuation(_ConsumerScores):
    """FLAP's fluctuation metric per structure, gathered by forward hooks during training steps.

    For a structure whose output enters consumer input columns ``J``, the score is
    ``sum_{j in J} Var_t(h_tj) * ||W[:, j]||^2`` (An et al., FLAP, 2024): how much the consumer's output
    moves when column ``j`` is replaced by its mean, which bias compensation makes the removal's error.
    The per-column moments (token count, sum, sum of squares) accumulate per period and are smoothed across
    periods by ``decay`` like :class:`ActivationFisher`; the weight norms are read at scoring time from the
    consumer's base weight (the LoRA update is left out). Forward passes only: no gradient hook.
    """

    state_name = "activation_fluctuation"

    def _setup(self, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        self._weights = {module: params[name] for module, name in self._weight_names.items()}
        self.current = {m: torch.zeros(w.shape[1] * 2 + 1, dtype=torch.float64) for m, w in self._weights.items()}
        self.smoothed = {m: torch.zeros_like(t) for m, t in self.current.items()}

    def _make_forward_hook(self, name: str):
        def forward_hook(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
            # training steps only (as the Fisher): evaluation passes run under no_grad; an embedding (a hidden
            # channel's input-side slice) takes token ids, not activations
            if (not self.enabled or not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor)
                    or not args[0].is_floating_point()):
                return
            with torch.no_grad():
                self._accumulate(name, args[0])

        return forward_hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
        h = x.detach().float().reshape(-1, x.shape[-1])
        moments = self.current[name]
        if moments.device != h.device:  # kept where the activations are: no copy per layer and step
            moments = self.current[name] = moments.to(h.device)
        width = h.shape[1]
        moments[0] += h.shape[0]
        moments[1:width + 1] += h.sum(0).double()
        moments[width + 1:] += (h * h).sum(0).double()

    def _after_cut(self, model: torch.nn.Module, kept: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        params = dict(model.named_parameters())
        self._weights = {module: params[name] for module, name in self._weight_names.items()}
        for module, name in self._weight_names.items():
            cols = kept.get(name, {}).get(1)
            if cols is None:
                continue
            for moments in (self.current, self.smoothed):
                m = moments[module]
                width = (m.numel() - 1) // 2
                idx = cols.to(m.device)
                moments[module] = torch.cat([m[:1], m[1:width + 1][idx], m[width + 1:][idx]])

    def roll(self) -> None:
        """Fold the moments gathered since the last roll into the smoothed ones."""
        for m, cur in self.current.items():
            self.smoothed[m] = self.smoothed[m].to(cur.device).mul_(self.decay).add_(cur)
            cur.zero_()

    def column_scores(self, module: str) -> torch.Tensor:
        """``Var(h_j) * ||W[:, j]||^2`` of every input column of ``module`` (zeros before any step)."""
        cur = self.current[module]
        moments = (self.smoothed[module].to(cur.device) * self.decay + cur).cpu()
        width = (moments.numel() - 1) // 2
        n = moments[0].clamp_min(1.0)
        mean = moments[1:width + 1] / n
        var = (moments[width + 1:] / n - mean * mean).clamp_min(0.0)
        return var * self._weights[module].detach().double().pow(2).sum(0).cpu()

    def scores(self, groups: Iterable[Group] | None = None) -> torch.Tensor:
        """Fluctuation per group, ``nan`` if it has no consumer column."""
        total = torch.zeros(len(self.groups), dtype=torch.float64)
        for module, maps in self._maps.items():
            col = self.column_scores(module)
            for idx, local, uniq in maps:
                per_group = torch.zeros(uniq.numel(), dtype=torch.float64)
                per_group.index_add_(0, local.cpu(), col.index_select(0, idx.cpu()))
                total.index_add_(0, uniq, per_group)
        return self._for_groups(total, groups)

    def state_dict(self) -> dict[str, Any]:
        return {"current": {m: t.clone() for m, t in self.current.items()},
                "smoothed": {m: t.clone() for m, t in self.smoothed.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for m in self.current:
            self.current[m].copy_(state["current"][m])
            self.smoothed[m].copy_(state["smoothed"][m])


#: the step hook that measures each data criterion (``lorashear.lhspg.saliency.DATA_CRITERIA``), by name
DATA_SCORERS: dict[str, type[StepHook]] = {"fisher": ActivationFisher, "fluctuation": ActivationFluctuation}


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
            if (not self.enabled or not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor)
                    or not args[0].is_floating_point()):  # an embedding takes token ids, not activations
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

    def cut_inputs(self, module: str, kept: torch.Tensor) -> None:
        """``module`` lost input columns (structures cut out): keep the Gram's rows and columns of ``kept``."""
        gram = self.grams.get(module)
        if gram is not None:
            idx = kept.to(gram.device)
            self.grams[module] = gram.index_select(0, idx).index_select(1, idx).contiguous()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {"grams": {name: g.clone() for name, g in self.grams.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.grams = {name: g.clone() for name, g in state.get("grams", {}).items()}


__all__ = ["ActivationFisher", "ActivationFluctuation", "ActivationGram", "DATA_SCORERS", "LHSPGHook",
           "column_maps", "consumer_columns", "consumer_slices"]
