"""The groups stage: trace a model and list its minimally removable structures.

Recipe::

    model = load_model(config.model); model = attach_lora(model, rank) if config.lora_rank
    graph = discover(model, hidden=config.hidden)

Nothing is written; :class:`GroupsResult` carries the graph and its summary
(``to_dict()`` is the JSON ``lorashear groups --json`` prints).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..graph.groups import StructureGraph
from ..models.reference import REFERENCE_MODEL_NAME


@dataclass
class GroupsConfig:
    """What ``lorashear groups`` traces."""

    model: str = field(default=REFERENCE_MODEL_NAME, metadata={
        "help": "hub id, local directory or built-in name", "cli": False})
    lora_rank: int = field(default=0, metadata={"help": "attach LoRA of this rank first (0: none)"})
    hidden: bool = field(default=False, metadata={"help": "also list hidden (residual) channels"})

    def __post_init__(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError("--lora-rank must be >= 0")


@dataclass
class GroupsResult:
    """The structure graph of a model and its summary."""

    model: str
    model_type: str
    num_layers: int
    total_params: int
    lora: bool
    seconds: float  #: time spent discovering the graph
    summary: list[dict[str, Any]]  #: per kind: count, prunable, params
    per_layer: dict[int, dict[str, int]]  #: layer -> kind -> count
    notes: list[str]
    graph: StructureGraph = field(repr=False, compare=False)

    def to_dict(self, *, groups: bool = True) -> dict[str, Any]:
        """Model facts and (with ``groups``) every group with its slices."""
        out: dict[str, Any] = {"model": self.model, "model_type": self.model_type, "num_layers": self.num_layers,
                               "total_params": self.total_params, "lora": self.lora}
        if groups:
            out["groups"] = [{"id": g.id, "kind": g.kind, "layer": g.layer, "index": g.index,
                              "num_params": g.num_params, "prunable": g.prunable, "width": g.width,
                              "slices": [[s.name, s.dim, list(s.indices)] for s in g.slices]}
                             for g in self.graph.groups]
        else:
            out.update(seconds=self.seconds, summary=self.summary,
                       per_layer={str(k): v for k, v in self.per_layer.items()}, notes=self.notes)
        return out


def run(config: GroupsConfig, *, model: Any = None) -> GroupsResult:
    """Discover the structure graph of ``config.model`` (or of ``model`` when given)."""
    from ..graph.discover import discover

    if model is None:
        from ..models.loading import check_causal_lm, load_model

        check_causal_lm(config.model)  # from config.json alone: an encoder is refused before its weights load
        model = load_model(config.model)
    if config.lora_rank:
        from ..models.lora import LoraSettings, attach_lora

        model = attach_lora(model, LoraSettings(r=config.lora_rank, alpha=2 * config.lora_rank, dropout=0.0))
    start = time.perf_counter()
    graph = discover(model, hidden=config.hidden)
    seconds = time.perf_counter() - start
    counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for g in graph.groups:
        if g.layer is not None:
            counts[g.layer][g.kind] += 1
    return GroupsResult(
        model=config.model, model_type=graph.model_type, num_layers=graph.num_layers,
        total_params=graph.total_params, lora=graph.lora, seconds=seconds, summary=graph.summary(),
        per_layer={layer: dict(c) for layer, c in sorted(counts.items())}, notes=list(graph.notes), graph=graph)
