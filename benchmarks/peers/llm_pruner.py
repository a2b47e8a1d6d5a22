"""Peer baseline: LLM-Pruner (Ma et al., "LLM-Pruner: On the Structural Pruning of Large Language
Models", NeurIPS 2023) / Torch-Pruning at its best settings, on lorashear's structures.

``torch_pruning_llm.py`` is the untuned block-wise recipe (8 calibration sequences, the same width
in layers 4..27, Torch-Pruning's own graph); its defaults are unchanged so its cached rows keep their
meaning. This module implements the same importance with the options the papers tune:

1. **Gradients** of the language-model loss on ``calib_sequences`` calibration sequences (>= 64).
   ``importance="param_first"``: the gradient ``g`` of the mean loss (batched passes).
   ``param_second`` / ``param_mix`` also need the diagonal of the Hessian, approximated as LLM-Pruner
   does by the Fisher information accumulated per sample: ``H_kk ~ mean_n g_{n,k}^2`` over one
   backward pass per sequence (``g`` is then the mean of the per-sample gradients, which is the
   gradient of the mean loss: no extra pass).
2. **Element-wise importance** of every weight (LLM-Pruner's ``param_*`` variants, the paper's
   "element-wise" estimate): ``param_first``: ``|w g|``; ``param_second``: ``|w H_kk w|``;
   ``param_mix``: ``|w g - 1/2 w H_kk w|``. A group's importance is the sum over every weight it
   owns (LLM-Pruner's ``group_reduction="sum"`` over the coupled layers: q_proj rows + o_proj columns
   for a head, gate/up rows + down_proj column for an MLP channel).
3. **Normalisation** (``head_reduce``, ``normalizer``): a query-head slot's score is its summed
   importance (``sum``: head level) or the average over its query channels (``mean``: channel level,
   Torch-Pruning's per-head average); then, within each layer and kind, one of Torch-Pruning's
   normalisers (``none``, ``mean``, ``max``, ``sum``, ``minmax``, ``gaussian``).
4. **Ranking** (``ranking``): ``block``: the same number of slots and MLP channels in every layer of
   ``[layer_start, layer_end)``, ranked within the layer (LLM-Pruner's block-wise default);
   ``kind``: global ranking across layers per kind (Torch-Pruning's ``global_pruning``, where heads
   form their own pool), each kind losing ``attention_share`` of the target or the same fraction of
   its removable parameters; ``global``: one pool of every kind ranked by importance per removed
   parameter (after the normaliser) - our extension (a knapsack-greedy joint ranking like FLAP's),
   not an option of LLM-Pruner's code. Every layer keeps ``min_slots`` query heads per KV group,
   ``min_kv`` KV groups and ``min_mlp`` MLP channels.
5. **GQA**: with ``align_heads`` each KV group's query heads are sorted by score first, so the
   ``r``-th slot holds every group's ``r``-th best head and removing a slot removes each group's own
   weakest head (Torch-Pruning's GQA rule: the same number of query heads from every group).
   ``kv_group`` in ``kinds`` (global ranking only) also lets whole KV groups go.

Cut with :func:`lorashear.compact` (exact); the target is a fraction of the whole model
(embeddings counted), like lorashear's ``--ratio``.

    python benchmarks/peers/llm_pruner.py smollm2-135m-instruct --ratio 0.2 --out runs/llmp20
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    NORMALISERS,
    LayerState,
    MinWidths,
    Timer,
    align_heads,
    apply_selection,
    by_layer,
    calibration_ids as _calibration_ids,
    check_common,
    compute_record,
    count_params,
    decoder_layers,
    layer_range,
    layer_widths,
    normalise,
    params_record,
    run_cli,
    save_run,
    select_greedy,
    split_target,
    structures,
    uniform_counts,
)
from lorashear.errors import ConfigError  # noqa: E402

logger = logging.getLogger("benchmarks.peers.llm_pruner")

REPORT_FILE = "llm_pruner_report.json"
IMPORTANCES = ("param_first", "param_second", "param_mix")


@dataclass
class LLMPrunerConfig:
    """LLM-Pruner / Torch-Pruning settings (see the module docstring). The defaults are the best of the
    one-shot screening on validation data (``benchmarks/results/peers_oneshot_smollm2.md``)."""

    ratio: float = field(default=0.2, metadata={"help": "fraction of all parameters to remove (embeddings counted)"})
    importance: Literal["param_first", "param_second", "param_mix"] = field(default="param_first", metadata={
        "help": "element-wise Taylor importance: param_first |w g|, param_second |w H w|, param_mix "
                "|w g - w H w / 2| (H: per-sample Fisher diagonal)"})
    ranking: Literal["block", "kind", "global"] = field(default="kind", metadata={
        "help": "block: the same widths in every pruned layer; kind: global ranking per kind; global: one pool "
                "ranked by importance per parameter"})
    head_reduce: Literal["sum", "mean"] = field(default="mean", metadata={
        "help": "a slot's score: summed importance (head level) or its average per query channel (channel level)"})
    normalizer: str = field(default="mean", metadata={
        "help": "Torch-Pruning normaliser within each layer and kind: none, mean, max, sum, minmax, gaussian"})
    attention_share: float | None = field(default=None, metadata={
        "help": "ranking block/kind: share of the removed parameters taken from attention; default: the same "
                "fraction of each kind's removable parameters"})
    kinds: tuple[str, ...] = field(default=("attention_head", "mlp_channel"), metadata={
        "help": "structures to remove: attention_head (query-head slots), kv_group (ranking global only), "
                "mlp_channel"})
    align_heads: bool = field(default=True, metadata={
        "help": "sort each KV group's query heads by score first (slot r = every group's r-th best head)"})
    min_slots: int = field(default=1, metadata={"help": "query heads per KV group every layer keeps"})
    min_kv: int = field(default=1, metadata={"help": "KV groups every layer keeps"})
    min_mlp: int = field(default=1, metadata={"help": "MLP channels every layer keeps"})
    layer_start: int = field(default=4, metadata={"help": "first decoder layer pruned (LLM-Pruner: 4)"})
    layer_end: int = field(default=-2, metadata={
        "help": "end of the pruned range, exclusive; negative counts from the end, 0 = all (LLM-Pruner: 30 of 32)"})
    data: str = field(default="builtin:calibration", metadata={"help": "calibration text (lorashear data spec)"})
    calib_sequences: int = field(default=64, metadata={"help": "calibration sequences for the gradients"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    batch_size: int = field(default=4, metadata={"help": "sequences per backward pass (param_first only; the "
                                                         "Hessian variants take one sequence per pass)"})
    seed: int = field(default=0, metadata={"help": "packing seed (same as lorashear prune's)"})

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        check_common(self)
        if self.calib_sequences < 1:
            raise ConfigError("calib_sequences must be >= 1")
        if self.importance not in IMPORTANCES:
            raise ConfigError(f"importance must be one of {', '.join(IMPORTANCES)}, got {self.importance!r}")
        if self.ranking not in ("block", "kind", "global"):
            raise ConfigError(f"ranking must be block, kind or global, got {self.ranking!r}")
        if self.head_reduce not in ("sum", "mean"):
            raise ConfigError(f"head_reduce must be sum or mean, got {self.head_reduce!r}")
        if self.normalizer not in NORMALISERS:
            raise ConfigError(f"normalizer must be one of {', '.join(NORMALISERS)}, got {self.normalizer!r}")
        if "kv_group" in self.kinds and self.ranking != "global":
            raise ConfigError("kv_group is ranked only with ranking=global")
        if self.ranking != "global" and set(self.kinds) != {"attention_head", "mlp_channel"}:
            raise ConfigError("ranking block/kind removes attention_head and mlp_channel; use ranking=global for "
                              "other kinds")


# -- gradients -------------------------------------------------------------------------------------
def _scored_params(model: torch.nn.Module, st, layers: list[int], kinds) -> dict[str, torch.nn.Parameter]:
    named = dict(model.named_parameters())
    names = {s.name for g in st.groups(kinds) if g.layer in layers for s in g.slices}
    return {n: named[n] for n in sorted(names)}


def taylor_statistics(model: torch.nn.Module, ids: torch.Tensor, params: dict[str, torch.nn.Parameter], *,
                      hessian: bool, batch_size: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None,
                                                            float, int]:
    """Gradient of the mean LM loss over ``ids`` and (``hessian``) the per-sample Fisher diagonal
    ``mean_n g_n^2`` for ``params``. Returns ``(grad, fisher, mean loss, backward passes in sequences)``.

    Only ``params`` require gradients while this runs (the embeddings' and norms' are not needed)."""
    flags = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    was = model.training
    model.eval()  # no dropout; LLM-Pruner computes the loss in eval mode too
    grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()} if hessian else None
    n = int(ids.shape[0])
    total = 0.0
    try:
        batches = ids.split(1 if hessian else batch_size)
        for batch in batches:
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / n).backward()  # d(mean over all sequences)/dW, summed over batches
            total += float(loss.detach()) * batch.shape[0] / n
            for name, p in params.items():
                if p.grad is None:
                    continue
                grad[name] += p.grad
                if fisher is not None:  # per-sample gradient = n * (this sample's share)
                    fisher[name] += (p.grad * n).pow(2) / n
    finally:
        model.zero_grad(set_to_none=True)
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        model.train(was)
    return grad, fisher, total, n


def element_salience(weight: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor | None, kind: str) -> torch.Tensor:
    """LLM-Pruner's element-wise importance ``|s|`` of every weight."""
    w = weight.detach().float()
    if kind == "param_first":
        s = w * grad
    elif kind == "param_second":
        s = w * fisher * w
    elif kind == "param_mix":
        s = w * grad - 0.5 * w * fisher * w
    else:
        raise ConfigError(f"unknown importance {kind!r}")
    return s.abs()


