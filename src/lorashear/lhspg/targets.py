"""Translate a parameter-ratio target into numbers of groups to prune.

The target is a fraction of the *whole* model's parameters (embeddings counted,
LoRA not counted: LoRA is merged away before the model is saved). It is split
over the group kinds being pruned (a *cluster*: ``attention`` = query-head slots
and KV groups, ``mlp`` = MLP channels, ``hidden`` = residual channels):

- default [ours]: every kind loses the same fraction of its prunable parameters;
- per-cluster ratios (``attention_ratio`` / ``mlp_ratio``): that fraction of the
  cluster's prunable parameters; the other clusters make up the rest of ``ratio``
  when it is given;
- ``uniform_per_layer``: the same number of groups per layer (the saved model
  then has a plain Hugging Face config);
- ``knowledge_grading`` (with ``uniform_per_layer`` and per-layer weights from the knowledge
  analysis): each layer's share of a kind's removals follows its weight instead of being equal;
- ``round_to``: kept channel widths per layer (MLP channels, the residual width) are
  multiples of it; head counts are not rounded (a head is already a block of ``head_dim``
  rows, and rounding 9 query heads to a multiple of 32 would forbid pruning any).

Group counts are rounded so the removed parameters are as close as possible to
the target; :class:`TargetPlan` records what is expected, the run reports what
was achieved.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..graph.groups import GROUP_KINDS, Group
from ..models.adapters import BLOCK_OF_KIND

#: The cluster each group kind is counted in: its layer block, or ``hidden`` for residual channels.
CLUSTER_OF_KIND: dict[str, str] = {**BLOCK_OF_KIND, "hidden_channel": "hidden"}
#: The kinds whose kept widths ``round_to`` rounds: channels, whose counts are the quantised dimensions.
ROUNDED_KINDS: tuple[str, ...] = ("mlp_channel", "hidden_channel")


def kind_multiple(kind: str, round_to: int, hidden_multiple: int = 1) -> int:
    """The multiple that ``kind``'s kept per-layer widths keep: ``round_to`` for channels, 1 for heads; for
    the residual width also ``hidden_multiple``, what the family's config accepts as a hidden size (LLaMA's
    config wants a multiple of its attention heads)."""
    if kind == "hidden_channel":
        return math.lcm(round_to, hidden_multiple)
    return round_to if kind in ROUNDED_KINDS else 1


def min_kept(kind: str, round_to: int, hidden_multiple: int = 1) -> int:
    """Structures of ``kind`` every layer keeps at the least (never empty a layer)."""
    return max(1, kind_multiple(kind, round_to, hidden_multiple))


@dataclass
class TargetConfig:
    """How much to prune and how to spread it."""

    ratio: float | None = field(default=None, metadata={
        "help": "fraction of all model parameters to remove (embeddings counted), e.g. 0.2"})
    attention_ratio: float | None = field(default=None, metadata={
        "help": "fraction of the attention cluster's prunable parameters to remove (overrides the even split)"})
    mlp_ratio: float | None = field(default=None, metadata={
        "help": "fraction of the MLP cluster's prunable parameters to remove (overrides the even split)"})
    uniform_per_layer: bool = field(default=False, metadata={
        "help": "remove the same number of groups of each kind in every layer (plain HF config)"})
    knowledge_grading: float = field(default=0.0, metadata={
        "help": "with --knowledge and --uniform-per-layer: a layer's share of the removals scales with "
                "(mean deviation / its block's deviation) ** this, so blocks whose removal hurt more in the "
                "knowledge analysis lose fewer structures; 0 = the same share everywhere"})
    round_to: int = field(default=1, metadata={
        "help": "keep per-layer MLP widths (and the hidden width) a multiple of this, e.g. 32 so q8_0 "
                "quantises every tensor; head counts are not rounded"})
    round_min_width: int = field(default=0, metadata={
        "help": "apply --round-to only when every layer of each rounded kind being pruned is at least this "
                "wide (a toy model's 64 channels stay exact; 0 = always)"})
    kinds: tuple[str, ...] = field(default=("attention_head", "mlp_channel"), metadata={
        "help": "group kinds to prune: attention_head, kv_group, mlp_channel, hidden_channel"})

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        for name in ("ratio", "attention_ratio", "mlp_ratio"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= value < 1.0:
                raise ConfigError(f"{name} must be in [0, 1), got {value}")
        if self.ratio is None and self.attention_ratio is None and self.mlp_ratio is None:
            raise ConfigError("give a target: --ratio, or --attention-ratio / --mlp-ratio")
        if self.round_to < 1:
            raise ConfigError(f"round_to must be >= 1, got {self.round_to}")
        if self.round_min_width < 0:
            raise ConfigError(f"round_min_width must be >= 0, got {self.round_min_width}")
        if not 0.0 <= self.knowledge_grading <= 4.0:
            raise ConfigError(f"knowledge_grading must be in [0, 4], got {self.knowledge_grading}")
        bad = [k for k in self.kinds if k not in GROUP_KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"unknown group kind(s) {bad}; choose from {', '.join(GROUP_KINDS)}")

    def cluster_ratio(self, cluster: str) -> float | None:
        return {"attention": self.attention_ratio, "mlp": self.mlp_ratio}.get(cluster)


@dataclass
class TargetPlan:
    """Groups to remove per kind (and per layer in uniform mode), with the expected parameter drop."""

    counts: dict[str, int]
    group_params: dict[str, float]
    total_params: int
    embedding_params: int
    target_params: int
    expected_removed: int
    per_layer: dict[str, dict[int, int]] | None = None
    round_to: int = 1
    notes: list[str] = field(default_factory=list)
    #: the multiple the family's config needs of a hidden size (:func:`kind_multiple`)
    hidden_multiple: int = 1

    def multiple(self, kind: str) -> int:
        """The multiple ``kind``'s kept widths keep under this plan."""
        return kind_multiple(kind, self.round_to, self.hidden_multiple)

    @property
    def expected_ratio(self) -> float:
        return self.expected_removed / self.total_params

    @property
    def target_ratio(self) -> float:
        return self.target_params / self.total_params

    @property
    def expected_non_embedding_ratio(self) -> float:
        return self.expected_removed / max(1, self.total_params - self.embedding_params)

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": dict(self.counts),
            "group_params": dict(self.group_params),
            "per_layer": {k: {str(layer): n for layer, n in v.items()} for k, v in self.per_layer.items()}
            if self.per_layer else None,
            "round_to": self.round_to,
            "hidden_multiple": self.hidden_multiple,
            "total_params": self.total_params,
            "embedding_params": self.embedding_params,
            "target_params": self.target_params,
            "target_ratio": self.target_ratio,
            "expected_removed": self.expected_removed,
            "expected_ratio": self.expected_ratio,
            "expected_non_embedding_ratio": self.expected_non_embedding_ratio,
            "notes": list(self.notes),
        }


