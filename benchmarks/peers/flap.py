"""Peer baseline: FLAP (An et al., "Fluctuation-based Adaptive Structured Pruning for Large Language
Models", AAAI 2024), one-shot, no retraining, with bias compensation.

What it does (the pruning step of the paper and of its official code, on lorashear's structures):

1. **Statistics** (one forward pass of the dense model over the calibration sequences, no gradient):
   for every input channel ``j`` of ``o_proj`` and ``down_proj`` (the attention heads' outputs and
   the MLP's ``act(gate) * up``), the mean ``mean_j`` and the sample variance ``var_j`` over all
   calibration tokens (float64 sums; the paper's definition).
2. **Fluctuation metric** (``metric="WIFV"``, the paper's choice): ``S_j = var_j * ||W[:, j]||^2``
   (``W`` the o_proj/down_proj weight). ``IFV`` is ``var_j`` alone, ``WIFN`` is
   ``mean_i |W_ij| * sqrt(mean x_j^2)``.
3. **Adaptive structure search** (``structure="AL-AM"``: adaptive across layers and modules).
   Scores are standardised within each layer and module, ``(S - mean) / std``, then ranked
   globally across layers and both modules; each candidate weighs its parameter count, and the
   least important are removed until the target is reached. How a head's score is formed
   (``attention_score``):

   - ``official`` (the released code): the o_proj channel metric is squared, standardised over
     the layer's o_proj channels, and a head's score is the mean over its ``head_dim`` channels;
   - ``head_sum`` (the paper's text): a head's score is the sum of its channels' metrics,
     standardised over the layer's heads.

   A query-head slot (one head from every KV group, see ``_common``) scores the mean of its heads;
   with ``align_heads`` every KV group's heads are first sorted by score, so slot ``r`` holds each
   group's ``r``-th best head. A KV group (what FLAP's GQA ports remove; a candidate by default,
   the better setting on validation data) scores the mean of its heads. ``structure="UL-UM"``
   removes the same share from every layer (ranked within the layer): the paper's uniform baseline.
4. **Bias compensation**: the removed channels' mean contribution is added as a bias,
   ``b_o += W_o[:, removed] @ mean[removed]`` and ``b_down += W_down[:, removed] @ mean[removed]``
   (the pruned layer then outputs exactly what the dense layer outputs when the removed inputs
   sit at their calibration mean). Llama has no bias there: the model's config gets
   ``attention_bias`` and ``mlp_bias`` (the only switches transformers has), so q/k/v/gate/up carry
   zero biases too. Those parameters are counted: the selection removes enough extra structures
   that the whole model, biases included, loses ``ratio`` of its parameters. The directory saves
   and loads with ``lorashear.save_pretrained`` / ``load_pretrained``, and LoRA fine-tuning works on it.

Differences from the official code, on purpose: the variance is the exact sample variance over all
calibration tokens (the released online update drops the first batch and divides by sequence
counts), each candidate weighs its true parameter count (the code uses 512/3 channels per head, the
ratio for LLaMA-7B's MHA heads), the target is a fraction of the whole model (embeddings counted),
and every layer keeps ``min_slots`` query heads per KV group and ``min_mlp`` channels (the code may
empty a layer's attention).

    python benchmarks/peers/flap.py smollm2-135m-instruct --ratio 0.2 --out runs/flap20
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
    Extra,
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
    params_record,
    permute_heads_vector,
    run_cli,
    save_run,
    select_greedy,
    structures,
    uniform_counts,
)
from lorashear.errors import ConfigError  # noqa: E402

logger = logging.getLogger("benchmarks.peers.flap")

REPORT_FILE = "flap_report.json"


@dataclass
class FlapConfig:
    """FLAP settings. Defaults: the paper's best (WIFV + AL-AM + bias compensation) with query-head slots and
    KV groups as candidates (the best of the one-shot screening, ``benchmarks/results/peers_oneshot_smollm2.md``)."""

    ratio: float = field(default=0.2, metadata={"help": "fraction of all parameters to remove (embeddings and the "
                                                        "added biases counted)"})
    metric: Literal["WIFV", "IFV", "WIFN"] = field(default="WIFV", metadata={
        "help": "channel importance: WIFV = variance x squared weight-column norm (the paper's), IFV = variance, "
                "WIFN = weighted input norm"})
    structure: Literal["AL-AM", "UL-UM"] = field(default="AL-AM", metadata={
        "help": "AL-AM: standardise per layer/module, rank globally (the paper's); UL-UM: the same share per layer"})
    attention_score: Literal["official", "head_sum"] = field(default="official", metadata={
        "help": "official: squared channel metric, standardised over the layer's channels, mean per head (the "
                "released code); head_sum: summed per head, standardised over the layer's heads (the paper's text)"})
    bias: bool = field(default=True, metadata={"help": "bias compensation (adds attention_bias/mlp_bias)"})
    kinds: tuple[str, ...] = field(default=("attention_head", "kv_group", "mlp_channel"), metadata={
        "help": "structures to remove: attention_head (query-head slots), kv_group (whole KV groups, what FLAP's "
                "GQA ports remove), mlp_channel"})
    align_heads: bool = field(default=True, metadata={
        "help": "sort each KV group's query heads by score first (slot r = every group's r-th best head)"})
    min_slots: int = field(default=1, metadata={"help": "query heads per KV group every layer keeps"})
    min_kv: int = field(default=1, metadata={"help": "KV groups every layer keeps"})
    min_mlp: int = field(default=1, metadata={"help": "MLP channels every layer keeps"})
    layer_start: int = field(default=0, metadata={"help": "first decoder layer pruned"})
    layer_end: int = field(default=0, metadata={"help": "end of the pruned range, exclusive (negative: from the end; "
                                                        "0: all)"})
    data: str = field(default="builtin:calibration", metadata={"help": "calibration text (lorashear data spec)"})
    calib_sequences: int = field(default=1024, metadata={"help": "calibration sequences (the paper: 1024)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence (the paper: 128)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "packing seed (same as lorashear prune's)"})

    def __post_init__(self) -> None:
        self.kinds = tuple(self.kinds)
        check_common(self)
        if self.metric not in ("WIFV", "IFV", "WIFN"):
            raise ConfigError(f"metric must be WIFV, IFV or WIFN, got {self.metric!r}")
        if self.structure not in ("AL-AM", "UL-UM"):
            raise ConfigError(f"structure must be AL-AM or UL-UM, got {self.structure!r}")
        if self.attention_score not in ("official", "head_sum"):
            raise ConfigError(f"attention_score must be official or head_sum, got {self.attention_score!r}")
        if self.structure == "UL-UM" and "kv_group" in self.kinds:
            raise ConfigError("UL-UM removes query-head slots and MLP channels; drop kv_group from kinds")


# -- statistics ------------------------------------------------------------------------------------
class ChannelMoments:
    """Running per-channel count, sum and sum of squares (float64) of a linear layer's input."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.sumsq = torch.zeros(channels, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.sumsq += (x * x).sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(1, self.n)

    @property
    def var(self) -> torch.Tensor:
        """Sample variance (``n - 1`` in the denominator)."""
        if self.n < 2:
            return torch.zeros_like(self.sum)
        return ((self.sumsq - self.sum * self.sum / self.n) / (self.n - 1)).clamp_min(0.0)

    @property
    def mean_square(self) -> torch.Tensor:
        return self.sumsq / max(1, self.n)