def group_scores(st, params, grad, fisher, kind: str, groups) -> dict[int, float]:
    """``{group id: summed element importance over every weight the group owns}``."""
    sums: dict[tuple[str, int], torch.Tensor] = {}
    for name, p in params.items():
        sal = element_salience(p, grad[name], fisher[name] if fisher is not None else None, kind).double()
        if sal.dim() == 1:
            sums[(name, 0)] = sal
        else:
            sums[(name, 0)] = sal.sum(1)
            sums[(name, 1)] = sal.sum(0)
    out = {}
    for g in groups:
        out[g.id] = float(sum(sums[(s.name, s.dim)][list(s.indices)].sum() for s in g.slices))
    return out


# -- the method ------------------------------------------------------------------------------------
def score_candidates(model, st, raw: dict[int, float], head_split: dict[tuple[int, int], float],
                     cfg: LLMPrunerConfig, layers: list[int]) -> tuple[
        list[tuple[Any, float]], dict[int, list[int]]]:
    """Aligned, reduced and normalised ``(group, key)`` candidates (lowest key removed first)."""
    hd = st.head_dim
    perms: dict[int, list[int]] = {}
    slot_score: dict[int, list[float]] = {}
    if "attention_head" in cfg.kinds:
        head_sc = {}
        for i in layers:
            ls = st.layers[i]
            # a head's summed importance (a slot's elements are exactly its heads')
            head_sc[i] = torch.tensor([head_split[(i, h)] for h in range(ls.num_heads)], dtype=torch.float64)
        if cfg.align_heads:
            perms = align_heads(model, st, head_sc)
            for i, perm in perms.items():
                head_sc[i] = head_sc[i][torch.tensor(perm)]
        for i in layers:
            ls = st.layers[i]
            slot_score[i] = [float(head_sc[i][heads].sum()) for heads in ls.slot_heads]
    cands: list[tuple[Any, float]] = []
    for i in layers:
        ls = st.layers[i]
        per_kind: dict[str, list[tuple[Any, float]]] = {}
        if "attention_head" in cfg.kinds:
            vals = []
            for g, heads, s in zip(ls.slots, ls.slot_heads, slot_score[i]):
                vals.append((g, s / (len(heads) * hd) if cfg.head_reduce == "mean" else s))
            per_kind["attention_head"] = vals
        if "kv_group" in cfg.kinds:
            per_kind["kv_group"] = [(g, raw[g.id] / (len(h) * hd) if cfg.head_reduce == "mean" else raw[g.id])
                                    for g, h in zip(ls.kv, ls.kv_heads)]
        if "mlp_channel" in cfg.kinds:
            per_kind["mlp_channel"] = [(g, raw[g.id]) for g in ls.mlp]
        for vals in per_kind.values():
            if not vals:
                continue
            normed = normalise(torch.tensor([v for _, v in vals], dtype=torch.float64), cfg.normalizer)
            for (g, _), v in zip(vals, normed.tolist()):
                key = v / g.base_params if cfg.ranking == "global" else v
                cands.append((g, key))
    return cands, perms