def _layer_widths(all_groups: Sequence[Group], kind: str) -> dict[int, int]:
    widths: dict[int, int] = defaultdict(int)
    for g in all_groups:
        if g.kind == kind and g.layer is not None:
            widths[g.layer] += 1
    return dict(widths)


def effective_round_to(config: TargetConfig, all_groups: Sequence[Group]) -> int:
    """``config.round_to``, or 1 when a rounded kind being pruned has a layer narrower than
    ``config.round_min_width``."""
    if config.round_to == 1 or config.round_min_width == 0:
        return config.round_to
    for kind in config.kinds:
        if kind in ROUNDED_KINDS:
            widths = _layer_widths(all_groups, kind)
            if widths and min(widths.values()) < config.round_min_width:
                return 1
    return config.round_to


def plan_targets(
    candidates: Sequence[Group],
    *,
    total_params: int,
    embedding_params: int,
    config: TargetConfig,
    all_groups: Sequence[Group] | None = None,
    layer_weights: Mapping[tuple[str, int], float] | None = None,
    hidden_multiple: int = 1,
) -> TargetPlan:
    """Number of groups of each kind to prune so the parameter drop is closest to the target.

    Args:
        candidates: prunable groups that may be selected (unprunable ones already removed).
        total_params: parameters of the model without LoRA (tied weights once).
        embedding_params: input embeddings (+ an untied output head), for the non-embedding ratio.
        config: the target.
        all_groups: every group of the graph, for per-layer widths (defaults to ``candidates``).
        layer_weights: ``{(kind, layer): weight}``; with ``uniform_per_layer`` each kind's total is
            then spread over its layers in proportion to the weights (:func:`graded_counts`) instead
            of equally. Layers without a weight get 1.
        hidden_multiple: the multiple a kept hidden size must be for the family's config
            (:func:`lorashear.models.widths.hidden_size_multiple`); the residual width keeps a multiple of it
            and of ``round_to``.
    """
    all_groups = list(all_groups if all_groups is not None else candidates)
    notes: list[str] = []
    round_to = effective_round_to(config, all_groups)
    if round_to != config.round_to:
        notes.append(f"round_to {config.round_to} not applied: a layer is narrower than "
                     f"round_min_width {config.round_min_width}")
        config = dataclasses.replace(config, round_to=round_to)
    by_kind: dict[str, list[Group]] = defaultdict(list)
    for g in candidates:
        if g.kind in config.kinds and g.prunable:
            by_kind[g.kind].append(g)
    kinds = [k for k in config.kinds if by_kind.get(k)]
    if not kinds:
        raise ConfigError(f"no prunable groups of kind(s) {', '.join(config.kinds)}")
    size = {k: sum(g.base_params for g in by_kind[k]) / len(by_kind[k]) for k in kinds}
    pool = {k: sum(g.base_params for g in by_kind[k]) for k in kinds}

    # Desired parameters removed per kind.
    desired: dict[str, float] = {}
    fixed = [k for k in kinds if config.cluster_ratio(CLUSTER_OF_KIND[k]) is not None]
    free = [k for k in kinds if k not in fixed]
    for k in fixed:
        desired[k] = config.cluster_ratio(CLUSTER_OF_KIND[k]) * pool[k]  # type: ignore[operator]
    if config.ratio is not None:
        target = config.ratio * total_params
        rest = target - sum(desired.values())
        free_pool = sum(pool[k] for k in free)
        if rest < 0:
            notes.append("the per-cluster ratios alone exceed --ratio; --ratio is not reached exactly")
            rest = 0.0
        if free and rest > free_pool:
            raise ConfigError(
                f"ratio {config.ratio:.3f} is unreachable: the prunable groups hold at most "
                f"{(free_pool + sum(desired.values())) / total_params:.3f} of the model")
        if not free and rest > 0:
            notes.append("every pruned cluster has a fixed ratio; --ratio is reported, not enforced")
        for k in free:
            desired[k] = rest * pool[k] / free_pool if free_pool else 0.0
    else:
        for k in free:
            desired[k] = 0.0
        target = sum(desired.values())

    # never empty a layer: at most width - min_kept structures of a kind per layer
    limit: dict[str, int] = {}
    for k in kinds:
        widths = _layer_widths(all_groups, k)
        per: dict[object, int] = defaultdict(int)
        for g in by_kind[k]:
            per[g.layer] += 1
        keep = min_kept(k, config.round_to, hidden_multiple)
        limit[k] = sum(n if layer is None else min(n, max(0, widths.get(layer, n) - keep))
                       for layer, n in per.items())
    counts = {k: min(limit[k], max(0, round(desired[k] / size[k]))) for k in kinds}
    per_layer: dict[str, dict[int, int]] | None = None
    if config.uniform_per_layer:
        per_layer = {}
        step_size: dict[str, float] = {}
        have: dict[str, dict[int, int]] = {}  # candidates per layer of each kind
        for k in kinds:
            layers: dict[int, int] = defaultdict(int)
            have[k] = layers
            for g in by_kind[k]:
                if g.layer is None:
                    raise ConfigError(f"uniform_per_layer cannot spread {k} groups: they span layers")
                layers[g.layer] += 1
            widths = _layer_widths(all_groups, k)
            if len(set(widths.values())) > 1:
                notes.append(f"{k}: layers differ in width; uniform mode removes the same count from each")
            n_layers = len(layers)
            width = min(widths[layer] for layer in layers)
            m = kind_multiple(k, config.round_to, hidden_multiple)
            cap = min(min(layers.values()), max(0, width - min_kept(k, config.round_to, hidden_multiple)))
            feasible = [q for q in range(0, cap + 1) if (width - q) % m == 0 or q == 0]
            want = counts[k] / n_layers
            q = min(feasible, key=lambda q: abs(q - want))
            per_layer[k] = {layer: q for layer in sorted(layers)}
            counts[k] = q * n_layers
            step_size[k] = size[k] * n_layers * m
            if len(layers) < len(widths):
                notes.append(f"{k}: {len(widths) - len(layers)} layer(s) are unprunable; the saved config "
                             "has per-layer sizes")
        # Tune the finest-grained kind to land closest to the target.
        fine = min(kinds, key=lambda k: step_size[k])
        per_layer, counts = _tune_uniform(per_layer, counts, fine, size, target, by_kind, all_groups,
                                          kind_multiple(fine, config.round_to, hidden_multiple))
        if layer_weights:
            for k in kinds:
                widths = _layer_widths(all_groups, k)
                caps = {layer: min(n, max(0, widths[layer] - min_kept(k, config.round_to, hidden_multiple)))
                        for layer, n in have[k].items()}
                per_layer[k] = graded_counts(counts[k], caps, {layer: layer_weights.get((k, layer), 1.0)
                                                               for layer in caps},
                                             widths, kind_multiple(k, config.round_to, hidden_multiple))
                counts[k] = sum(per_layer[k].values())
            notes.append("per-layer counts graded by the knowledge analysis")
    else:
        fine = min(kinds, key=lambda k: size[k])
        removed = sum(counts[k] * size[k] for k in kinds)
        if config.ratio is not None and fine in free:
            extra = round((target - removed) / size[fine])
            counts[fine] = min(limit[fine], max(0, counts[fine] + extra))
    expected = int(round(sum(counts[k] * size[k] for k in kinds)))
    if config.ratio is not None and abs(expected - target) > 0.005 * total_params:
        notes.append(f"closest reachable: {expected / total_params:.4f} for a target of {config.ratio:.4f}")
    for k in config.kinds:
        if k not in kinds:
            notes.append(f"no prunable {k} groups")
    if "hidden_channel" in kinds and hidden_multiple > 1:
        notes.append(f"hidden_channel: the kept hidden size stays a multiple of "
                     f"{kind_multiple('hidden_channel', config.round_to, hidden_multiple)} (round_to "
                     f"{config.round_to}; the config wants a multiple of {hidden_multiple})")
    return TargetPlan(counts=counts, group_params=size, total_params=total_params,
                      embedding_params=embedding_params, target_params=int(round(target)),
                      expected_removed=expected, per_layer=per_layer, round_to=config.round_to, notes=notes,
                      hidden_multiple=hidden_multiple)


