"""Peer baseline: Minitron-style width pruning (Muralidharan et al., "Compact Language Models via Pruning
and Knowledge Distillation", 2024) with logit-distillation retraining.

Pruning (one forward pass of the dense model, no gradient):

1. **Activation importance** from ``calib_sequences`` calibration sequences (the paper: 1024 samples).
   For every input channel ``c`` of ``o_proj`` (a head's output slice) and of ``down_proj``
   (the MLP intermediate ``act(gate) * up``): per sequence, the mean of ``|x_c|`` over its tokens;
   over sequences, the L2 norm. That is the paper's best aggregation (sequence: mean, batch: L2) and
   what NVIDIA Model Optimizer's Minitron hooks compute. An MLP channel's importance is that
   value; a head's is the L2 norm of its ``head_dim`` channels (Model Optimizer's head score); a
   query-head slot's is the L2 norm of its heads' scores. ``seq_agg``/``batch_agg`` select the
   paper's other aggregations (``mean``, ``l2``, ``sum`` over either axis) for ablations.
2. **GQA**: heads are ranked within their KV group (``align_heads``: slot ``r`` holds every group's
   ``r``-th best head), so every group loses the same number of its own weakest heads, as Model
   Optimizer trims heads per query group. KV groups are kept.
3. **Widths**: ``allocation="global"`` ranks each kind across all layers (query-head slots
   against slots, MLP channels against channels) and removes the lowest until the kind's share of
   the target is met: non-uniform widths. ``allocation="uniform"`` is the paper's target
   architecture: the same width in every layer, ranked within each layer (the default). The
   target's split between attention and MLP: ``attention_share`` of the removed parameters from
   attention (default 0: MLP only, heads kept, as Llama-3.1-Minitron and Mistral-NeMo-Minitron
   keep every attention head), or (``None``) the same fraction of each kind's removable parameters.
   (The paper picks the split by a small search over candidate architectures with short retraining;
   the defaults are the winners of a one-shot screening on validation data,
   ``benchmarks/results/peers_oneshot_smollm2.md``.) Embedding channels and depth are not pruned
   (lorashear does not prune them either).

Retraining (:func:`distill`): logit distillation only, ``KL(teacher || student)`` with weight 1.0 and
no cross-entropy term (the paper's best: distillation loss on logits alone), from the dense model
as the teacher. ``mode="full"`` trains every parameter (as the paper does), ``mode="lora"`` trains
LoRA factors on the family's projections and merges them (the budget-matched comparison with
lorashear's LoRA runs). Both run on lorashear's training loop (:func:`lorashear.training.loop.train`:
it trains whatever requires a gradient, so a plain model with every parameter trainable is full
fine-tuning), AdamW, peak learning rate 1e-4 with a linear warm-up and cosine decay as the Minitron
reports give (Mistral-NeMo-Minitron: peak 1e-4, 60 warm-up steps, cosine to 4.5e-7).

    python benchmarks/peers/minitron.py smollm2-135m-instruct --ratio 0.2 --out runs/minitron20
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
    run_cli,
    save_run,
    select_greedy,
    split_target,
    structures,
    uniform_counts,
)
from lorashear.errors import ConfigError  # noqa: E402

logger = logging.getLogger("benchmarks.peers.minitron")

REPORT_FILE = "minitron_report.json"
AGGS = ("mean", "l2", "sum")


@dataclass
class MinitronConfig:
    """Minitron width-pruning settings. Defaults: the paper's aggregation and its uniform target
    architecture, heads kept (the best of the one-shot screening on validation data,
    ``benchmarks/results/peers_oneshot_smollm2.md``)."""

    ratio: float = field(default=0.2, metadata={"help": "fraction of all parameters to remove (embeddings counted)"})
    allocation: Literal["global", "uniform"] = field(default="uniform", metadata={
        "help": "global: rank each kind across layers (non-uniform widths); uniform: the same width in every "
                "layer (the paper's target architectures), ranked within the layer"})
    attention_share: float | None = field(default=0.0, metadata={
        "help": "share of the removed parameters taken from attention (query-head slots; 0 = MLP only, as "
                "Llama-3.1-Minitron keeps every head); None: the same fraction of each kind's removable parameters"})
    seq_agg: Literal["mean", "l2", "sum"] = field(default="mean", metadata={
        "help": "aggregation of |activation| over a sequence's tokens (the paper's best: mean)"})
    batch_agg: Literal["mean", "l2", "sum"] = field(default="l2", metadata={
        "help": "aggregation over calibration sequences (the paper's best: l2)"})
    align_heads: bool = field(default=True, metadata={
        "help": "rank heads within each KV group (slot r = every group's r-th best head), as Model Optimizer does"})
    min_slots: int = field(default=1, metadata={"help": "query heads per KV group every layer keeps"})
    min_mlp: int = field(default=1, metadata={"help": "MLP channels every layer keeps"})
    layer_start: int = field(default=0, metadata={"help": "first decoder layer pruned"})
    layer_end: int = field(default=0, metadata={"help": "end of the pruned range, exclusive (negative: from the end; "
                                                        "0: all)"})
    data: str = field(default="builtin:calibration", metadata={"help": "calibration text (lorashear data spec)"})
    calib_sequences: int = field(default=1024, metadata={"help": "calibration sequences (the paper: 1024)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per calibration sequence"})
    batch_size: int = field(default=16, metadata={"help": "sequences per forward pass"})
    seed: int = field(default=0, metadata={"help": "packing seed (same as lorashear prune's)"})

    def __post_init__(self) -> None:
        check_common(self)
        if self.allocation not in ("global", "uniform"):
            raise ConfigError(f"allocation must be global or uniform, got {self.allocation!r}")
        for name in ("seq_agg", "batch_agg"):
            if getattr(self, name) not in AGGS:
                raise ConfigError(f"{name} must be one of {', '.join(AGGS)}, got {getattr(self, name)!r}")


# -- importance ------------------------------------------------------------------------------------
class ActivationImportance:
    """Per-channel ``batch_agg`` over sequences of (``seq_agg`` over tokens of ``|x|``)."""

    def __init__(self, channels: int, seq_agg: str = "mean", batch_agg: str = "l2") -> None:
        self.seq_agg, self.batch_agg = seq_agg, batch_agg
        self.acc = torch.zeros(channels, dtype=torch.float64)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        """``x``: ``(batch, seq, channels)``."""
        a = x.detach().double().abs()
        if self.seq_agg == "mean":
            per_seq = a.mean(1)
        elif self.seq_agg == "l2":
            per_seq = a.pow(2).sum(1).sqrt()
        else:
            per_seq = a.sum(1)
        self.acc += per_seq.pow(2).sum(0) if self.batch_agg == "l2" else per_seq.sum(0)
        self.n += per_seq.shape[0]

    @property
    def value(self) -> torch.Tensor:
        if self.batch_agg == "l2":
            return self.acc.sqrt()
        if self.batch_agg == "mean":
            return self.acc / max(1, self.n)
        return self.acc.clone()


@torch.no_grad()
def collect_importance(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, seq_agg: str = "mean",
                       batch_agg: str = "l2") -> dict[int, dict[str, torch.Tensor]]:
    """``{layer: {"o_proj": (heads*head_dim,), "down_proj": (intermediate,)}}`` channel importance."""
    layers = decoder_layers(model)
    acc: dict[int, dict[str, ActivationImportance]] = {}
    handles = []
    for i, layer in enumerate(layers):
        o, d = layer.self_attn.o_proj, layer.mlp.down_proj
        acc[i] = {"o_proj": ActivationImportance(o.in_features, seq_agg, batch_agg),
                  "down_proj": ActivationImportance(d.in_features, seq_agg, batch_agg)}
        for name, mod in (("o_proj", o), ("down_proj", d)):
            handles.append(mod.register_forward_hook(lambda _m, inp, _o, a=acc[i][name]: a.add(inp[0])))
    was = model.training
    model.eval()
    try:
        for batch in ids.split(batch_size):
            model(input_ids=batch, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    return {i: {k: v.value for k, v in d.items()} for i, d in acc.items()}


def head_importance(channel_importance: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head's importance: the L2 norm of its channels' importance."""
    return channel_importance.view(-1, head_dim).norm(dim=1)


