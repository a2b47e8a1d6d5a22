"""Physically remove groups: the dense, smaller model whose outputs equal the masked one.

``compact(model, groups)`` slices every parameter named by the groups (output
rows and input columns alike, LoRA factors included), refreshes the width
attributes of the touched modules (``nn.Linear.in_features``, peft's
``in_features``/``out_features``, the attention module's head counts) and
rewrites the config: global widths when every layer ends up alike, otherwise
transformers' ``per_layer_config`` (layer index -> overrides), which
:func:`lorashear.load_pretrained` rebuilds.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import ConfigError
from .graph.groups import Group, ParamSlice, RmsScale, removal_plan
from .models.adapters import LayerWidths, ModelAdapter, adapter_for

logger = logging.getLogger(__name__)


def _param_owners(model: torch.nn.Module) -> dict[int, list[tuple[torch.nn.Module, str]]]:
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = defaultdict(list)
    for module in model.modules():
        for attr, p in module._parameters.items():  # noqa: SLF001 - torch's own registry
            if p is not None:
                owners[id(p)].append((module, attr))
    return owners


def _base_config(model: torch.nn.Module) -> Any:
    if hasattr(model, "get_base_model"):
        return model.get_base_model().config
    return model.config


#: a replaced parameter: ``old id -> (new parameter, {dim: kept indices})``
Replacements = dict[int, tuple[torch.nn.Parameter, dict[int, torch.Tensor]]]


@torch.no_grad()
def compact(model: torch.nn.Module, groups: Iterable[Group], *, merge_lora: bool = False,
            replacements: Replacements | None = None) -> torch.nn.Module:
    """Remove ``groups`` from ``model`` in place and return the (smaller) model.

    Args:
        model: the model the groups were discovered on (peft-wrapped or not).
        groups: groups from :func:`lorashear.discover` on this model.
        merge_lora: merge LoRA into the base weights afterwards and return the plain
            transformers model (``merge_and_unload``).
        replacements: filled with every parameter replaced and the index maps that made it, so
            state kept elsewhere (an optimizer's moments: :func:`slice_optimizer`) can follow.
    """
    groups = list(groups)
    if not groups:
        return model.merge_and_unload() if merge_lora and hasattr(model, "merge_and_unload") else model
    named = dict(model.named_parameters())
    check_groups(named, groups)
    config = _base_config(model)
    adapter = adapter_for(config)
    new_widths, hidden_removed = _new_widths(adapter, groups)

    plan = removal_plan(groups)
    rms_scales = {scale: named[scale.name].shape[0] for g in groups for scale in g.rms_scales}
    owners = _param_owners(model)
    touched: set[int] = set()
    for name, dims in plan.items():
        p = named[name]
        new = p.data
        kept: dict[int, torch.Tensor] = {}
        for dim, removed in sorted(dims.items()):
            alive = torch.ones(new.shape[dim], dtype=torch.bool)
            alive[list(removed)] = False
            keep = alive.nonzero().flatten().to(new.device)
            new = new.index_select(dim, keep)
            kept[dim] = keep
        replacement = torch.nn.Parameter(new.contiguous(), requires_grad=p.requires_grad)
        if replacements is not None:
            replacements[id(p)] = (replacement, kept)
        for module, attr in owners[id(p)]:
            module._parameters[attr] = replacement  # noqa: SLF001
            touched.add(id(module))
    for module in model.modules():
        if id(module) in touched or _has_touched_child(module, touched):
            _refresh_widths(module)

    _rescale_rms_scales(model, rms_scales)
    if hidden_removed:
        _rescale_norms_for_hidden(model, config, hidden_removed, adapter.norm_offset)
    _update_config(model, config, adapter, new_widths)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    return model


@torch.no_grad()
def slice_optimizer(optimizer: torch.optim.Optimizer, replacements: Replacements) -> None:
    """Make ``optimizer`` follow a :func:`compact`: its replaced parameters become the new ones, and every
    per-parameter state tensor of their shape (AdamW's moments, SGD's momentum) is sliced with the same
    index maps; scalar state (AdamW's step) is kept. The remaining entries are then exactly the state the
    optimizer would hold had it trained the smaller model all along."""
    for group in optimizer.param_groups:
        group["params"] = [replacements[id(p)][0] if id(p) in replacements else p for p in group["params"]]
    for old in [p for p in list(optimizer.state) if id(p) in replacements]:
        new, kept = replacements[id(old)]
        state = optimizer.state.pop(old)
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old.shape:
                for dim, keep in sorted(kept.items()):
                    value = value.index_select(dim, keep.to(value.device))
                state[key] = value.contiguous()
        optimizer.state[new] = state


def index_positions(kept: torch.Tensor, size: int) -> torch.Tensor:
    """Where each of ``size`` indices went once only ``kept`` (ascending) were kept: its new position, or -1."""
    position = torch.full((size,), -1, dtype=torch.long, device=kept.device)
    position[kept] = torch.arange(kept.numel(), device=kept.device)
    return position


@dataclass
class CompactionStep:
    """One :meth:`Compactions.apply`: the replaced parameters and, by parameter name, the positions kept along
    each cut dimension (positions before this step)."""

    replacements: Replacements
    kept: dict[str, dict[int, torch.Tensor]]


class Compactions:
    """Compactions applied one after another to a model that keeps training (LHSPG cuts out each pruning period's
    structures as the period ends), and every remaining group re-indexed to the model as it is now.

    Groups keep the indices of the model they were discovered on; :meth:`current` maps them through every step
    applied so far (an index cut out is dropped: a query-head slot loses the rows of a removed KV group). Replaying
    :attr:`rounds` on a fresh copy of that model, step by step, rebuilds the same model (a resume).
    """

    def __init__(self, groups: Iterable[Group]) -> None:
        self._groups = {g.id: g for g in groups}
        #: the group ids of every step, in order
        self.rounds: list[list[int]] = []
        self._removed: set[int] = set()
        self._positions: dict[tuple[str, int], torch.Tensor] = {}
        self._lists: dict[tuple[str, int], list[int]] = {}  # the same, as lists (re-indexing groups one by one)

    @property
    def positions(self) -> dict[tuple[str, int], torch.Tensor]:
        """Per cut ``(parameter, dim)``: the current position of every index of the original model (-1: cut out);
        :class:`lorashear.lhspg.tables.SliceTable` re-indexes whole tables with it."""
        return dict(self._positions)

    @property
    def removed(self) -> set[int]:
        """The ids of every group cut out so far."""
        return set(self._removed)

    def current(self, group: Group) -> Group | None:
        """``group`` with the indices of the model as it is now; ``None`` once it has been cut out."""
        if group.id in self._removed:
            return None
        if not any((s.name, s.dim) in self._lists for s in group.slices):
            return group
        slices = []
        for s in group.slices:
            pos = self._lists.get((s.name, s.dim))
            if pos is None:
                slices.append(s)
                continue
            indices = tuple(j for j in (pos[i] for i in s.indices) if j >= 0)
            if indices:
                slices.append(ParamSlice(s.name, s.dim, indices))
        return dataclasses.replace(group, slices=slices)

    @torch.no_grad()
    def apply(self, model: torch.nn.Module, ids: Sequence[int]) -> CompactionStep:
        """Cut the groups ``ids`` (of the original model) out of ``model`` in place (:func:`compact`, LoRA factors
        sliced too, not merged) and record the step."""
        unknown = [i for i in ids if i not in self._groups or i in self._removed]
        if unknown:
            raise ConfigError(f"group {unknown[0]} is not in the model any more (or never was); "
                              "compact each group once")
        groups = [self.current(self._groups[i]) for i in ids]
        before = dict(model.named_parameters(remove_duplicate=False))
        replacements: Replacements = {}
        compact(model, groups, replacements=replacements)  # type: ignore[arg-type]
        kept = {name: {dim: keep.cpu() for dim, keep in replacements[id(p)][1].items()}
                for name, p in before.items() if id(p) in replacements}
        for name, dims in kept.items():
            for dim, keep in dims.items():
                new = index_positions(keep, before[name].shape[dim] + 1)  # the extra last slot: -1 stays -1
                old = self._positions.get((name, dim))
                moved = self._positions[(name, dim)] = new[:-1] if old is None else new[old]
                self._lists[(name, dim)] = moved.tolist()
        self._removed.update(ids)
        self.rounds.append(list(ids))
        return CompactionStep(replacements=replacements, kept=kept)


def check_groups(named: dict[str, torch.Tensor], groups: Sequence[Group]) -> None:
    """Refuse groups that are not this model's: a parameter it lacks, an index past a dimension's
    end (groups discovered on another, larger model), or the same group twice."""
    seen: dict[tuple, int] = {}
    for g in groups:
        key = (g.kind, g.layer, g.index, tuple((s.name, s.dim, s.indices) for s in g.slices))
        if key in seen:
            raise ConfigError(f"group {g.id} ({g.kind}, layer {g.layer}, index {g.index}) is given twice; "
                              "pass each group once")
        seen[key] = g.id
        for s in g.slices:
            p = named.get(s.name)
            if p is None:
                raise ConfigError(f"group {g.id} names a parameter this model does not have ({s.name}); "
                                  "discover groups on the same model you compact")
            if not 0 <= s.dim < p.dim() or any(not 0 <= i < p.shape[s.dim] for i in s.indices):
                raise ConfigError(f"group {g.id} ({g.kind}, layer {g.layer}) does not fit {s.name} of shape "
                                  f"{tuple(p.shape)}: it comes from another model; discover groups on the same "
                                  "model you compact")


def _has_touched_child(module: torch.nn.Module, touched: set[int]) -> bool:
    return any(id(child) in touched for child in module.children())


def _refresh_widths(module: torch.nn.Module) -> None:
    if isinstance(module, torch.nn.Linear):
        module.out_features, module.in_features = module.weight.shape
    elif isinstance(module, torch.nn.Embedding):
        module.num_embeddings, module.embedding_dim = module.weight.shape
    base = getattr(module, "base_layer", None)
    if base is not None and isinstance(base, torch.nn.Linear) and hasattr(module, "in_features"):
        module.out_features, module.in_features = base.weight.shape


def _new_widths(adapter: ModelAdapter, groups: Sequence[Group]) -> tuple[dict[int, LayerWidths], int]:
    removed: dict[int, dict[str, set[int]]] = defaultdict(lambda: defaultdict(set))
    hidden = set()
    for g in groups:
        if g.kind == "hidden_channel":
            hidden.add(g.index)
        elif g.layer is not None:
            removed[g.layer][g.kind].add(g.index)
    out: dict[int, LayerWidths] = {}
    for layer in range(adapter.num_layers):
        w = adapter.layer_widths(layer)
        r = removed.get(layer, {})
        kv = w.num_key_value_heads
        slots = w.num_attention_heads // kv
        if kv == w.num_attention_heads:  # plain multi-head attention: a head is its own KV group
            gone = len(r.get("attention_head", set()) | r.get("kv_group", set()))
            new_kv = kv - gone
            heads = new_kv
        else:
            new_kv = kv - len(r.get("kv_group", set()))
            heads = new_kv * (slots - len(r.get("attention_head", set())))
        if heads <= 0 or new_kv <= 0:
            raise ConfigError(f"layer {layer}: the selection removes every attention head; keep at least one "
                              "KV group and one query-head slot per layer")
        out[layer] = LayerWidths(heads, new_kv, w.intermediate_size - len(r.get("mlp_channel", set())))
    return out, len(hidden)


def _rescale_rms_scales(model: torch.nn.Module, sizes: dict[RmsScale, int]) -> None:
    """RMS norms over a group's channels (OLMo 2's ``q_norm``/``k_norm`` over a whole projection): the
    mean of squares now runs over ``n_kept`` channels instead of ``n`` (zeros included), so the scale
    ``param + shift`` is multiplied by ``sqrt(n / n_kept)`` (see :class:`~lorashear.graph.groups.RmsScale`;
    exact up to ``eps``, which is kept)."""
    if not sizes:
        return
    params = dict(model.named_parameters())
    for scale, n in sizes.items():
        weight = params[scale.name]
        kept = weight.shape[0]
        if kept < n:
            weight.data.copy_((weight.data + scale.shift) * math.sqrt(n / kept) - scale.shift)


def _rescale_norms_for_hidden(model: torch.nn.Module, config: Any, removed: int, norm_offset: float) -> None:
    """RMSNorm over fewer channels: keep outputs equal by scaling weights and epsilon.

    With ``n`` channels of which ``k`` are zero, ``x / sqrt(S/n + eps)`` equals
    ``sqrt(n/(n-k)) * x / sqrt(S/(n-k) + eps * n/(n-k))``. The norm scales by
    ``weight - norm_offset`` (the family's offset, from its adapter), which is what gets rescaled.
    """
    n = int(config.hidden_size)
    kept = n - removed
    factor = math.sqrt(n / kept)
    eps_key = "rms_norm_eps" if hasattr(config, "rms_norm_eps") else None
    for module in model.modules():
        weight = getattr(module, "weight", None)
        eps_attr = next((a for a in ("variance_epsilon", "eps") if hasattr(module, a)), None)
        if weight is None or eps_attr is None or weight.dim() != 1 or weight.shape[0] != kept:
            continue
        weight.data.copy_((weight.data - norm_offset) * factor + norm_offset)
        setattr(module, eps_attr, float(getattr(module, eps_attr)) * n / kept)
    config.hidden_size = kept
    if eps_key:
        setattr(config, eps_key, float(getattr(config, eps_key)) * n / kept)


def _update_config(model: torch.nn.Module, config: Any, adapter: ModelAdapter, widths: dict[int, LayerWidths]) -> None:
    distinct = set(widths.values())
    layers_name, layers = adapter.decoder_layers(model)
    # head_dim must not be re-derived from hidden_size // num_attention_heads after pruning
    config.head_dim = adapter.head_dim
    if len(distinct) == 1:
        w = next(iter(distinct))
        config.per_layer_config = None
        config.num_attention_heads = w.num_attention_heads
        config.num_key_value_heads = w.num_key_value_heads
        config.intermediate_size = w.intermediate_size
        for idx, layer in enumerate(layers):
            adapter.apply_layer_widths(layer, config, w)
        return
    # heterogeneous: global values stay the largest widths; each layer gets overrides
    config.per_layer_config = None
    config.num_attention_heads = max(w.num_attention_heads for w in distinct)
    config.num_key_value_heads = max(w.num_key_value_heads for w in distinct)
    config.intermediate_size = max(w.intermediate_size for w in distinct)
    overrides = {
        idx: {"num_attention_heads": w.num_attention_heads, "num_key_value_heads": w.num_key_value_heads,
              "intermediate_size": w.intermediate_size}
        for idx, w in widths.items()
    }
    config.per_layer_config = overrides
    # Family configs (e.g. LlamaConfig.validate_architecture) check the global head count against
    # hidden_size; the global values above are the unpruned-style maxima, so reading them is safe.
    config.allow_global_per_layer_attribute_access = True
    for idx, layer in enumerate(layers):
        adapter.apply_layer_widths(layer, config.per_layer_config[idx], widths[idx])