def head_split(st, params, grad, fisher, kind: str, layers: list[int]) -> dict[tuple[int, int], float]:
    """``{(layer, head): summed element importance of that head's q_proj rows and o_proj columns}``."""
    hd = st.head_dim
    out = {}
    for i in layers:
        ls = st.layers[i]
        if not ls.slots:
            continue
        q_name = next(s.name for s in ls.slots[0].slices if s.name.endswith("q_proj.weight"))
        o_name = next(s.name for s in ls.slots[0].slices if s.name.endswith("o_proj.weight"))
        bias_name = q_name[: -len("weight")] + "bias"
        q = element_salience(params[q_name], grad[q_name], fisher[q_name] if fisher else None, kind).double()
        o = element_salience(params[o_name], grad[o_name], fisher[o_name] if fisher else None, kind).double()
        per = q.sum(1).view(-1, hd).sum(1) + o.sum(0).view(-1, hd).sum(1)
        if bias_name in params:
            b = element_salience(params[bias_name], grad[bias_name], fisher[bias_name] if fisher else None, kind)
            per = per + b.double().view(-1, hd).sum(1)
        for h in range(per.numel()):
            out[(i, h)] = float(per[h])
    return out


def select(st, cands, target: float, cfg: LLMPrunerConfig, layers: list[int]) -> list[Any]:
    mins = MinWidths(cfg.min_slots, cfg.min_kv, cfg.min_mlp)
    if cfg.ranking == "block":
        h, c = uniform_counts(st, layers, target, mins, cfg.attention_share)
        taken = []
        for i in layers:
            mine = sorted([(g, k) for g, k in cands if g.layer == i], key=lambda t: t[1])
            taken += [g for g, _ in mine if g.kind == "attention_head"][:h]
            taken += [g for g, _ in mine if g.kind == "mlp_channel"][:c]
        return taken
    state = LayerState(st, mins)
    if cfg.ranking == "kind":
        want = split_target(st, layers, target, cfg.attention_share, mins)
        att, removed = select_greedy([c for c in cands if c[0].kind == "attention_head"], want["attention_head"],
                                     state)
        mlp, _ = select_greedy([c for c in cands if c[0].kind == "mlp_channel"], target - removed, state)
        return att + mlp
    taken, _ = select_greedy(cands, target, state)
    return taken