# -- the method ------------------------------------------------------------------------------------
def score_groups(model: torch.nn.Module, st, imp, cfg: MinitronConfig, layers: list[int]) -> tuple[
        list[tuple[Any, float]], dict[int, list[int]]]:
    """``(group, importance)`` for every candidate (the lowest removed first) and the head permutations."""
    hd = st.head_dim
    h_imp = {i: head_importance(imp[i]["o_proj"], hd) for i in layers}
    perms = align_heads(model, st, h_imp) if cfg.align_heads else {}
    for i, perm in perms.items():
        h_imp[i] = h_imp[i][torch.tensor(perm)]
    cands = []
    for i in layers:
        ls = st.layers[i]
        for g, heads in zip(ls.slots, ls.slot_heads):
            cands.append((g, float(h_imp[i][heads].norm())))
        m = imp[i]["down_proj"]
        for g in ls.mlp:
            cands.append((g, float(m[g.index])))
    return cands, perms


def select(st, cands, target: float, cfg: MinitronConfig, layers: list[int]) -> list[Any]:
    mins = MinWidths(cfg.min_slots, 1, cfg.min_mlp)
    if cfg.allocation == "uniform":
        h, c = uniform_counts(st, layers, target, mins, cfg.attention_share)
        taken = []
        for i in layers:
            mine = sorted([(g, k) for g, k in cands if g.layer == i], key=lambda t: t[1])
            taken += [g for g, _ in mine if g.kind == "attention_head"][:h]
            taken += [g for g, _ in mine if g.kind == "mlp_channel"][:c]
        return taken
    want = split_target(st, layers, target, cfg.attention_share, mins)
    state = LayerState(st, mins)
    att, removed = select_greedy([c for c in cands if c[0].kind == "attention_head"], want["attention_head"], state)
    mlp, _ = select_greedy([c for c in cands if c[0].kind == "mlp_channel"], target - removed, state)
    return att + mlp