@torch.no_grad()
def collect_moments(model: torch.nn.Module, ids: torch.Tensor, batch_size: int) -> dict[int, dict[str, ChannelMoments]]:
    """``{layer: {"o_proj": moments, "down_proj": moments}}`` of the dense model over ``ids``."""
    layers = decoder_layers(model)
    stats: dict[int, dict[str, ChannelMoments]] = {}
    handles = []
    for i, layer in enumerate(layers):
        o, d = layer.self_attn.o_proj, layer.mlp.down_proj
        stats[i] = {"o_proj": ChannelMoments(o.in_features), "down_proj": ChannelMoments(d.in_features)}
        for name, mod in (("o_proj", o), ("down_proj", d)):
            handles.append(mod.register_forward_hook(
                lambda _m, inp, _out, acc=stats[i][name]: acc.add(inp[0])))
    was = model.training
    model.eval()
    try:
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return stats


def channel_metric(weight: torch.Tensor, moments: ChannelMoments, metric: str) -> torch.Tensor:
    """FLAP's per-input-channel importance of a linear layer (``weight``: ``(out, in)``)."""
    w = weight.detach().double()
    if metric == "WIFV":
        return moments.var * w.pow(2).sum(0)
    if metric == "IFV":
        return moments.var.clone()
    if metric == "WIFN":
        return (w.abs() * moments.mean_square.sqrt().unsqueeze(0)).mean(0)
    raise ConfigError(f"unknown metric {metric!r}")