def importance_statistics(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: LLMPrunerConfig,
                          st=None) -> dict[str, Any]:
    """Everything the selection needs from the calibration data (reusable across ratios and options
    that keep ``importance``, ``kinds`` and the layer range)."""
    st = st or structures(model)
    layers = layer_range(len(decoder_layers(model)), cfg.layer_start, cfg.layer_end)
    params = _scored_params(model, st, layers, cfg.kinds)
    hessian = cfg.importance != "param_first"
    grad, fisher, loss, n = taylor_statistics(model, calib_ids, params, hessian=hessian, batch_size=cfg.batch_size)
    groups = [g for g in st.groups(cfg.kinds) if g.layer in layers]
    raw = group_scores(st, params, grad, fisher, cfg.importance, groups)
    split = head_split(st, params, grad, fisher, cfg.importance, layers)
    return {"raw": raw, "head_split": split, "loss": loss, "backward_sequences": n, "hessian": hessian}


def importance_statistics_all(model: torch.nn.Module, calib_ids: torch.Tensor, st=None,
                              kinds: tuple[str, ...] = ("attention_head", "kv_group", "mlp_channel")) -> dict[str, Any]:
    """:func:`importance_statistics` of every ``importance`` variant from one per-sample pass over every
    layer (the mean of the per-sample gradients is the ``param_first`` gradient): ``{importance: stats}``."""
    st = st or structures(model)
    layers = list(range(len(decoder_layers(model))))
    params = _scored_params(model, st, layers, kinds)
    grad, fisher, loss, n = taylor_statistics(model, calib_ids, params, hessian=True, batch_size=1)
    groups = [g for g in st.groups(kinds) if g.layer in layers]
    out = {}
    for kind in IMPORTANCES:
        out[kind] = {"raw": group_scores(st, params, grad, fisher, kind, groups),
                     "head_split": head_split(st, params, grad, fisher, kind, layers), "loss": loss,
                     "backward_sequences": n, "hessian": kind != "param_first"}
    return out