def _tune_uniform(per_layer, counts, fine, size, target, by_kind, all_groups, m):
    layers = per_layer[fine]
    n_layers = len(layers)
    q = next(iter(layers.values()))
    widths = _layer_widths(all_groups, fine)
    width = min(widths[layer] for layer in layers)
    cap = min(min(sum(1 for g in by_kind[fine] if g.layer == layer) for layer in layers), max(0, width - max(1, m)))
    others = sum(counts[k] * size[k] for k in counts if k != fine)
    feasible = [c for c in range(0, cap + 1) if (width - c) % m == 0 or c == 0]
    best = min(feasible, key=lambda c: (abs(others + c * n_layers * size[fine] - target), abs(c - q)))
    per_layer[fine] = {layer: best for layer in layers}
    counts[fine] = best * n_layers
    return per_layer, counts


def graded_counts(total: int, caps: Mapping[int, int], weights: Mapping[int, float], widths: Mapping[int, int],
                  m: int = 1) -> dict[int, int]:
    """Spread ``total`` removals over layers in proportion to ``weights``.

    Each layer takes at most ``caps[layer]``; what a capped layer cannot take goes to the others
    in proportion to their weights (water-filling). With ``m > 1`` a layer's kept width
    ``widths[layer] - count`` stays a multiple of ``m`` (or the count is 0), and the sum is the
    reachable total closest to ``total``. Equal weights give equal counts (up to rounding).
    """
    layers = sorted(caps)
    share: dict[int, float] = {}
    free = [layer for layer in layers if caps[layer] > 0 and weights[layer] > 0]
    rest = float(min(total, sum(caps.values())))
    while free:
        wsum = sum(weights[layer] for layer in free)
        want = {layer: rest * weights[layer] / wsum for layer in free}
        over = [layer for layer in free if want[layer] >= caps[layer]]
        if not over:
            share.update(want)
            break
        for layer in over:
            share[layer] = float(caps[layer])
            rest -= caps[layer]
            free.remove(layer)

    def feasible(layer: int) -> list[int]:
        return [q for q in range(caps[layer] + 1) if q == 0 or (widths[layer] - q) % m == 0]

    options = {layer: feasible(layer) for layer in layers}
    counts = {layer: max(q for q in options[layer] if q <= share.get(layer, 0.0) + 1e-9) for layer in layers}
    while True:  # add the next feasible step where the rounding fell furthest short
        left = total - sum(counts.values())
        steps = {layer: min((q for q in options[layer] if q > counts[layer]), default=None) for layer in layers}
        steps = {layer: q for layer, q in steps.items() if q is not None}
        if not steps:
            break
        layer = max(steps, key=lambda layer: (share.get(layer, 0.0) - counts[layer], -layer))
        step = steps[layer] - counts[layer]
        if abs(left - step) >= abs(left):
            break
        counts[layer] = steps[layer]
    return counts