def standardise(x: torch.Tensor) -> torch.Tensor:
    """``(x - mean) / std`` (sample std), the paper's per-layer, per-module standardisation."""
    x = x.double()
    std = x.std() if x.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
    return (x - x.mean()) / std.clamp_min(1e-30)


def head_scores(o_metric: torch.Tensor, head_dim: int, how: str) -> torch.Tensor:
    """Per-head score from the o_proj channel metric (``(num_heads * head_dim,)``); see ``attention_score``."""
    if how == "official":
        return standardise(o_metric.pow(2)).view(-1, head_dim).mean(1)
    if how == "head_sum":
        return standardise(o_metric.view(-1, head_dim).sum(1))
    raise ConfigError(f"unknown attention_score {how!r}")


# -- bias ------------------------------------------------------------------------------------------
def bias_params_for(widths: dict[int, dict[str, int]], hidden: int, head_dim: int) -> int:
    """Parameters the added biases hold (q/k/v/o and gate/up/down of every layer)."""
    total = 0
    for w in widths.values():
        total += (w["q_heads"] + 2 * w["kv_heads"]) * head_dim + hidden  # q, k, v, o
        total += 2 * w["mlp"] + hidden  # gate, up, down
    return total


@torch.no_grad()
def add_biases(model: torch.nn.Module, o_bias: dict[int, torch.Tensor], down_bias: dict[int, torch.Tensor]) -> None:
    """Give every q/k/v/o and gate/up/down a bias (zero unless compensated) and switch the config on."""
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    for i, layer in enumerate(decoder_layers(model)):
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
            if lin.bias is None:
                lin.bias = torch.nn.Parameter(torch.zeros(lin.out_features, dtype=dtype, device=device))
        if i in o_bias:
            a.o_proj.bias.data += o_bias[i].to(dtype=dtype, device=device)
        if i in down_bias:
            m.down_proj.bias.data += down_bias[i].to(dtype=dtype, device=device)
    model.config.attention_bias = True
    model.config.mlp_bias = True
    per_layer = getattr(model.config, "per_layer_config", None)
    if per_layer:
        for c in (per_layer.values() if isinstance(per_layer, dict) else per_layer):
            if hasattr(c, "attention_bias"):
                c.attention_bias = True
                c.mlp_bias = True


