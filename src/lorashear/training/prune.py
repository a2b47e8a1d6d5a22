"""The ``prune`` stage: LoRA + LHSPG on packed data, then compaction and export.

Recipe (each step is a reusable component)::

    model = load_model(name); model = get_peft_model(model, LoraConfig(...))
    graph = discover(model)                         # groups named on the peft model
    excluded = knowledge.unprunable_group_ids(graph) (+ --unprunable)
    plan = plan_targets(candidates, ratio=...)      # parameter ratio -> group counts
    train_lhspg(model, graph.groups, plan, packed)  # masked model: K groups exactly 0
    small = compact(model, committed, merge_lora=True); save_pretrained(small, out)

``--out`` then holds the model (safetensors + config + tokenizer),
``prune_report.json`` and ``prune.png``; checkpoints live in ``out/checkpoints``
while the run is going (removed at the end unless ``--keep-run-checkpoints``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_json
from ..config import to_json_dict
from ..errors import ConfigError
from ..graph.groups import StructureGraph
from ..lhspg.optimizer import LHSPGConfig
from ..lhspg.schedule import PruningSchedule
from ..lhspg.tables import is_lora_name
from ..lhspg.targets import TargetConfig, plan_targets
from .loop import TrainConfig, checkpoint_root, make_accelerator, train_lhspg
from .report import kept_per_layer, plot_prune

logger = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"
PLOT_FILE = "prune.png"
DEFAULT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class PruneConfig:
    """Inputs, outputs, LoRA and LHSPG settings of ``lorashear prune``."""

    model: str = field(default="", metadata={"help": "model name, hub id or directory", "cli": False})
    out: str = field(default="", metadata={"help": "output directory (model, prune_report.json, prune.png)",
                                           "cli": False})
    data: str = field(default="builtin:calibration", metadata={"help": "training text (a lorashear data spec)"})
    knowledge: str | None = field(default=None, metadata={
        "help": "knowledge.json from `lorashear analyze`: its unprunable blocks are never pruned"})
    unprunable: tuple[str, ...] = field(default=(), metadata={
        "help": "extra unprunable blocks as LAYER:BLOCK, BLOCK in attention|mlp (e.g. 0:attention,29:mlp)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    num_sequences: int | None = field(default=None, metadata={"help": "packed sequences to use (default: all)"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the base model"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale s = alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_targets: tuple[str, ...] = field(default=DEFAULT_LORA_TARGETS, metadata={
        "help": "module names that get LoRA"})
    num_periods: int = field(default=10, metadata={"help": "pruning periods P"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "LHSPG warm-up steps T_w (default: 10%% of --steps)"})
    period_steps: int | None = field(default=None, metadata={
        "help": "steps per period T_p (default: pruning ends at about 70%% of --steps)"})
    epsilon: float = field(default=0.0, metadata={"help": "half-space projection epsilon"})
    saliency_weights: tuple[float, ...] = field(default=(1.0, 1.0, 1.0, 1.0, 1.0), metadata={
        "help": "weights of magnitude, avg_magnitude, cosine, taylor_first, taylor_second"})
    merge_at_period_end: bool = field(default=True, metadata={
        "help": "merge LoRA into the base weights at each period's end"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in OUT/checkpoints"})
    keep_run_checkpoints: bool = field(default=False, metadata={"help": "keep OUT/checkpoints after success"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out text for perplexity before/after (e.g. builtin:heldout); off when unset"})
    eval_windows: int = field(default=32, metadata={"help": "perplexity windows of --seq-len tokens"})
    verify: bool = field(default=True, metadata={
        "help": "check the selected groups are exactly zero and compacted logits equal the masked model's"})

    def __post_init__(self) -> None:
        self.unprunable = tuple(self.unprunable)
        self.lora_targets = tuple(self.lora_targets)
        self.saliency_weights = tuple(float(w) for w in self.saliency_weights)
        for name in ("seq_len", "lora_r", "lora_alpha", "num_periods", "eval_windows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        parse_unprunable(self.unprunable)

    def lhspg_config(self, steps: int) -> LHSPGConfig:
        auto = PruningSchedule.for_budget(steps, self.num_periods)
        return LHSPGConfig(
            warmup_steps=auto.warmup_steps if self.warmup_steps is None else self.warmup_steps,
            num_periods=self.num_periods,
            period_steps=auto.period_steps if self.period_steps is None else self.period_steps,
            epsilon=self.epsilon, saliency_weights=self.saliency_weights,
            merge_at_period_end=self.merge_at_period_end)


def parse_unprunable(items: tuple[str, ...]) -> set[tuple[int, str]]:
    out = set()
    for item in items:
        try:
            layer, block = item.split(":")
            out.add((int(layer), block.strip()))
        except ValueError as exc:
            raise ConfigError(f"--unprunable expects LAYER:BLOCK (e.g. 0:attention), got {item!r}") from exc
        if block.strip() not in ("attention", "mlp"):
            raise ConfigError(f"--unprunable block must be attention or mlp, got {block!r}")
    return out


BLOCK_OF_KIND = {"attention_head": "attention", "kv_group": "attention", "mlp_channel": "mlp"}


def unprunable_ids(graph: StructureGraph, knowledge: str | None, explicit: tuple[str, ...]) -> tuple[set[int], list]:
    """Group ids never to prune, and the blocks they come from (for the report)."""
    blocks = parse_unprunable(explicit)
    ids: set[int] = set()
    if knowledge:
        try:
            from ..knowledge import load_knowledge
        except ImportError:  # pragma: no cover - the module ships with lorashear
            load_knowledge = None
        if load_knowledge is not None:
            result = load_knowledge(knowledge)
            ids |= result.unprunable_group_ids(graph)
            blocks |= {(n.layer, n.block) for n in result.unprunable_node_groups()}
        else:  # pragma: no cover
            data = json.loads(Path(knowledge).read_text())
            for n in data.get("node_groups", []):
                if n.get("unprunable"):
                    blocks.add((int(n["layer"]), str(n.get("block", n.get("kind", "")))))
    ids |= {g.id for g in graph.groups if (g.layer, BLOCK_OF_KIND.get(g.kind)) in blocks}
    return ids, sorted([layer, block] for layer, block in blocks)


def count_params(model: torch.nn.Module, *, lora: bool = False) -> int:
    """Unique parameters (tied weights once), LoRA factors excluded unless ``lora``."""
    seen: set[int] = set()
    total = 0
    for name, p in model.named_parameters():
        if id(p) in seen or (not lora and is_lora_name(name)):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def embedding_params(model: torch.nn.Module) -> int:
    inp = model.get_input_embeddings()
    total = inp.weight.numel() if inp is not None else 0
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and inp is not None and out.weight.data_ptr() != inp.weight.data_ptr():
        total += out.weight.numel()
    return total


def _heldout_perplexity(model, tokenizer, source: str, seq_len: int, windows: int) -> float:
    from ..evaluation.perplexity import load_eval_texts, perplexity, token_stream

    stream = token_stream(load_eval_texts(source), tokenizer, max_tokens=seq_len * windows)
    return perplexity(model, stream, seq_len=seq_len, max_windows=windows, source=source).perplexity


def run_prune(config: PruneConfig, target: TargetConfig, train: TrainConfig, *, model: Any = None,
              tokenizer: Any = None, data: torch.Tensor | None = None, accelerator: Any = None,
              stop_after: int | None = None) -> dict[str, Any] | None:
    """Run the prune stage; returns the report (``None`` when stopped early with ``stop_after``).

    ``model``/``tokenizer``/``data`` may be given directly (tests, notebooks); otherwise
    they are loaded from ``config.model`` and ``config.data``.
    """
    from accelerate.utils import set_seed
    from peft import LoraConfig, get_peft_model

    from ..compaction import compact
    from ..export import save_pretrained
    from ..graph.discover import discover

    if not config.out:
        raise ConfigError("an output directory is required (--out)")
    out = Path(config.out)
    t_start = time.perf_counter()
    accelerator = accelerator or make_accelerator(train.mixed_precision)
    main = accelerator.is_main_process
    if model is None:
        from ..models.loading import load_model

        model = load_model(config.model, dtype=config.dtype)
    if tokenizer is None and config.model and (data is None or config.eval_data):
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.model)
    model.to(accelerator.device)
    params_before = count_params(model)
    emb = embedding_params(model)
    ppl_before = None
    if config.eval_data and main:
        ppl_before = _heldout_perplexity(model, tokenizer, config.eval_data, config.seq_len, config.eval_windows)
        logger.info("held-out perplexity before: %.3f", ppl_before)

    if data is None:
        from ..data import load_texts, pack_texts

        data = pack_texts(load_texts(config.data), tokenizer, config.seq_len, num_sequences=config.num_sequences,
                          seed=train.seed)
    set_seed(train.seed)
    lora_cfg = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora_cfg)
    graph = discover(peft_model, hidden="hidden_channel" in target.kinds)
    excluded, blocks = unprunable_ids(graph, config.knowledge, config.unprunable)
    candidates = [g for g in graph.groups if g.prunable and g.id not in excluded]
    plan = plan_targets(candidates, total_params=params_before, embedding_params=emb, config=target,
                        all_groups=graph.groups)
    lcfg = config.lhspg_config(train.steps)
    logger.info("target: %s groups (expected %.2f%% of %d params); schedule T_w=%d, P=%d, T_p=%d",
                plan.counts, 100 * plan.expected_ratio, params_before, lcfg.warmup_steps, lcfg.num_periods,
                lcfg.period_steps)
    ckpt_dir = checkpoint_root(out)
    result = train_lhspg(peft_model, graph.groups, plan, data, train_config=train, lhspg_config=lcfg,
                         exclude=excluded, checkpoint_dir=ckpt_dir, resume=config.resume, accelerator=accelerator,
                         stop_after=stop_after)
    if result.stopped_early:
        return None
    lh = result.lhspg
    selected = lh.committed_groups
    report: dict[str, Any] | None = None
    if main:
        named = dict(peft_model.named_parameters())
        max_abs_selected = 0.0
        for g in selected:
            for s in g.slices:
                v = named[s.name].detach().index_select(s.dim, s.index_tensor(named[s.name].device))
                max_abs_selected = max(max_abs_selected, float(v.abs().max()) if v.numel() else 0.0)
        probe = data[: min(2, data.shape[0]), : min(64, data.shape[1])].to(accelerator.device)
        masked_logits = None
        if config.verify:
            with torch.no_grad():
                masked_logits = peft_model(input_ids=probe).logits.float().cpu()
        small = compact(peft_model, selected, merge_lora=True)
        small.eval()
        logits_diff = None
        if masked_logits is not None:
            with torch.no_grad():
                logits_diff = float((small(input_ids=probe).logits.float().cpu() - masked_logits).abs().max())
        params_after = count_params(small)
        ppl_after = None
        if config.eval_data:
            ppl_after = _heldout_perplexity(small, tokenizer, config.eval_data, config.seq_len, config.eval_windows)
            logger.info("held-out perplexity after: %.3f", ppl_after)
        removed = params_before - params_after
        tmp = out / ".model.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        out.mkdir(parents=True, exist_ok=True)
        save_pretrained(small, tmp, tokenizer=tokenizer)
        for child in tmp.iterdir():
            os.replace(child, out / child.name)
        shutil.rmtree(tmp, ignore_errors=True)
        kept = kept_per_layer(graph.groups, selected)
        sched = lcfg.schedule
        report = {
            "command": "prune",
            "model": config.model or type(model).__name__,
            "params": {
                "before": params_before, "after": params_after, "removed": removed,
                "ratio_removed": removed / params_before,
                "target_ratio": target.ratio, "target_params": plan.target_params,
                "ratio_error_pp": (100 * (removed / params_before - target.ratio)) if target.ratio is not None
                else None,
                "embedding_params": emb,
                "non_embedding_ratio_removed": removed / max(1, params_before - emb),
            },
            "plan": plan.to_dict(),
            "groups": {
                "candidates": len(lh.candidates), "selected": len(selected),
                "selected_by_kind": {k: sum(1 for g in selected if g.kind == k) for k in plan.counts},
                "unprunable_blocks": blocks, "unprunable_groups": len(excluded),
                "selected_ids": [g.id for g in selected],
                "max_abs_selected": max_abs_selected,
            },
            "kept_per_layer": {k: {str(layer): v for layer, v in d.items()} for k, d in kept.items()},
            "verify": {"compacted_vs_masked_max_abs_logit_diff": logits_diff},
            "perplexity": {"source": config.eval_data, "before": ppl_before, "after": ppl_after,
                           "windows": config.eval_windows, "seq_len": config.seq_len},
            "schedule": {"warmup_steps": sched.warmup_steps, "num_periods": sched.num_periods,
                         "period_steps": sched.period_steps, "prune_end": sched.prune_end,
                         "period_boundaries": [sched.warmup_steps + p * sched.period_steps
                                               for p in range(sched.num_periods + 1)]},
            "periods": lh.history,
            "log": result.log,
            "steps": result.steps_done,
            "tokens_seen": result.tokens_seen,
            "train_wall_time_s": result.wall_time_s,
            "wall_time_s": time.perf_counter() - t_start,
            "resumed_from": result.resumed_from,
            "world_size": accelerator.num_processes,
            "mixed_precision": accelerator.mixed_precision,
            "data": {"spec": config.data, "sequences": int(data.shape[0]), "seq_len": int(data.shape[1])},
            "settings": {"prune": to_json_dict(config), "target": to_json_dict(target),
                         "train": to_json_dict(train), "lhspg": to_json_dict(lcfg)},
        }
        plot_prune(report, out / PLOT_FILE)
        atomic_write_json(out / REPORT_FILE, report)
        if not config.keep_run_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        logger.info("removed %d of %d parameters (%.2f%%) -> %s", removed, params_before,
                    100 * removed / params_before, out)
    accelerator.wait_for_everyone()
    return report