def prune_llm_pruner(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: LLMPrunerConfig, *,
                     stats: dict[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place (see the module docstring); returns it and a report.

    ``stats`` (from :func:`importance_statistics` on the same dense model with the same ``importance``,
    ``kinds`` and layer range) skips the gradient passes.
    """
    timer = Timer()
    before = count_params(model)
    st = structures(model)
    layers = layer_range(len(decoder_layers(model)), cfg.layer_start, cfg.layer_end)
    if stats is None:
        stats = importance_statistics(model, calib_ids, cfg, st)
    timer.mark("gradients_s")
    cands, perms = score_candidates(model, st, stats["raw"], stats["head_split"], cfg, layers)
    groups = select(st, cands, cfg.ratio * before, cfg, layers)
    timer.mark("selection_s")
    model = apply_selection(model, groups)
    timer.mark("compaction_s")
    after = count_params(model)
    n = int(calib_ids.shape[0])
    report = {
        "method": f"LLM-Pruner ({cfg.importance}, {cfg.ranking} ranking, head {cfg.head_reduce}, "
                  f"normaliser {cfg.normalizer})",
        "config": asdict(cfg),
        "params": params_record(before, after, cfg.ratio),
        "removed_groups": by_layer(groups),
        "removed_ids": sorted(g.id for g in groups),
        "widths": layer_widths(model),
        "head_permutations": {str(k): v for k, v in perms.items()},
        "calibration": {**compute_record(calib_ids, forward_seqs=n, backward_seqs=n, params=before,
                                         note=("one forward+backward pass per sequence (per-sample Fisher)"
                                               if stats["hessian"] else "batched forward+backward passes")),
                        "loss": stats["loss"]},
        "timings": {k: round(v, 3) for k, v in timer.marks.items()},
        "wall_time_s": timer.total,
    }
    logger.info("LLM-Pruner removed %d of %d parameters (%.2f%%)", before - after, before,
                100 * (before - after) / before)
    return model, report


def calibration_ids(tokenizer: Any, cfg: LLMPrunerConfig) -> torch.Tensor:
    return _calibration_ids(tokenizer, cfg.data, cfg.seq_len, cfg.calib_sequences, cfg.seed)


def run(model_name: str, out: str | Path, cfg: LLMPrunerConfig) -> dict[str, Any]:
    import lorashear

    t0 = time.perf_counter()
    model = lorashear.load_model(model_name)
    tokenizer = lorashear.load_tokenizer(model_name)
    model, report = prune_llm_pruner(model, calibration_ids(tokenizer, cfg), cfg)
    report["model"] = model_name
    report["total_wall_time_s"] = time.perf_counter() - t0
    save_run(model, tokenizer, str(out), report, REPORT_FILE)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(__doc__.split("\n\n")[0], LLMPrunerConfig, run, argv, "LLM-Pruner")


if __name__ == "__main__":
    sys.exit(main())
