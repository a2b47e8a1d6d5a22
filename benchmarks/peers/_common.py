"""Shared machinery of the peer baselines: lorashear's own structures, GQA head alignment, selection to a
parameter target, and the report pieces every peer fills in.

Every peer prunes the structures :func:`lorashear.discover` finds and cuts them with
:func:`lorashear.compact` (exact, zero-invariance tested), so the peers and lorashear remove the
same kinds of things and the same parameter counts mean the same:

- ``attention_head``: a *query-head slot* under GQA: one query head from every KV group (q_proj rows
  and o_proj columns of those heads; k/v stay). Slot ``s`` holds head ``s`` of every KV group;
- ``kv_group``: a whole KV group (k/v rows and the query heads it serves);
- ``mlp_channel``: one intermediate channel (gate/up rows, down_proj column).

**Head alignment** (``align_heads``): the query heads of one KV group share its keys and values,
so permuting them inside the group (q_proj row blocks and the matching o_proj column blocks)
leaves the model's function unchanged. Sorting every KV group's heads by a peer's head score
puts the ``r``-th best head of every group into slot ``r``; removing the last slots then removes
each group's own weakest heads, the same number from every group. That is the GQA rule of
Torch-Pruning's ``BasePruner`` and of Minitron (Model Optimizer ranks and trims heads within each
query group), expressed as lorashear slots.

**Selection** to a parameter target (a fraction of the whole model, embeddings counted):

- :func:`select_greedy`: candidates in increasing order of a key; each is taken when the layer's
  minimum widths allow it and taking it brings the removed parameters closer to the target
  (a candidate that would overshoot by more than the remaining deficit is skipped, smaller ones
  later in the order may fill the gap; when a head slot overshoots, the least important MLP channels
  taken are given back until the total is closest). Parameter counts are marginal: removing a KV
  group after a slot of the same layer frees fewer parameters (the union is counted once);
- :func:`uniform_counts`: the same number of slots and MLP channels in every pruned layer
  (LLM-Pruner's block-wise recipe, Minitron's uniform target architecture).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorashear.errors import ConfigError

KINDS = ("attention_head", "kv_group", "mlp_channel")


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters (tied weights once), the way lorashear counts them."""
    from lorashear.models.params import count_params as _count

    return _count(model)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    from lorashear.models.adapters import adapter_for

    return adapter_for(model.config).decoder_layers(model)[1]


def head_dim_of(model: torch.nn.Module) -> int:
    from lorashear.models.adapters import adapter_for

    return adapter_for(model.config).head_dim


# -- structures ------------------------------------------------------------------------------------
@dataclass
class LayerStructure:
    """One decoder layer's prunable groups (lorashear's) and what they hold."""

    layer: int
    slots: list[Any] = field(default_factory=list)  #: attention_head groups, by index
    kv: list[Any] = field(default_factory=list)  #: kv_group groups, by index
    mlp: list[Any] = field(default_factory=list)  #: mlp_channel groups, by index (= channel)
    slot_heads: list[list[int]] = field(default_factory=list)  #: query heads of slot s, in KV-group order
    kv_heads: list[list[int]] = field(default_factory=list)  #: query heads served by KV group g
    head_params: int = 0  #: parameters of one query head (q rows + o columns, biases included)
    kv_params: int = 0  #: parameters of one KV group's own k/v rows

    @property
    def num_heads(self) -> int:
        return sum(len(h) for h in self.kv_heads)


@dataclass
class Structures:
    """:func:`lorashear.discover`'s groups of a model, organised per layer."""

    graph: Any
    layers: dict[int, LayerStructure]
    head_dim: int

    def groups(self, kinds: Iterable[str]) -> list[Any]:
        wanted = set(kinds)
        return [g for g in self.graph.groups if g.kind in wanted and g.prunable and g.layer is not None]


