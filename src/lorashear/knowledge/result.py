"""The outcome of the knowledge analysis: ``knowledge.json`` and its loader.

``knowledge.json`` layout (``format_version`` 1)::

    {"format": "lorashear.knowledge", "format_version": 1, "lorashear_version": "0.1.0",
     "model": {"name": ..., "model_type": "llama", "num_layers": 30},
     "metric": "relative_ppl", "ratios": [0.2, 0.5], "gamma": 0.2,
     "full_loss": 2.71, "full_perplexity": 15.0,
     "data": {"spec": "builtin:calibration", "num_sequences": 16, "seq_len": 128, ...},
     "config": {...KnowledgeConfig...}, "seconds": 412.0, "forward_passes": 121,
     "node_groups": [{"name": "layer0.attention", "layer": 0, "block": "attention",
                      "structure_kind": "attention_head", "num_structures": 3,
                      "pruned": {"0.2": [1], "0.5": [0, 1]}, "loss": {...},
                      "deviation": {"0.2": 0.04, "0.5": 0.31}, "score": 0.175,
                      "rank": 9, "unprunable": true, "seconds": 6.1}, ...]}

Deviations that are not finite are written as ``null`` and read back as ``inf``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_write_json
from ..errors import ConfigError
from ..graph.groups import Group, GroupKind, StructureGraph
from ..models.adapters import BLOCK_OF_KIND

KNOWLEDGE_FILENAME = "knowledge.json"
FORMAT = "lorashear.knowledge"
FORMAT_VERSION = 1

#: Group kinds that belong to a block; all of them become unprunable with their node group.
BLOCK_KINDS: dict[str, tuple[GroupKind, ...]] = {
    block: tuple(kind for kind, b in BLOCK_OF_KIND.items() if b == block)  # type: ignore[misc]
    for block in dict.fromkeys(BLOCK_OF_KIND.values())
}


def ratio_key(ratio: float) -> str:
    """JSON key of a ratio: ``0.2 -> "0.2"``."""
    return format(ratio, "g")


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _none_to_inf(x: Any) -> float:
    return math.inf if x is None else float(x)


@dataclass
class NodeGroupResult:
    """Deviation of one node group (a layer's attention or MLP block) for every ratio."""

    name: str
    layer: int
    block: str
    structure_kind: str
    num_structures: int
    pruned: dict[str, list[int]]
    loss: dict[str, float]
    deviation: dict[str, float]
    score: float
    rank: int
    unprunable: bool
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "layer": self.layer, "block": self.block,
            "structure_kind": self.structure_kind, "num_structures": self.num_structures,
            "pruned": self.pruned,
            "loss": {k: _finite_or_none(v) for k, v in self.loss.items()},
            "deviation": {k: _finite_or_none(v) for k, v in self.deviation.items()},
            "score": _finite_or_none(self.score), "rank": self.rank, "unprunable": self.unprunable,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NodeGroupResult:
        return cls(
            name=str(d["name"]), layer=int(d["layer"]), block=str(d["block"]),
            structure_kind=str(d["structure_kind"]), num_structures=int(d["num_structures"]),
            pruned={str(k): [int(i) for i in v] for k, v in d.get("pruned", {}).items()},
            loss={str(k): _none_to_inf(v) for k, v in d.get("loss", {}).items()},
            deviation={str(k): _none_to_inf(v) for k, v in d["deviation"].items()},
            score=_none_to_inf(d["score"]), rank=int(d["rank"]), unprunable=bool(d["unprunable"]),
            seconds=float(d.get("seconds", 0.0)),
        )


@dataclass
class KnowledgeResult:
    """Per-node-group deviations, the ranking and the unprunable set, plus how they were measured."""

    node_groups: list[NodeGroupResult]
    ratios: tuple[float, ...]
    gamma: float
    metric: str
    full_loss: float
    full_perplexity: float
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    forward_passes: int = 0

    # ------------------------------------------------------------------ queries
    def unprunable_node_groups(self) -> list[NodeGroupResult]:
        return sorted((n for n in self.node_groups if n.unprunable), key=lambda n: n.rank)

    def ranked(self) -> list[NodeGroupResult]:
        """Node groups from most to least sensitive."""
        return sorted(self.node_groups, key=lambda n: n.rank)

    def unprunable_groups(self, graph: StructureGraph) -> list[Group]:
        """Every group of ``graph`` inside an unprunable node group: for an attention block
        its query-head slots *and* KV groups, for an MLP block its channels."""
        recorded = self.model.get("num_layers")
        if recorded is not None and int(recorded) != graph.num_layers:
            raise ConfigError(f"the knowledge analysis was run on a model with {recorded} layers, "
                              f"the structure graph has {graph.num_layers}")
        wanted = {(n.layer, kind) for n in self.node_groups if n.unprunable for kind in BLOCK_KINDS[n.block]}
        return [g for g in graph.groups if (g.layer, g.kind) in wanted]

    def unprunable_group_ids(self, graph: StructureGraph) -> set[int]:
        return {g.id for g in self.unprunable_groups(graph)}

    def layer_weights(self, strength: float) -> dict[tuple[str, int], float]:
        """``{(group kind, layer): weight}`` for graded allocation: ``(mean / score) ** strength``.

        ``score`` is a block's mean deviation over the analysed ratios and ``mean`` the mean over the
        prunable blocks of the same type (attention or MLP), so a block whose removal hurt twice as much
        as the typical one gets half the share at ``strength`` 1. Scores below 5% of the mean are raised
        to it (a block whose removal did not hurt does not take everything); a block whose deviation is
        infinite gets weight 0. Unprunable blocks are left out (they are not pruned at all).
        """
        out: dict[tuple[str, int], float] = {}
        for block in dict.fromkeys(n.block for n in self.node_groups):
            mine = [n for n in self.node_groups if n.block == block and not n.unprunable]
            finite = [n.score for n in mine if math.isfinite(n.score)]
            mean = sum(max(x, 0.0) for x in finite) / len(finite) if finite else 0.0
            for n in mine:
                if not math.isfinite(n.score):
                    weight = 0.0
                elif mean <= 0.0:
                    weight = 1.0
                else:
                    weight = (mean / max(n.score, 0.05 * mean)) ** strength
                for kind in BLOCK_KINDS[n.block]:
                    out[(kind, n.layer)] = weight
        return out

    def matrix(self) -> tuple[list[int], dict[str, list[float]]]:
        """``(layers, {block: score per layer})`` with NaN where a layer lacks the block."""
        layers = sorted({n.layer for n in self.node_groups})
        pos = {layer: i for i, layer in enumerate(layers)}
        out: dict[str, list[float]] = {}
        for n in self.node_groups:
            out.setdefault(n.block, [math.nan] * len(layers))[pos[n.layer]] = n.score
        return layers, out

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "lorashear_version": __version__,
            "model": self.model, "metric": self.metric, "ratios": list(self.ratios), "gamma": self.gamma,
            "full_loss": self.full_loss, "full_perplexity": _finite_or_none(self.full_perplexity),
            "data": self.data, "config": self.config, "seconds": round(self.seconds, 3),
            "forward_passes": self.forward_passes,
            "unprunable": [n.name for n in self.unprunable_node_groups()],
            "node_groups": [n.to_dict() for n in self.node_groups],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KnowledgeResult:
        if d.get("format") != FORMAT:
            raise ConfigError("not a lorashear knowledge file (missing \"format\": \"lorashear.knowledge\")")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ConfigError(f"knowledge file format {d['format_version']} is newer than this lorashear reads "
                              f"({FORMAT_VERSION}); upgrade lorashear")
        try:
            return cls(
                node_groups=[NodeGroupResult.from_dict(n) for n in d["node_groups"]],
                ratios=tuple(float(r) for r in d["ratios"]), gamma=float(d["gamma"]), metric=str(d["metric"]),
                full_loss=float(d["full_loss"]), full_perplexity=_none_to_inf(d.get("full_perplexity")),
                data=dict(d.get("data", {})), config=dict(d.get("config", {})), model=dict(d.get("model", {})),
                seconds=float(d.get("seconds", 0.0)), forward_passes=int(d.get("forward_passes", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed knowledge file: {type(exc).__name__}: {exc}") from exc

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``knowledge.json`` (``path`` is a directory or the file itself); returns the file."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / KNOWLEDGE_FILENAME
        atomic_write_json(path, self.to_dict())
        return path


def load_knowledge(path: str | os.PathLike[str]) -> KnowledgeResult:
    """Read a ``knowledge.json`` written by :meth:`KnowledgeResult.save` (a file or the directory holding it)."""
    path = Path(path)
    if path.is_dir():
        path = path / KNOWLEDGE_FILENAME
    if not path.is_file():
        raise ConfigError(f"knowledge file {path} does not exist; run `lorashear analyze` first")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"could not read knowledge file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"knowledge file {path} does not hold a JSON object")
    return KnowledgeResult.from_dict(data)