def layer_rounding(kept_widths: dict[int, int], removable: dict[int, int], want_removed: int,
                   m: int, cost: dict[int, list[float]]) -> dict[int, int]:
    """Choose how many more groups to remove per layer so every kept width is a multiple of ``m``
    and the total removed is closest to ``want_removed``.

    Args:
        kept_widths: current kept width per layer (before this removal).
        removable: candidates left per layer.
        want_removed: how many groups to remove in total now.
        m: the multiple.
        cost: per layer, the saliencies of its candidates in increasing order.

    Returns ``{layer: count}``. Greedy: first remove ``kept % m`` from every layer (forced),
    then add blocks of ``m`` from the layer whose next block is cheapest until the total is closest.
    """
    take = {}
    for layer, kept in kept_widths.items():
        forced = kept % m
        take[layer] = min(forced, removable.get(layer, 0)) if forced <= removable.get(layer, 0) else 0
    total = sum(take.values())
    while True:
        best_layer, best_cost = None, math.inf
        for layer in kept_widths:
            n = take[layer]
            if n + m > removable.get(layer, 0) or kept_widths[layer] - n - m < m:
                continue
            c = sum(cost[layer][n:n + m])
            if c < best_cost:
                best_layer, best_cost = layer, c
        if best_layer is None or abs(total + m - want_removed) >= abs(total - want_removed):
            break
        take[best_layer] += m
        total += m
    return take
