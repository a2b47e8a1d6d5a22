"""Configuration of the knowledge distribution analysis (paper Alg. 3, METHOD.md §2)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError

AttentionStructure = Literal["attention_head", "kv_group"]
ProxyName = Literal["magnitude", "avg_magnitude", "fisher", "random"]
MetricName = Literal["relative_ppl", "loss_increase"]


@dataclass
class KnowledgeConfig:
    """What the analysis prunes, how it scores the damage and which node groups it protects.

    A *node group* is one block of one decoder layer: the attention block (its head
    structures) or the MLP block (its channels). For every node group and every
    ratio ``p`` the analysis zeroes ``num_to_prune(p, n)`` of its ``n`` structures
    (the lowest by ``proxy``), measures the deviation from the full model on the
    evaluation tokens, and restores the weights bit-exactly.
    """

    ratios: tuple[float, ...] = field(default=(0.2, 0.5), metadata={
        "help": "fractions of each node group's structures to prune in turn, each in (0, 1)"})
    gamma: float = field(default=0.2, metadata={
        "help": "fraction of node groups (the most sensitive) marked unprunable, in [0, 1)"})
    data: str = field(default="builtin:calibration", metadata={
        "help": "text source for the evaluation set (any spec the data layer reads); "
                "use training-side text, never the data you report results on"})
    num_sequences: int = field(default=16, metadata={"help": "packed sequences in the evaluation set"})
    seq_len: int = field(default=128, metadata={"help": "tokens per packed sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "seed for packing the evaluation set (and the random proxy)"})
    attention_structure: AttentionStructure = field(default="attention_head", metadata={
        "help": "attention structure pruned in the analysis: query-head slots (attention_head) or whole "
                "KV groups (kv_group); the other kind is used for a layer that lacks this one"})
    proxy: ProxyName = field(default="magnitude", metadata={
        "help": "which structures of a node group are pruned first: lowest L2 norm of their base weights "
                "(magnitude), the same divided by the number of weights (avg_magnitude), the activation Fisher on "
                "the evaluation set (fisher: one backward pass per batch, LHSPG's data-driven saliency), or random"})
    metric: MetricName = field(default="relative_ppl", metadata={
        "help": "deviation from the full model: |ppl_p - ppl_full| / ppl_full (relative_ppl) or "
                "|loss_p - loss_full| in nats per token (loss_increase)"})

    def __post_init__(self) -> None:
        if isinstance(self.ratios, (int, float)):
            self.ratios = (self.ratios,)
        try:
            ratios = tuple(float(r) for r in self.ratios)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"ratios must be numbers in (0, 1), got {self.ratios!r}") from exc
        if not ratios:
            raise ConfigError("ratios must name at least one pruning ratio in (0, 1)")
        for r in ratios:
            if not (math.isfinite(r) and 0.0 < r < 1.0):
                raise ConfigError(f"every pruning ratio must lie in (0, 1), got {r:g}")
        if len(set(ratios)) != len(ratios):
            raise ConfigError(f"pruning ratios must be distinct, got {', '.join(f'{r:g}' for r in ratios)}")
        self.ratios = tuple(sorted(ratios))
        try:
            self.gamma = float(self.gamma)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"gamma must be a number in [0, 1), got {self.gamma!r}") from exc
        if not (math.isfinite(self.gamma) and 0.0 <= self.gamma < 1.0):
            raise ConfigError(f"gamma must lie in [0, 1), got {self.gamma:g}")
        if not isinstance(self.data, str) or not self.data.strip():
            raise ConfigError("data must name a text source, e.g. builtin:calibration")
        for name, low in (("num_sequences", 1), ("seq_len", 2), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.attention_structure not in ("attention_head", "kv_group"):
            raise ConfigError(f"attention_structure must be attention_head or kv_group, got {self.attention_structure!r}")
        from .proxies import check_proxy_name

        check_proxy_name(self.proxy)
        if self.metric not in ("relative_ppl", "loss_increase"):
            raise ConfigError(f"metric must be relative_ppl or loss_increase, got {self.metric!r}")


def num_to_prune(ratio: float, num_structures: int) -> int:
    """Structures pruned for ratio ``p`` out of ``n``: ``p * n`` rounded half up,
    at least 1, and at most ``n - 1`` (a node group is never emptied unless ``n == 1``).

    With 3 query-head slots: p=0.2 -> 1, p=0.5 -> 2. With 1536 MLP channels:
    p=0.2 -> 307, p=0.5 -> 768.
    """
    if num_structures < 1:
        raise ConfigError("a node group needs at least one structure")
    k = math.floor(ratio * num_structures + 0.5)
    upper = num_structures - 1 if num_structures > 1 else 1
    return min(max(1, k), upper)


def num_unprunable(gamma: float, num_node_groups: int) -> int:
    """Node groups marked unprunable: ``gamma * |N|`` rounded half up (60 node groups, 0.2 -> 12)."""
    return min(num_node_groups, math.floor(gamma * num_node_groups + 0.5))