def prune_minitron(model: torch.nn.Module, calib_ids: torch.Tensor, cfg: MinitronConfig, *,
                   importance: dict | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Prune ``model`` in place (see the module docstring); returns it and a report.

    ``importance`` (from :func:`collect_importance` on the same dense model) skips the calibration pass.
    """
    timer = Timer()
    before = count_params(model)
    st = structures(model)
    layers = layer_range(len(decoder_layers(model)), cfg.layer_start, cfg.layer_end)
    if importance is None:
        importance = collect_importance(model, calib_ids, cfg.batch_size, cfg.seq_agg, cfg.batch_agg)
    timer.mark("calibration_s")
    cands, perms = score_groups(model, st, importance, cfg, layers)
    groups = select(st, cands, cfg.ratio * before, cfg, layers)
    timer.mark("selection_s")
    model = apply_selection(model, groups)
    timer.mark("compaction_s")
    after = count_params(model)
    report = {
        "method": f"Minitron width pruning (activation importance, seq {cfg.seq_agg} / batch {cfg.batch_agg}, "
                  f"{cfg.allocation} allocation)",
        "config": asdict(cfg),
        "params": params_record(before, after, cfg.ratio),
        "removed_groups": by_layer(groups),
        "removed_ids": sorted(g.id for g in groups),
        "widths": layer_widths(model),
        "head_permutations": {str(k): v for k, v in perms.items()},
        "calibration": compute_record(calib_ids, forward_seqs=int(calib_ids.shape[0]), backward_seqs=0,
                                      params=before, note="one forward pass of the dense model, no gradient"),
        "timings": {k: round(v, 3) for k, v in timer.marks.items()},
        "wall_time_s": timer.total,
    }
    logger.info("Minitron removed %d of %d parameters (%.2f%%)", before - after, before,
                100 * (before - after) / before)
    return model, report


# -- retraining: logit distillation ----------------------------------------------------------------
@dataclass
class DistillTrainConfig:
    """Minitron's retraining: KL to the dense teacher's logits only."""

    mode: Literal["full", "lora"] = field(default="full", metadata={
        "help": "full: train every parameter (the paper); lora: LoRA factors on the projections, merged after"})
    steps: int = field(default=400, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=2, metadata={"help": "sequences per step"})
    seq_len: int = field(default=256, metadata={"help": "tokens per sequence"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (default: 1e-4 full, the Minitron reports' peak; 2e-4 LoRA, lorashear's)"})
    lr_scheduler: Literal["constant", "linear", "cosine"] = field(default="cosine", metadata={
        "help": "schedule after the warm-up (Minitron: cosine decay)"})
    warmup_steps: int = field(default=10, metadata={
        "help": "linear warm-up steps (Minitron: 60 of a far longer run; 10 here for a few hundred steps)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of teacher and student"})
    kl_weight: float = field(default=1.0, metadata={"help": "share of the KL term; 1.0 = logit distillation only"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (mode lora)"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (mode lora)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (mode lora)"})
    seed: int = field(default=0, metadata={"help": "data order and LoRA initialisation"})
    log_every: int = field(default=10, metadata={"help": "record the loss every N steps"})

    def __post_init__(self) -> None:
        if self.mode not in ("full", "lora"):
            raise ConfigError(f"mode must be full or lora, got {self.mode!r}")
        for name in ("steps", "batch_size", "seq_len", "log_every", "lora_r"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if not 0.0 < self.kl_weight <= 1.0:
            raise ConfigError(f"kl_weight must be in (0, 1], got {self.kl_weight}")
        if self.warmup_steps < 0 or self.weight_decay < 0:
            raise ConfigError("warmup_steps and weight_decay must be >= 0")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-4 if self.mode == "full" else 2e-4)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor,
            cfg: DistillTrainConfig | None = None) -> dict[str, Any]:
    """Retrain the pruned ``student`` on packed ``ids`` (``(N, seq_len)``) by logit distillation from
    ``teacher`` (the dense model; frozen here). Returns ``{"model", "losses", "record"}``; the record
    holds the token-passes for the compute column (student forward+backward at its own width,
    teacher forward at the dense width)."""
    from lorashear.training.loop import TrainConfig, train
    from lorashear.training.losses import DistillConfig, distillation_loss, freeze

    cfg = cfg or DistillTrainConfig()
    if ids.dim() != 2 or ids.shape[1] != cfg.seq_len:
        raise ConfigError(f"ids must be (N, {cfg.seq_len}), got {tuple(ids.shape)}")
    freeze(teacher)
    loss_fn = distillation_loss(teacher, DistillConfig(weight=cfg.kl_weight, temperature=cfg.temperature))
    tcfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.learning_rate,
                       weight_decay=cfg.weight_decay, lr_scheduler=cfg.lr_scheduler,
                       lr_warmup_steps=cfg.warmup_steps, seed=cfg.seed, progress=False, log_every=cfg.log_every)
    t0 = time.perf_counter()
    student_params = count_params(student)
    if cfg.mode == "full":
        was = {id(p): p.requires_grad for p in student.parameters()}
        for p in student.parameters():
            p.requires_grad_(True)
        result = train(student, ids, config=tcfg, loss_fn=loss_fn, desc="minitron distill")
        for p in student.parameters():
            p.requires_grad_(was.get(id(p), True))
        model, losses, tokens, trainable = student, result.losses, result.tokens_seen, student_params
    else:
        from lorashear.config import config_from_dict
        from lorashear.recovery import FinetuneConfig, finetune

        fcfg = config_from_dict(FinetuneConfig, {
            "steps": cfg.steps, "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "seed": cfg.seed,
            "lr": cfg.learning_rate, "lr_scheduler": cfg.lr_scheduler, "lr_warmup_steps": cfg.warmup_steps,
            "weight_decay": cfg.weight_decay, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "lora_dropout": cfg.lora_dropout, "progress": False, "log_every": cfg.log_every})
        res = finetune(student, None, ids, fcfg, loss_fn=loss_fn)
        model, losses, tokens, trainable = res.model, res.losses, res.tokens_seen, res.trainable_params
    record = {"mode": cfg.mode, "config": asdict(cfg), "steps": cfg.steps, "tokens": tokens,
              "student_forward_token_passes": tokens, "student_backward_token_passes": tokens,
              "teacher_forward_token_passes": tokens, "student_params": student_params,
              "teacher_params": count_params(teacher), "trainable_params": trainable,
              "flops_estimate": float(6 * student_params * tokens + 2 * count_params(teacher) * tokens),
              "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
              "wall_time_s": time.perf_counter() - t0}
    return {"model": model, "losses": losses, "record": record}


def calibration_ids(tokenizer: Any, cfg: MinitronConfig) -> torch.Tensor:
    return _calibration_ids(tokenizer, cfg.data, cfg.seq_len, cfg.calib_sequences, cfg.seed)


def run(model_name: str, out: str | Path, cfg: MinitronConfig) -> dict[str, Any]:
    import lorashear

    t0 = time.perf_counter()
    model = lorashear.load_model(model_name)
    tokenizer = lorashear.load_tokenizer(model_name)
    model, report = prune_minitron(model, calibration_ids(tokenizer, cfg), cfg)
    report["model"] = model_name
    report["total_wall_time_s"] = time.perf_counter() - t0
    save_run(model, tokenizer, str(out), report, REPORT_FILE)
    return report


def main(argv: list[str] | None = None) -> int:
    return run_cli(__doc__.split("\n\n")[0], MinitronConfig, run, argv, "Minitron")


if __name__ == "__main__":
    sys.exit(main())