def _heads_of(group: Any, head_dim: int) -> list[int]:
    for s in group.slices:
        if s.name.endswith("q_proj.weight") and s.dim == 0:
            heads = sorted({i // head_dim for i in s.indices})
            if len(s.indices) != len(heads) * head_dim:
                raise ConfigError(f"group {group.id}: q_proj rows are not whole heads")
            return heads
    raise ConfigError(f"group {group.id} ({group.kind}) names no q_proj rows; the peers support the Llama layout")


def structures(model: torch.nn.Module) -> Structures:
    """Discover ``model``'s groups (no LoRA attached) and organise them per layer."""
    import lorashear

    graph = lorashear.discover(model)
    hd = head_dim_of(model)
    layers: dict[int, LayerStructure] = {}
    for g in graph.groups:
        if g.layer is None or g.kind not in KINDS:
            continue
        ls = layers.setdefault(g.layer, LayerStructure(g.layer))
        {"attention_head": ls.slots, "kv_group": ls.kv, "mlp_channel": ls.mlp}[g.kind].append(g)
    for ls in layers.values():
        for lst in (ls.slots, ls.kv, ls.mlp):
            lst.sort(key=lambda g: g.index)
        ls.kv_heads = [_heads_of(g, hd) for g in ls.kv]
        group_of = {h: k for k, heads in enumerate(ls.kv_heads) for h in heads}
        ls.slot_heads = []
        for g in ls.slots:
            heads = sorted(_heads_of(g, hd), key=lambda h: group_of.get(h, 0))
            ls.slot_heads.append(heads)
        if ls.slots:
            n_kv = max(1, len(ls.kv))
            ls.head_params = ls.slots[0].base_params // n_kv
            if ls.kv:
                ls.kv_params = ls.kv[0].base_params - len(ls.slots) * ls.head_params
        if ls.kv and not ls.slots:  # plain multi-head attention: no slots, a head is its own group
            ls.head_params = 0
            ls.kv_params = ls.kv[0].base_params
    return Structures(graph, layers, hd)


# -- GQA head alignment ----------------------------------------------------------------------------
@torch.no_grad()
def permute_query_heads(model: torch.nn.Module, layer: int, perm: Sequence[int], head_dim: int) -> None:
    """Reorder the query heads of ``layer``: new head ``i`` is old head ``perm[i]`` (q_proj rows,
    q_proj bias, o_proj columns). Function-preserving when ``perm`` only moves heads within their KV group."""
    attn = decoder_layers(model)[layer].self_attn
    idx = torch.tensor([h * head_dim + d for h in perm for d in range(head_dim)], dtype=torch.long)
    attn.q_proj.weight.data = attn.q_proj.weight.data.index_select(0, idx).contiguous()
    if attn.q_proj.bias is not None:
        attn.q_proj.bias.data = attn.q_proj.bias.data.index_select(0, idx).contiguous()
    attn.o_proj.weight.data = attn.o_proj.weight.data.index_select(1, idx).contiguous()


def align_heads(model: torch.nn.Module, st: Structures, head_scores: dict[int, torch.Tensor],
                *, descending: bool = True) -> dict[int, list[int]]:
    """Sort every KV group's query heads by ``head_scores[layer]`` (``(num_heads,)``, higher = more
    important when ``descending``) so that slot ``r`` holds the ``r``-th best head of every group.

    Changes ``model`` in place (function-preserving) and returns ``{layer: perm}`` with
    ``perm[new_head] = old_head``; per-head statistics must be permuted the same way.
    """
    perms: dict[int, list[int]] = {}
    for layer, ls in st.layers.items():
        if not ls.slots or layer not in head_scores:
            continue
        scores = head_scores[layer]
        perm = list(range(ls.num_heads))
        for heads in ls.kv_heads:
            positions = [next(ls.slot_heads[s][k] for k in range(len(ls.slot_heads[s]))
                              if ls.slot_heads[s][k] in heads) for s in range(len(ls.slots))]
            ranked = sorted(heads, key=lambda h: float(scores[h]), reverse=descending)
            for r, pos in enumerate(positions):
                perm[pos] = ranked[r]
        if perm != list(range(ls.num_heads)):
            permute_query_heads(model, layer, perm, st.head_dim)
        perms[layer] = perm
    return perms


def permute_heads_vector(values: torch.Tensor, perm: Sequence[int], head_dim: int) -> torch.Tensor:
    """Per-channel statistics of the o_proj input (``(num_heads * head_dim,)``) in the permuted order."""
    idx = torch.tensor([h * head_dim + d for h in perm for d in range(head_dim)], dtype=torch.long)
    return values.index_select(0, idx)


# -- selection -------------------------------------------------------------------------------------
@dataclass
class MinWidths:
    """What every layer keeps at the least."""

    slots: int = 1  #: query-head slots (query heads per KV group)
    kv: int = 1  #: KV groups
    mlp: int = 1  #: MLP channels


@dataclass
class Extra:
    """Parameters a structure carries beyond its weights (FLAP's added biases): per query head, per KV
    group's own k/v rows, per MLP channel."""

    head: int = 0
    kv: int = 0
    channel: int = 0


class LayerState:
    """Kept widths per layer while selecting, with marginal parameter counts (``extra`` included)."""

    def __init__(self, st: Structures, mins: MinWidths, extra: Extra | None = None) -> None:
        self.st = st
        self.mins = mins
        self.extra = extra or Extra()
        self.slots = {k: len(v.slots) for k, v in st.layers.items()}
        self.kv = {k: len(v.kv) for k, v in st.layers.items()}
        self.mlp = {k: len(v.mlp) for k, v in st.layers.items()}

    def marginal(self, g: Any) -> int:
        ls = self.st.layers[g.layer]
        e = self.extra
        if g.kind == "attention_head":
            if not ls.kv:
                return g.base_params + e.head
            return self.kv[g.layer] * (ls.head_params + e.head)
        if g.kind == "kv_group":
            if not ls.slots:
                return g.base_params + e.head + e.kv
            return self.slots[g.layer] * (ls.head_params + e.head) + ls.kv_params + e.kv
        return g.base_params + e.channel

    def allowed(self, g: Any) -> bool:
        if g.kind == "attention_head":
            return self.slots[g.layer] - 1 >= self.mins.slots
        if g.kind == "kv_group":
            return self.kv[g.layer] - 1 >= self.mins.kv
        return self.mlp[g.layer] - 1 >= self.mins.mlp

    def take(self, g: Any) -> int:
        p = self.marginal(g)
        if g.kind == "attention_head":
            self.slots[g.layer] -= 1
        elif g.kind == "kv_group":
            self.kv[g.layer] -= 1
        else:
            self.mlp[g.layer] -= 1
        return p


def select_greedy(candidates: Sequence[tuple[Any, float]], target: float, state: LayerState, *,
                  strict: bool = True) -> tuple[list[Any], int]:
    """Take ``(group, key)`` candidates in increasing ``key`` until the removed parameters are closest
    to ``target`` (see the module docstring). Returns the groups taken and their marginal parameters.

    ``strict``: a target the candidates cannot come within one structure of (the minimum widths or
    the layer range leave too little) is a :class:`ConfigError`."""
    taken: list[Any] = []
    removed = 0
    ordered = sorted(candidates, key=lambda c: (c[1], c[0].layer, c[0].index))
    largest = max((state.marginal(g) for g, _ in ordered), default=0)
    for g, _key in ordered:
        if removed >= target:
            break
        if not state.allowed(g):
            continue
        p = state.marginal(g)
        if removed + p - target >= target - removed:  # overshoots by more than the deficit left
            continue
        taken.append(g)
        removed += state.take(g)
    if removed > target:  # a large structure overshot: give back the least important MLP channels taken
        keys = dict((id(g), k) for g, k in candidates)
        for g in sorted([g for g in taken if g.kind == "mlp_channel"], key=lambda g: -keys[id(g)]):
            p = g.base_params + state.extra.channel
            if abs(removed - p - target) >= abs(removed - target):
                break
            taken.remove(g)
            state.mlp[g.layer] += 1
            removed -= p
    if strict and target - removed > largest:
        raise ConfigError(f"the target ({target:,.0f} parameters) is out of reach: the candidates may lose "
                          f"{removed:,} under the minimum widths; lower the ratio, the minimum widths, or widen "
                          "the layer range")
    return taken, removed


def uniform_counts(st: Structures, layers: Sequence[int], target: float, mins: MinWidths,
                   attention_share: float | None = None, extra: Extra | None = None) -> tuple[int, int]:
    """``(slots, mlp_channels)`` to remove from every layer of ``layers`` so the drop is closest to
    ``target``: slots first (the nearest whole number to the layer fraction, or to ``attention_share``
    of the target), MLP channels make up the rest."""
    e = extra or Extra()
    ls0 = st.layers[layers[0]]
    n = len(layers)
    slot_p = len(ls0.kv) * (ls0.head_params + e.head) if ls0.kv else ls0.slots[0].base_params + e.head
    chan_p = ls0.mlp[0].base_params + e.channel
    n_slots, n_mlp = len(ls0.slots), len(ls0.mlp)
    max_h = max(0, n_slots - mins.slots)
    max_c = max(0, n_mlp - mins.mlp)
    if attention_share is None:
        frac = target / (n * (n_slots * slot_p + n_mlp * chan_p))
        h = min(max_h, max(0, round(frac * n_slots)))
    else:
        h = min(max_h, max(0, round(attention_share * target / (n * slot_p))))
    c = min(max_c, max(0, round((target - n * h * slot_p) / (n * chan_p))))
    if target - n * (h * slot_p + c * chan_p) > n * chan_p:
        raise ConfigError(f"the target ({target:,.0f} parameters) is out of reach with the same widths in layers "
                          f"{layers[0]}..{layers[-1]} under the minimum widths; lower the ratio or widen the range")
    return h, c


def layer_range(num_layers: int, start: int, end: int) -> list[int]:
    """Layers ``[start, end)``; a negative ``end`` counts from the end, 0 means all."""
    stop = num_layers if end == 0 else (end if end > 0 else num_layers + end)
    layers = list(range(max(0, start), min(num_layers, stop)))
    if not layers:
        raise ConfigError(f"no layers to prune in [{start}, {stop}) of {num_layers}")
    return layers


def split_target(st: Structures, layers: Sequence[int], target: float, attention_share: float | None,
                 mins: MinWidths) -> dict[str, float]:
    """Parameters to remove from query-head slots and from MLP channels: ``attention_share`` of the
    target from attention, or (``None``) the same fraction of each kind's removable parameters."""
    pool = {"attention_head": 0.0, "mlp_channel": 0.0}
    for layer in layers:
        ls = st.layers[layer]
        if ls.slots:
            slot_p = len(ls.kv) * ls.head_params if ls.kv else ls.slots[0].base_params
            pool["attention_head"] += max(0, len(ls.slots) - mins.slots) * slot_p
        if ls.mlp:
            pool["mlp_channel"] += max(0, len(ls.mlp) - mins.mlp) * ls.mlp[0].base_params
    total = sum(pool.values())
    if target > total:
        raise ConfigError(f"the target ({target:,.0f} parameters) exceeds what the layers in range may lose "
                          f"({total:,.0f}) under the minimum widths; lower the ratio or widen the range")
    if attention_share is None:
        return {k: target * v / total for k, v in pool.items()}
    att = min(pool["attention_head"], attention_share * target)
    return {"attention_head": att, "mlp_channel": target - att}


# -- normalisers (Torch-Pruning's, applied within one layer and kind) -------------------------------
def normalise(values: torch.Tensor, how: str) -> torch.Tensor:
    v = values.double()
    if how == "none":
        return v
    if how == "mean":
        return v / v.mean().clamp_min(1e-30)
    if how == "max":
        return v / v.max().clamp_min(1e-30)
    if how == "sum":
        return v / v.sum().clamp_min(1e-30)
    if how == "minmax":
        return (v - v.min()) / (v.max() - v.min()).clamp_min(1e-30)
    if how == "gaussian":
        return (v - v.mean()) / (v.std() if v.numel() > 1 else torch.tensor(1.0)).clamp_min(1e-30)
    raise ConfigError(f"unknown normaliser {how!r}")


NORMALISERS = ("none", "mean", "max", "sum", "minmax", "gaussian")


# -- after selection -------------------------------------------------------------------------------
def layer_widths(model: torch.nn.Module) -> dict[int, dict[str, int]]:
    """Every layer's query heads, KV heads and MLP channels, read from the weights."""
    hd = head_dim_of(model)
    out = {}
    for i, layer in enumerate(decoder_layers(model)):
        a, m = layer.self_attn, layer.mlp
        out[i] = {"q_heads": a.q_proj.out_features // hd, "kv_heads": a.k_proj.out_features // hd,
                  "mlp": m.gate_proj.out_features}
    return out


def apply_selection(model: torch.nn.Module, groups: Sequence[Any]) -> torch.nn.Module:
    import lorashear

    return lorashear.compact(model, list(groups))


def calibration_ids(tokenizer: Any, data: str, seq_len: int, sequences: int, seed: int) -> torch.Tensor:
    """The first ``sequences`` packed sequences of ``data`` (the packing lorashear prune uses)."""
    from lorashear.data import load_texts, pack_texts

    return pack_texts(load_texts(data), tokenizer, seq_len, num_sequences=sequences, seed=seed)


def compute_record(calib_ids: torch.Tensor, *, forward_seqs: int, backward_seqs: int, params: int,
                   note: str = "") -> dict[str, Any]:
    """Calibration cost: sequences, tokens, forward/backward token-passes and a FLOP estimate
    (2 x params per token forward, 4 x params per token backward)."""
    seq_len = int(calib_ids.shape[1])
    fwd = forward_seqs * seq_len
    bwd = backward_seqs * seq_len
    return {"sequences": int(calib_ids.shape[0]), "seq_len": seq_len, "tokens": int(calib_ids.numel()),
            "forward_token_passes": fwd, "backward_token_passes": bwd,
            "flops_estimate": float(2 * params * fwd + 4 * params * bwd), "note": note}


def params_record(before: int, after: int, ratio: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {"before": before, "after": after, "removed": before - after, "ratio_removed": (before - after) / before,
           "target_ratio": ratio}
    out.update(extra or {})
    return out


class Timer:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}
        self._last = self.t0

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = now - self._last
        self._last = now

    @property
    def total(self) -> float:
        return time.perf_counter() - self.t0


def check_common(cfg: Any) -> None:
    """Validation shared by the peers' configs."""
    if not 0.0 < cfg.ratio < 1.0:
        raise ConfigError(f"ratio must be in (0, 1), got {cfg.ratio}")
    for name in ("calib_sequences", "batch_size", "seq_len", "min_slots", "min_kv", "min_mlp"):
        if hasattr(cfg, name) and getattr(cfg, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(cfg, name)}")
    share = getattr(cfg, "attention_share", None)
    if share is not None and not 0.0 <= share <= 1.0:
        raise ConfigError(f"attention_share must be in [0, 1], got {share}")
    kinds = tuple(getattr(cfg, "kinds", ()))
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ConfigError(f"unknown kind(s) {bad}; choose from {', '.join(KINDS)}")
    if hasattr(cfg, "kinds") and not kinds:
        raise ConfigError("kinds must name at least one kind")


def by_layer(groups: Iterable[Any]) -> dict[int, dict[str, int]]:
    out: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for g in groups:
        out[g.layer][g.kind] += 1
    return {k: dict(v) for k, v in sorted(out.items())}


def run_cli(description: str, cfg_cls: type, run: Callable[[str, str, Any], dict[str, Any]],
            argv: list[str] | None, label: str) -> int:
    import argparse
    import logging

    from lorashear.config import add_dataclass_arguments, dataclass_from_args

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("model", help="model name or directory (e.g. smollm2-135m-instruct)")
    parser.add_argument("--out", required=True, help="output directory (Hugging Face format + report JSON)")
    add_dataclass_arguments(parser, cfg_cls)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    cfg = dataclass_from_args(cfg_cls, args)
    report = run(args.model, args.out, cfg)
    p = report["params"]
    print(f"{label}: {p['before']:,} -> {p['after']:,} parameters ({100 * p['ratio_removed']:.2f}% removed), "
          f"{report['wall_time_s']:.1f} s -> {args.out}")
    return 0


def save_run(model: torch.nn.Module, tokenizer: Any, out: str, report: dict[str, Any], report_file: str) -> None:
    import json
    from pathlib import Path

    import lorashear

    lorashear.save_pretrained(model, out, tokenizer)
    (Path(out) / report_file).write_text(json.dumps(report, indent=2, default=str))
