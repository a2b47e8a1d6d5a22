"""``discover(model)``: trace a causal LM (optionally with LoRA) into removable groups.

Steps:

1. trace one short forward pass with :class:`~lorashear.graph.trace.SpaceTracer`
   (on whatever device the model lives, ``meta`` included);
2. add what LoRA layers are known to be (composed operators): ``lora_A`` columns
   share the base layer's input space, ``lora_B`` rows its output space, and the
   rank space between them is never a unit — this also covers merged or
   disabled adapters, which do not appear in the trace;
3. break every parameter dimension into atom coordinates and classify atoms:
   atoms inside an attention head space are heads (the atom shared with the
   key/value projections is the KV group, the others query-head slots), the
   atom of the embedding output is the hidden (residual) channel, the rest of the
   atoms that join a layer's output rows to another layer's input columns are
   MLP channels;
4. every reduction the trace recorded over a tracked dimension (a norm, a mean, a
   softmax...) couples the atoms under it: their groups become unprunable, naming the
   operator, unless it is exact (a sum of zeros) or exact after compaction rescales an
   RMS norm's scale (:class:`~lorashear.graph.groups.RmsScale`, carried by the group);
5. one :class:`~lorashear.graph.groups.Group` per index of every atom;
6. a family without a dedicated adapter is checked first on a tiny random copy of its
   config (:mod:`lorashear.graph.selfcheck`): zeroing groups of each kind must equal
   removing them, else discovery refuses.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UnsupportedArchitectureError
from ..models.adapters import adapter_for
from .groups import Group, GroupKind, ParamSlice, RmsScale, StructureGraph
from .selfcheck import check_zero_invariance
from .trace import TraceResult, trace_spaces

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DiscoveryOptions:
    """Options of :func:`discover`.

    Attributes:
        hidden: also emit hidden (residual-stream) channel groups, prunable.
        seq_len: tokens in the traced forward pass.
    """

    hidden: bool = False
    seq_len: int = 4


def _lora_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:  # pragma: no cover - peft is a dependency
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def _config_of(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None and hasattr(model, "get_base_model"):
        config = model.get_base_model().config
    if config is None:
        raise UnsupportedArchitectureError(f"{type(model).__name__} has no .config; pass a Hugging Face model")
    return config


def discover(model: torch.nn.Module, *, hidden: bool = False, seq_len: int = 4,
             self_check: bool = True) -> StructureGraph:
    """Find every minimally removable structure of ``model``.

    Args:
        model: a Hugging Face causal LM, optionally wrapped by peft (``get_peft_model``).
        hidden: also return hidden (residual-stream) channels as prunable groups.
        seq_len: length of the traced input (a few tokens suffice).
        self_check: for a family without a dedicated adapter, first check on a tiny random copy of its
            config that removing groups equals zeroing them (:mod:`lorashear.graph.selfcheck`).

    Raises:
        ConfigError: the family has no dedicated adapter and fails the self-check.

    Returns:
        A :class:`StructureGraph` whose ``groups`` name, for each structure, the exact
        parameter slices it owns (``named_parameters()`` names of ``model``).
    """
    start = time.perf_counter()
    config = _config_of(model)
    adapter = adapter_for(config)
    if self_check and not adapter.dedicated:
        check_zero_invariance(model, discover)
    named = dict(model.named_parameters())
    param_device = next(iter(named.values())).device if named else torch.device("cpu")
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    input_ids = (torch.arange(seq_len, device=param_device) % max(vocab - 1, 1)).unsqueeze(0) + 1
    was_training = model.training
    model.eval()
    try:
        trace = trace_spaces(model, input_ids, named)
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:
        raise UnsupportedArchitectureError(
            f"model type '{adapter.model_type}': tracing the forward pass failed in "
            f"{type(exc).__name__}: {exc}") from exc
    finally:
        model.train(was_training)
    lora_modules = _lora_layers(model)
    lora_param_names = _add_lora_structure(trace, lora_modules, named)
    graph = _build_groups(model, trace, named, lora_param_names, adapter, hidden=hidden)
    graph.lora = bool(lora_modules)
    logger.info("discovered %d groups (%d prunable) in %.2f s", len(graph.groups), len(graph.prunable()),
                time.perf_counter() - start)
    return graph


def _add_lora_structure(trace: TraceResult, lora_modules: list[tuple[str, torch.nn.Module]],
                        named: dict[str, torch.nn.Parameter]) -> set[str]:
    by_id = {id(p): n for n, p in named.items()}
    table = trace.table
    lora_names: set[str] = set()
    for _name, module in lora_modules:
        base = getattr(module, "base_layer", None)
        weight = getattr(base, "weight", None)
        if weight is None or id(weight) not in by_id:
            continue
        base_spaces = trace.param_spaces[by_id[id(weight)]]
        for adapter_name, a_mod in getattr(module, "lora_A", {}).items():
            b_mod = module.lora_B[adapter_name]
            a_name, b_name = by_id.get(id(a_mod.weight)), by_id.get(id(b_mod.weight))
            if a_name is None or b_name is None:
                continue
            lora_names.update((a_name, b_name))
            a_sp, b_sp = trace.param_spaces[a_name], trace.param_spaces[b_name]
            # lora_A: (r, in) shares the base input space; lora_B: (out, r) the base output space
            if a_sp[1] is not None and base_spaces[1] is not None:
                table.union(a_sp[1], base_spaces[1])
            if b_sp[0] is not None and base_spaces[0] is not None:
                table.union(b_sp[0], base_spaces[0])
            for rank_space in (a_sp[0], b_sp[1]):
                if rank_space is not None:
                    table.tag(rank_space, "lora_rank")
            if a_sp[0] is not None and b_sp[1] is not None:
                table.union(a_sp[0], b_sp[1])
        for adapter_name in getattr(module, "lora_embedding_A", {}):
            for pname in (f"lora_embedding_A.{adapter_name}", f"lora_embedding_B.{adapter_name}"):
                lora_names.update(n for n in named if n.endswith(pname))
    return lora_names


def _layer_of_params(model: torch.nn.Module, named: dict[str, torch.nn.Parameter], adapter) -> dict[str, int]:
    layers_name, layers = adapter.decoder_layers(model)
    owner: dict[int, int] = {}
    for idx, layer in enumerate(layers):
        for p in layer.parameters():
            owner[id(p)] = idx
    return {n: owner[id(p)] for n, p in named.items() if id(p) in owner}


def _build_groups(model: torch.nn.Module, trace: TraceResult, named: dict[str, torch.nn.Parameter],
                  lora_names: set[str], adapter, *, hidden: bool) -> StructureGraph:
    table = trace.table
    layer_of = _layer_of_params(model, named, adapter)
    shapes = {n: tuple(p.shape) for n, p in named.items()}

    # atom -> list of (param, dim, coords)
    occurrences: dict[int, list[tuple[str, int, np.ndarray]]] = defaultdict(list)
    #: (param, dim) -> {atom: coordinate array}, computed once and reused when classifying heads
    dim_coords: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    blocked_atoms: set[int] = set()
    for pname, spaces in trace.param_spaces.items():
        for dim, sid in enumerate(spaces):
            if sid is None:
                continue
            info = table.info(sid)
            if info.tags & {"vocab", "output", "lora_rank"}:
                continue
            coords, blocked = table.coordinates(sid)
            blocked_atoms |= blocked
            by_atom = {table.find(atom): arr for atom, arr in coords.items()}
            dim_coords[(pname, dim)] = by_atom
            for atom, arr in by_atom.items():
                occurrences[atom].append((pname, dim, arr))

    # hidden atoms: those of the embedding output (dim 1 of an embedding weight traced as 'vocab' x hidden)
    hidden_atoms: set[int] = set()
    for pname, spaces in trace.param_spaces.items():
        if len(spaces) == 2 and spaces[0] is not None and "vocab" in table.info(spaces[0]).tags and spaces[1] is not None:
            hidden_atoms |= {table.find(a) for a in table.coordinates(spaces[1])[0]}

    # head spaces: spaces tagged attention_heads -> their atoms
    head_atoms: dict[int, str] = {}
    seen_head_spaces: set[int] = set()
    candidate_heads = _tagged_spaces(table, "attention_heads")
    for hs in candidate_heads:
        if hs in seen_head_spaces:
            continue
        seen_head_spaces.add(hs)
        atoms = [table.find(a) for a in table.coordinates(hs)[0]]
        if len(atoms) == 1:
            head_atoms[atoms[0]] = "attention_head"
            continue
        for a in atoms:
            # the KV-group atom also indexes elements (key/value rows) where the other head atoms do not
            alone = False
            for p, d, arr in occurrences.get(a, []):
                by_atom = dim_coords[(p, d)]
                mine = arr >= 0
                if any(np.any(mine & (by_atom.get(b, np.full_like(arr, -1)) < 0)) for b in atoms if b != a):
                    alone = True
                    break
            head_atoms[a] = "kv_group" if alone else "attention_head"

    coupled, rms_scales = _reductions_by_atom(trace)
    warned: dict[tuple[str, str], list[int | None]] = defaultdict(list)
    groups: list[Group] = []
    notes: list[str] = []
    for atom, occ in sorted(occurrences.items(), key=lambda kv: _order_key(kv[1], layer_of)):
        info = table.info(atom)
        if info.tags & {"lora_rank", "vocab", "output", "fragment"} or info.indivisible:
            continue  # never a unit: LoRA rank, vocabulary, logits, or inside an attention head
        produces = any(d == 0 and len(shapes[p]) == 2 and p not in lora_names for p, d, _ in occ)
        consumes = any(d == 1 and len(shapes[p]) == 2 and p not in lora_names for p, d, _ in occ)
        if atom in hidden_atoms:
            if not hidden:
                continue
            kind: GroupKind = "hidden_channel"
        elif atom in head_atoms:
            kind = head_atoms[atom]  # type: ignore[assignment]
        else:
            if "broadcast" in info.tags or "constant" in info.tags:
                continue
            kind = "mlp_channel"
        prunable = True
        reasons: list[str] = []
        if atom in blocked_atoms or info.blocked:
            prunable = False
            reasons = list(info.blocked) or ["inside a blocked space"]
        if not (produces and consumes):
            prunable = False
            reasons.append("does not join an output row to an input column")
        if coupled.get(atom):
            prunable = False
            reasons.extend(coupled[atom])
        if kind == "hidden_channel" and not adapter.supports_hidden_pruning:
            prunable = False
            reasons.append(f"hidden-channel removal is not exact for model type '{adapter.model_type}'")
        if kind == "hidden_channel" and "mean_centered" in info.tags:
            prunable = False
            reasons.append("LayerNorm mean-centres the hidden channels")
        layers = {layer_of.get(p) for p, _, _ in occ if p not in lora_names}
        layer = next(iter(layers)) if len(layers) == 1 else None
        size = table.size(atom)
        if kind == "hidden_channel":
            layer = None
        # slices per index: argsort each coordinate array once
        per_index: list[list[ParamSlice]] = [[] for _ in range(size)]
        for p, d, arr in occ:
            valid = np.nonzero(arr >= 0)[0]
            order = valid[np.argsort(arr[valid], kind="stable")]
            values = arr[order]
            bounds = np.searchsorted(values, np.arange(size + 1))
            for i in range(size):
                idx = order[bounds[i]:bounds[i + 1]]
                if len(idx):
                    per_index[i].append(ParamSlice(p, d, tuple(int(x) for x in np.sort(idx))))
        width = _width(per_index[0], shapes) if size else 0
        # hidden channels: the adapter's hidden rescale (every norm, eps included) compensates RMS norms
        scales = tuple(sorted(rms_scales.get(atom, ()))) if kind != "hidden_channel" else ()
        for i in range(size):
            slices = per_index[i]
            num, lora_num = 0, 0
            for s in slices:
                other = int(np.prod([n for k, n in enumerate(shapes[s.name]) if k != s.dim]))
                cnt = len(s.indices) * other
                num += cnt
                if s.name in lora_names:
                    lora_num += cnt
            groups.append(Group(id=len(groups), kind=kind, layer=layer, index=i, slices=slices, num_params=num,
                                prunable=prunable, width=width, lora_params=lora_num,
                                meta={"reasons": reasons} if reasons else {}, rms_scales=scales))
        if not prunable and reasons and kind != "hidden_channel":
            notes.append(f"{kind} groups of layer {layer} not prunable: {'; '.join(reasons)}")
        if coupled.get(atom) and (kind != "hidden_channel" or hidden):
            warned[(kind, "; ".join(coupled[atom]))].append(layer)

    for (kind, why), layers_hit in warned.items():
        where = ", ".join(str(x) for x in sorted({x for x in layers_hit if x is not None})) or "-"
        logger.warning("model type '%s': %s groups (layers %s) are not prunable: %s", adapter.model_type, kind,
                       where, why)

    # re-number ids and per-layer indices in a stable, readable order
    groups.sort(key=lambda g: (g.layer if g.layer is not None else -1, _KIND_ORDER[g.kind], g.index))
    counters: dict[tuple[int | None, str], int] = defaultdict(int)
    for new_id, g in enumerate(groups):
        g.id = new_id
        key = (g.layer, g.kind)
        g.index = counters[key]
        counters[key] += 1

    total = sum(p.numel() for p in named.values())
    graph = StructureGraph(groups=groups, model_type=adapter.model_type, num_layers=adapter.num_layers,
                           total_params=total, param_shapes=shapes, notes=notes)
    if not any(g.prunable for g in groups):
        ops = ", ".join(f"'{k}'" for k in sorted(trace.unknown_ops)) or "none"
        raise UnsupportedArchitectureError(
            f"model type '{adapter.model_type}': no prunable structure found; operators without a rule: {ops}"
            + (f"; {notes[0]}" if notes else ""))
    return graph


def _reductions_by_atom(trace: TraceResult) -> tuple[dict[int, list[str]], dict[int, set[RmsScale]]]:
    """For every atom under a recorded reduction: why removing it is not exact, or the RMS scales
    that compaction rescales to make it exact."""
    table = trace.table
    coupled: dict[int, list[str]] = defaultdict(list)
    scales: dict[int, set[RmsScale]] = defaultdict(set)
    for red in trace.reductions:
        problem = red.problem()
        for atom in {table.find(a) for a in table.coordinates(red.space)[0]}:
            if problem is not None:
                if problem not in coupled[atom]:
                    coupled[atom].append(problem)
            elif red.scale is not None:
                scales[atom].add(RmsScale(*red.scale))
    return coupled, scales


_KIND_ORDER = {"kv_group": 0, "attention_head": 1, "mlp_channel": 2, "hidden_channel": 3}


def _tagged_spaces(table, tag: str) -> list[int]:
    out = []
    for sid in range(len(table._parent)):  # noqa: SLF001 - same package
        if table.find(sid) == sid and tag in table._info[sid].tags:  # noqa: SLF001
            out.append(sid)
    return out


def _order_key(occ: list[tuple[str, int, np.ndarray]], layer_of: dict[str, int]) -> tuple[int, str]:
    layers = sorted(layer_of.get(p, -1) for p, _, _ in occ)
    return (layers[0] if layers else -1, occ[0][0] if occ else "")


def _width(slices: list[ParamSlice], shapes: dict[str, tuple[int, ...]]) -> int:
    return max((len(s.indices) for s in slices), default=1)
