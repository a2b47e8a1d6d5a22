"""Prunable structures ("groups") and the graph that holds them.

A :class:`Group` is a *minimally removable structure*: the set of parameter
slices that must disappear together for the model to stay well-formed. Its
defining property is **zero-invariance**: setting every slice of the group to
zero changes the model's outputs exactly as physically removing the structure
does. Example (a LLaMA MLP channel ``i`` with LoRA on gate/up/down)::

    gate_proj.base_layer.weight  dim 0  [i]     (row i)
    gate_proj.lora_B.default.weight dim 0 [i]   (row i of lora_B)
    up_proj.base_layer.weight    dim 0  [i]
    up_proj.lora_B.default.weight dim 0 [i]
    down_proj.base_layer.weight  dim 1  [i]     (column i)
    down_proj.lora_A.default.weight dim 1 [i]   (column i of lora_A)

Zeroing those gives ``act(0) * 0 = 0`` into column ``i`` of ``down_proj``,
which is itself zero: the channel contributes nothing, so deleting it is exact.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

GroupKind = Literal["attention_head", "kv_group", "mlp_channel", "hidden_channel"]
GROUP_KINDS: tuple[GroupKind, ...] = ("attention_head", "kv_group", "mlp_channel", "hidden_channel")


@dataclass(frozen=True)
class ParamSlice:
    """``indices`` along dimension ``dim`` of the parameter called ``name``."""

    name: str
    dim: int
    indices: tuple[int, ...]

    def __iter__(self) -> Iterator[object]:  # lets callers unpack (name, dim, indices)
        return iter((self.name, self.dim, self.indices))

    def index_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        return torch.tensor(self.indices, dtype=torch.long, device=device)


@dataclass(frozen=True, order=True)
class RmsScale:
    """A parameter that scales an RMS norm over a group's channels (OLMo 2's ``q_norm`` over a whole
    projection): the norm multiplies ``x / sqrt(mean(x^2) + eps)`` by ``param + shift``.

    Zeroed channels still count in the mean of the masked model; once ``n - n_kept`` of its ``n``
    channels are removed, the mean runs over ``n_kept``, so :func:`lorashear.compact` multiplies
    ``param + shift`` by ``sqrt(n / n_kept)``: with ``S`` the sum of squares of the kept channels,
    ``sqrt(n / n_kept) / sqrt(S / n_kept + eps) = 1 / sqrt(S / n + eps * n_kept / n)``, the masked
    value with ``eps`` scaled by ``n_kept / n``: exact up to that change of ``eps`` (the ``eps``
    attribute stays, so a saved model reloads the same).
    """

    name: str
    shift: float = 0.0


@dataclass(eq=False)
class Group:
    """One minimally removable structure.

    Attributes:
        id: position in :attr:`StructureGraph.groups`.
        kind: ``attention_head`` (a query-head slot under GQA, a whole head otherwise),
            ``kv_group``, ``mlp_channel`` or ``hidden_channel``.
        layer: decoder layer index, ``None`` for structures spanning layers (hidden channels).
        index: the structure's index within its layer and kind (head slot, KV group, channel).
        slices: exactly the variables the group owns.
        num_params: parameters removed if this group alone is pruned (LoRA included).
        prunable: ``False`` for structures that must stay (e.g. they touch the output).
        width: channels of the structure (head_dim for heads, 1 for channels).
        rms_scales: RMS norm scales over the structure's channels that compaction rescales.
    """

    id: int
    kind: GroupKind
    layer: int | None
    index: int
    slices: list[ParamSlice]
    num_params: int
    prunable: bool = True
    width: int = 1
    lora_params: int = 0
    meta: dict[str, object] = field(default_factory=dict)
    rms_scales: tuple[RmsScale, ...] = ()

    def __repr__(self) -> str:
        return (f"Group(id={self.id}, kind={self.kind!r}, layer={self.layer}, index={self.index}, "
                f"num_params={self.num_params}, prunable={self.prunable}, slices={len(self.slices)})")

    @property
    def base_params(self) -> int:
        return self.num_params - self.lora_params

    def param_names(self) -> list[str]:
        return [s.name for s in self.slices]


@dataclass
class StructureGraph:
    """The result of :func:`lorashear.discover`: every group of a model.

    Attributes:
        groups: all groups, prunable or not.
        model_type: ``config.model_type`` of the traced model.
        num_layers: decoder layers.
        total_params: parameters of the traced model (LoRA included, tied weights once).
        param_shapes: shape of every parameter named in a slice.
        lora: whether LoRA adapters were attached when traced.
    """

    groups: list[Group]
    model_type: str
    num_layers: int
    total_params: int
    param_shapes: dict[str, tuple[int, ...]]
    lora: bool = False
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Iterator[Group]:
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def prunable(self) -> list[Group]:
        return [g for g in self.groups if g.prunable]

    def by_kind(self, kind: GroupKind) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def in_layer(self, layer: int, kinds: Iterable[GroupKind] | None = None) -> list[Group]:
        wanted = set(kinds) if kinds is not None else None
        return [g for g in self.groups if g.layer == layer and (wanted is None or g.kind in wanted)]

    def removed_params(self, groups: Sequence[Group]) -> int:
        """Parameters removed by pruning ``groups`` together (overlaps counted once)."""
        return count_removed_params(groups, self.param_shapes)

    def summary(self) -> list[dict[str, object]]:
        rows: dict[str, dict[str, object]] = {}
        for g in self.groups:
            row = rows.setdefault(g.kind, {"kind": g.kind, "count": 0, "prunable": 0, "params": 0})
            row["count"] = int(row["count"]) + 1  # type: ignore[arg-type]
            row["prunable"] = int(row["prunable"]) + int(g.prunable)  # type: ignore[arg-type]
            row["params"] = int(row["params"]) + g.num_params  # type: ignore[arg-type]
        return [rows[k] for k in GROUP_KINDS if k in rows]


def removal_plan(groups: Iterable[Group]) -> dict[str, dict[int, set[int]]]:
    """Union of the groups' slices: ``{param_name: {dim: indices}}``."""
    plan: dict[str, dict[int, set[int]]] = {}
    for g in groups:
        for s in g.slices:
            plan.setdefault(s.name, {}).setdefault(s.dim, set()).update(s.indices)
    return plan


def count_removed_params(groups: Iterable[Group], param_shapes: dict[str, tuple[int, ...]]) -> int:
    """Exact parameter drop of removing ``groups`` together (the union of their slices)."""
    total = 0
    for name, dims in removal_plan(groups).items():
        shape = param_shapes[name]
        kept = 1
        for d, size in enumerate(shape):
            kept *= size - len(dims.get(d, ()))
        full = 1
        for size in shape:
            full *= size
        total += full - kept
    return total


@torch.no_grad()
def zero_groups(model: torch.nn.Module, groups: Iterable[Group]) -> None:
    """Set every variable of ``groups`` to zero in place (the masked model)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, dims in removal_plan(groups).items():
        p = params[name]
        for dim, idx in dims.items():
            p.index_fill_(dim, torch.tensor(sorted(idx), dtype=torch.long, device=p.device), 0.0)