# -- the method ------------------------------------------------------------------------------------
def score_groups(model: torch.nn.Module, st, stats, cfg: FlapConfig, layers: list[int]) -> tuple[
        list[tuple[Any, float]], dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, list[int]]]:
    """Standardised scores of every candidate group, the per-channel means (in the aligned order)
    and the head permutations applied."""
    hd = st.head_dim
    dl = decoder_layers(model)
    o_mean: dict[int, torch.Tensor] = {}
    d_mean: dict[int, torch.Tensor] = {}
    h_scores: dict[int, torch.Tensor] = {}
    m_scores: dict[int, torch.Tensor] = {}
    for i in layers:
        s = stats[i]
        h_scores[i] = head_scores(channel_metric(dl[i].self_attn.o_proj.weight, s["o_proj"], cfg.metric), hd,
                                  cfg.attention_score)
        m_scores[i] = standardise(channel_metric(dl[i].mlp.down_proj.weight, s["down_proj"], cfg.metric))
        o_mean[i] = s["o_proj"].mean
        d_mean[i] = s["down_proj"].mean
    perms: dict[int, list[int]] = {}
    if cfg.align_heads and "attention_head" in cfg.kinds:
        perms = align_heads(model, st, h_scores)
        for i, perm in perms.items():
            h_scores[i] = h_scores[i][torch.tensor(perm)]
            o_mean[i] = permute_heads_vector(o_mean[i], perm, hd)
    cands: list[tuple[Any, float]] = []
    for i in layers:
        ls = st.layers[i]
        if "attention_head" in cfg.kinds:
            for g, heads in zip(ls.slots, ls.slot_heads):
                cands.append((g, float(h_scores[i][heads].mean())))
        if "kv_group" in cfg.kinds:
            for g, heads in zip(ls.kv, ls.kv_heads):
                cands.append((g, float(h_scores[i][heads].mean())))
        if "mlp_channel" in cfg.kinds:
            sc = m_scores[i]
            for g in ls.mlp:
                cands.append((g, float(sc[g.index])))
    return cands, o_mean, d_mean, perms


def bias_extra(head_dim: int) -> Extra:
    """Bias elements that leave with each structure: a query head's q bias rows, a KV group's k/v bias
    rows, an MLP channel's gate/up bias entries (o_proj/down_proj biases stay whole)."""
    return Extra(head=head_dim, kv=2 * head_dim, channel=2)


def full_bias_params(st, hidden: int) -> int:
    """The biases of the unpruned model once compensation switches them on."""
    total = 0
    for ls in st.layers.values():
        total += (ls.num_heads + 2 * max(1, len(ls.kv))) * st.head_dim + hidden + 2 * len(ls.mlp) + hidden
    return total


def _select(st, cands, target: float, cfg: FlapConfig, layers: list[int]) -> list[Any]:
    mins = MinWidths(cfg.min_slots, cfg.min_kv, cfg.min_mlp)
    extra = bias_extra(st.head_dim) if cfg.bias else Extra()
    state = LayerState(st, mins, extra)
    if cfg.structure == "AL-AM":
        taken, _ = select_greedy(cands, target, state)
        return taken
    h, c = uniform_counts(st, layers, target, mins, extra=extra)
    taken = []
    for i in layers:
        mine = sorted([(g, k) for g, k in cands if g.layer == i], key=lambda t: t[1])
        taken += [g for g, _ in mine if g.kind == "attention_head"][:h]
        taken += [g for g, _ in mine if g.kind == "mlp_channel"][:c]
    return taken


@torch.no_grad()
def compensation(model: torch.nn.Module, groups, o_mean, d_mean) -> tuple[
        dict[int, torch.Tensor], dict[int, torch.Tensor], dict[int, dict[str, list[int]]]]:
    """``W[:, removed] @ mean[removed]`` for o_proj and down_proj of every layer (before compaction),
    and the removed input columns (in the model's current, aligned order)."""
    removed_cols: dict[int, dict[str, set[int]]] = {}
    for g in groups:
        cols = removed_cols.setdefault(g.layer, {"o_proj": set(), "down_proj": set()})
        for s in g.slices:
            if s.dim == 1 and s.name.endswith("o_proj.weight"):
                cols["o_proj"].update(s.indices)
            elif s.dim == 1 and s.name.endswith("down_proj.weight"):
                cols["down_proj"].update(s.indices)
    dl = decoder_layers(model)
    o_bias, d_bias = {}, {}
    for i, cols in removed_cols.items():
        if cols["o_proj"]:
            idx = torch.tensor(sorted(cols["o_proj"]))
            w = dl[i].self_attn.o_proj.weight.detach().double()
            o_bias[i] = (w[:, idx] @ o_mean[i][idx]).float()
        if cols["down_proj"]:
            idx = torch.tensor(sorted(cols["down_proj"]))
            w = dl[i].mlp.down_proj.weight.detach().double()
            d_bias[i] = (w[:, idx] @ d_mean[i][idx]).float()
    return o_bias, d_bias, {i: {k: sorted(v) for k, v in c.items()} for i, c in removed_cols.items()}


