"""Knowledge distribution analysis (paper Alg. 3): which node groups the model cannot lose.

For each node group (one layer's attention block or MLP block) and each ratio
``p``, the lowest-ranked ``p`` of its structures (by a proxy, L2 magnitude by
default) are zeroed *in place*, the model is evaluated on a fixed token set, and
the zeroed slices are written back from a copy of just those slices::

    full = loss(model)                          # 1 forward pass over the set
    for node in node_groups:                    # e.g. 30 layers x {attention, mlp}
        for p in ratios:                        # e.g. {0.2, 0.5}
            with masked(model, lowest_p(node)): # saves the slices, zeroes them
                dev[node][p] = deviation(loss(model), full)
            # slices restored bit-exactly here
    score = mean over p; top gamma * |N| by score -> unprunable

Cost: exactly ``1 + |N| * |P|`` forward passes over the set; memory: the model
plus the saved slices of one node group (never a model copy).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError, DataError
from ..graph.groups import Group, GroupKind, StructureGraph, removal_plan, zero_groups
from ..progress import progress_disabled
from .config import KnowledgeConfig, num_to_prune, num_unprunable
from .proxies import Proxy, ProxyContext, make_proxy
from .result import KnowledgeResult, NodeGroupResult, ratio_key

logger = logging.getLogger(__name__)

Block = Literal["attention", "mlp"]



@dataclass
class NodeGroup:
    """One block of one decoder layer and the structures the analysis prunes in it."""

    layer: int
    block: Block
    structure_kind: GroupKind
    structures: list[Group]

    @property
    def name(self) -> str:
        return f"layer{self.layer}.{self.block}"


def node_groups(graph: StructureGraph, attention_structure: GroupKind = "attention_head") -> list[NodeGroup]:
    """Per layer: the attention block (its ``attention_structure`` groups, or the other
    attention kind when the layer has none of those) and the MLP block (its channels).
    Only prunable groups are pruned; a block with none is not a node group."""
    other: GroupKind = "kv_group" if attention_structure == "attention_head" else "attention_head"
    layers = sorted({g.layer for g in graph.groups if g.layer is not None})
    nodes: list[NodeGroup] = []
    for layer in layers:
        for kind in (attention_structure, other):
            heads = [g for g in graph.in_layer(layer, [kind]) if g.prunable]
            if heads:
                nodes.append(NodeGroup(layer, "attention", kind, sorted(heads, key=lambda g: g.index)))
                break
        channels = [g for g in graph.in_layer(layer, ["mlp_channel"]) if g.prunable]
        if channels:
            nodes.append(NodeGroup(layer, "mlp", "mlp_channel", sorted(channels, key=lambda g: g.index)))
    if not nodes:
        raise ConfigError("the structure graph has no prunable attention or MLP structures to analyse")
    return nodes


# ----------------------------------------------------------------------------- masking

class SliceSnapshot:
    """Copies of exactly the slices ``groups`` touch, to undo :func:`zero_groups` bit-exactly.

    Every slice is copied before anything is zeroed, so slices that overlap (a
    parameter cut along two dims, tied weights under two names) all hold the
    original values and restoring them in any order gives back the original tensor.
    """

    @torch.no_grad()
    def __init__(self, params: Mapping[str, torch.Tensor], groups: Sequence[Group]) -> None:
        self._saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
        for name, dims in removal_plan(groups).items():
            p = params[name]
            for dim, idx in dims.items():
                index = torch.tensor(sorted(idx), dtype=torch.long, device=p.device)
                self._saved.append((p, dim, index, p.index_select(dim, index)))  # index_select copies

    @property
    def numel(self) -> int:
        return sum(v.numel() for *_, v in self._saved)

    @torch.no_grad()
    def restore(self) -> None:
        for p, dim, index, values in reversed(self._saved):
            p.index_copy_(dim, index, values)


@contextlib.contextmanager
def masked(model: torch.nn.Module, groups: Sequence[Group],
           params: Mapping[str, torch.Tensor] | None = None) -> Iterator[None]:
    """Zero ``groups`` in place for the duration of the block, then restore them exactly."""
    params = params if params is not None else dict(model.named_parameters(remove_duplicate=False))
    snapshot = SliceSnapshot(params, groups)
    try:
        zero_groups(model, groups)
        yield
    finally:
        snapshot.restore()


# ----------------------------------------------------------------------------- evaluation

@torch.no_grad()
def mean_token_nll(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 4) -> float:
    """Mean next-token negative log-likelihood (nats) over every position of ``tokens`` (N, L)."""
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    for batch in tokens.split(batch_size):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits  # (B, L, V)
        targets = batch[:, 1:]  # (B, L-1)
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="sum")
        total += nll.double().cpu()
        count += targets.numel()
    return float(total) / count


def deviation(loss: float, full_loss: float, metric: str = "relative_ppl") -> float:
    """Deviation of a pruned model from the full one.

    ``relative_ppl``: ``|ppl - ppl_full| / ppl_full = |exp(loss - full_loss) - 1|``;
    ``loss_increase``: ``|loss - full_loss|`` (nats per token). Non-finite losses give ``inf``.
    """
    if not math.isfinite(loss):
        return math.inf
    delta = loss - full_loss
    if metric == "loss_increase":
        return abs(delta)
    if metric == "relative_ppl":
        try:
            return abs(math.expm1(delta))
        except OverflowError:
            return math.inf
    raise ConfigError(f"unknown metric {metric!r}; use relative_ppl or loss_increase")


def rank_scores(scores: Sequence[float], gamma: float) -> tuple[list[int], list[bool]]:
    """Rank node groups by score (1 = largest deviation = most sensitive; NaN counts as
    infinitely sensitive; ties keep the input order) and flag the top ``gamma * n``."""
    keyed = [(-(math.inf if math.isnan(s) else s), i) for i, s in enumerate(scores)]
    order = [i for _, i in sorted(keyed)]
    ranks = [0] * len(scores)
    for r, i in enumerate(order, start=1):
        ranks[i] = r
    top = num_unprunable(gamma, len(scores))
    return ranks, [ranks[i] <= top for i in range(len(scores))]


def _progress_disabled(progress: bool | None) -> bool:
    if progress is not None:
        return not progress
    return progress_disabled()


def check_tokens(tokens: torch.Tensor) -> torch.Tensor:
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        raise DataError("the evaluation set must be a 2-D tensor of token ids (sequences x length)")
    if tokens.shape[0] < 1 or tokens.shape[1] < 2:
        raise DataError(f"the evaluation set is empty or too short (shape {tuple(tokens.shape)}); "
                        "need at least one sequence of 2+ tokens")
    if tokens.dtype not in (torch.long, torch.int32, torch.int64):
        raise DataError(f"token ids must be integers, got {tokens.dtype}")
    return tokens.long()


def analyze_knowledge(
    model: torch.nn.Module,
    graph: StructureGraph,
    tokens: torch.Tensor,
    config: KnowledgeConfig | None = None,
    *,
    proxy: Proxy | None = None,
    progress: bool | None = None,
    model_name: str | None = None,
    data_info: Mapping[str, object] | None = None,
) -> KnowledgeResult:
    """Run the analysis and return a :class:`KnowledgeResult` (the model is left unchanged).

    Args:
        model: the model ``graph`` was discovered on (LoRA attached or not).
        graph: its structure graph (:func:`lorashear.discover`).
        tokens: the evaluation set, ``(num_sequences, seq_len)`` token ids.
        config: ratios, gamma, proxy, metric, attention structure, batch size.
        proxy: overrides ``config.proxy`` with any ``proxy(group, params) -> float``
            (lowest scores are pruned first).
        progress: show a tqdm bar (default: unless ``LORASHEAR_DISABLE_PROGRESS`` is set).
        model_name, data_info: recorded in the result.
    """
    from tqdm.auto import tqdm

    config = config or KnowledgeConfig()
    tokens = check_tokens(tokens)
    nodes = node_groups(graph, config.attention_structure)
    proxy_fn = proxy or make_proxy(config.proxy, ProxyContext(
        model=model, groups=[g for n in nodes for g in n.structures], tokens=tokens, seed=config.seed,
        batch_size=config.batch_size))
    proxy_name = config.proxy if proxy is None else getattr(proxy, "__name__", "custom")
    params = dict(model.named_parameters(remove_duplicate=False))
    missing = sorted({s.name for n in nodes for g in n.structures for s in g.slices} - set(params))
    if missing:
        raise ConfigError(f"the structure graph names parameters the model lacks (e.g. {missing[0]}); "
                          "discover the graph on this model")

    was_training = model.training
    model.eval()
    start = time.perf_counter()
    try:
        full_loss = mean_token_nll(model, tokens, config.batch_size)
        if not math.isfinite(full_loss):
            raise DataError("the full model's loss on the evaluation set is not finite")
        logger.info("full model: loss %.4f, perplexity %.3f on %d x %d tokens",
                    full_loss, math.exp(full_loss), *tokens.shape)
        rows: list[dict] = []
        bar = tqdm(total=len(nodes) * len(config.ratios), desc="knowledge analysis", unit="trial",
                   disable=_progress_disabled(progress))
        with bar:
            for node in nodes:
                t0 = time.perf_counter()
                importance = [float(proxy_fn(g, params)) for g in node.structures]
                order = sorted(range(len(node.structures)), key=lambda i: (importance[i], i))
                row: dict = {"node": node, "pruned": {}, "loss": {}, "deviation": {}}
                for p in config.ratios:
                    k = num_to_prune(p, len(node.structures))
                    chosen = [node.structures[i] for i in order[:k]]
                    with masked(model, chosen, params):
                        loss = mean_token_nll(model, tokens, config.batch_size)
                    key = ratio_key(p)
                    row["pruned"][key] = sorted(g.index for g in chosen)
                    row["loss"][key] = loss
                    row["deviation"][key] = deviation(loss, full_loss, config.metric)
                    bar.set_postfix_str(f"{node.name} p={p:g} dev={row['deviation'][key]:.3g}")
                    bar.update(1)
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
    finally:
        model.train(was_training)

    scores = [sum(r["deviation"].values()) / len(r["deviation"]) for r in rows]
    ranks, flags = rank_scores(scores, config.gamma)
    results = [
        NodeGroupResult(
            name=r["node"].name, layer=r["node"].layer, block=r["node"].block,
            structure_kind=r["node"].structure_kind, num_structures=len(r["node"].structures),
            pruned=r["pruned"], loss=r["loss"], deviation=r["deviation"], score=score,
            rank=rank, unprunable=flag, seconds=r["seconds"])
        for r, score, rank, flag in zip(rows, scores, ranks, flags)
    ]
    data = {"num_sequences": int(tokens.shape[0]), "seq_len": int(tokens.shape[1]),
            "num_tokens": int(tokens.numel()), "scored_positions": int(tokens.shape[0] * (tokens.shape[1] - 1))}
    data.update(dict(data_info or {}))
    from ..config import to_json_dict

    cfg = to_json_dict(config)
    cfg["proxy"] = proxy_name
    return KnowledgeResult(
        node_groups=results, ratios=tuple(config.ratios), gamma=config.gamma, metric=config.metric,
        full_loss=full_loss, full_perplexity=math.exp(full_loss), data=data, config=cfg,
        model={"name": model_name, "model_type": graph.model_type, "num_layers": graph.num_layers},
        seconds=time.perf_counter() - start, forward_passes=1 + len(nodes) * len(config.ratios))