def prune_flap(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: FlapConfig, *,
               stats: dict | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place with FLAP (see the module docstring); returns it and a report.

    ``stats`` (from :func:`collect_moments` on the same dense model) skips the calibration pass
    (screening several ratios from one pass); the report's compute record is that pass's either way.
    """
    timer = Timer()
    before = count_params(model)
    st = structures(model)
    n_layers = len(decoder_layers(model))
    layers = layer_range(n_layers, cfg.layer_start, cfg.layer_end)
    if stats is None:
        stats = collect_moments(model, calib_ids, cfg.batch_size)
    timer.mark("calibration_s")
    cands, o_mean, d_mean, perms = score_groups(model, st, stats, cfg, layers)
    hidden = model.config.hidden_size
    # after = before + (biases of the unpruned widths) - (weights + biases of what is removed): the biases a
    # structure carries count in its marginal parameters, so the whole model lands on the target
    overhead = full_bias_params(st, hidden) if cfg.bias else 0
    groups = _select(st, cands, cfg.ratio * before + overhead, cfg, layers)
    timer.mark("selection_s")
    o_bias, d_bias, removed_cols = compensation(model, groups, o_mean, d_mean)
    model = apply_selection(model, groups)
    if cfg.bias:
        add_biases(model, o_bias, d_bias)
    timer.mark("compaction_s")
    after = count_params(model)
    bias_params = bias_params_for(layer_widths(model), hidden, st.head_dim) if cfg.bias else 0
    report = {
        "method": f"FLAP ({cfg.metric}, {cfg.structure}, attention score {cfg.attention_score}, "
                  f"bias compensation {'on' if cfg.bias else 'off'})",
        "config": asdict(cfg),
        "params": params_record(before, after, cfg.ratio, {"bias_params": bias_params}),
        "removed_groups": by_layer(groups),
        "removed_ids": sorted(g.id for g in groups),
        "widths": layer_widths(model),
        "head_permutations": {str(k): v for k, v in perms.items()},
        "removed_columns": {str(k): v for k, v in removed_cols.items()},
        "calibration": compute_record(calib_ids, forward_seqs=int(calib_ids.shape[0]), backward_seqs=0,
                                      params=before, note="one forward pass of the dense model, no gradient"),
        "timings": {k: round(v, 3) for k, v in timer.marks.items()},
        "wall_time_s": timer.total,
    }
    logger.info("FLAP removed %d of %d parameters (%.2f%%)", before - after, before, 100 * (before - after) / before)
    return model, report


def calibration_ids(tokenizer: Any, cfg: FlapConfig) -> torch.Tensor:
    return _calibration_ids(tokenizer, cfg.data, cfg.seq_len, cfg.calib_sequences, cfg.seed)


def run(model_name: str, out: str | Path, cfg: FlapConfig) -> dict[str, Any]:
    import lorashear

    t0 = time.perf_counter()
    model = lorashear.load_model(model_name)
    tokenizer = lorashear.load_tokenizer(model_name)
    model, report = prune_flap(model, calibration_ids(tokenizer, cfg), cfg)
    report["model"] = model_name
    report["total_wall_time_s"] = time.perf_counter() - t0
    save_run(model, tokenizer, str(out), report, REPORT_FILE)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(__doc__.split("\n\n")[0], FlapConfig, run, argv, "FLAP")


if __name__ == "__main__":
    sys.exit(main())
