"""The prune stage: LoRA + LHSPG on packed data, then compaction and a saved, smaller model.

Recipe (each step a component)::

    model = load_model(config.model); peft = attach_lora(model, config.lora)
    graph = discover(peft)                          # groups named on the peft model
    excluded = protected groups (knowledge.json, --unprunable)
    plan = plan_targets(candidates, config.target)  # parameter ratio -> group counts
    train_lhspg(peft, graph.groups, plan, data)     # masked model: K groups exactly 0
    small = compact(peft, committed, merge_lora=True); save_pretrained(small, out)

``config.out`` then holds the model (safetensors + config + tokenizer),
``prune_report.json`` (everything measured), ``prune_result.json`` (the
:class:`PruneResult` summary) and ``prune.png``; checkpoints live in
``out/checkpoints`` while the run is going (removed at the end unless
``keep_run_checkpoints``). ``--out`` is checked before any work and locked for the
run; the result is written complete into a temporary sibling directory that
then replaces ``out`` as a whole (:func:`lorashear.atomic.atomic_directory`).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from ..atomic import atomic_directory, atomic_write_json, output_lock, validate_out
from ..config import section, to_json_dict
from ..data.config import DataConfig
from ..compute import Compute, forward_flops_per_token
from ..errors import ConfigError, CorruptCheckpointError
from ..graph.groups import StructureGraph
from ..lhspg.optimizer import LHSPGConfig
from ..lhspg.targets import TargetConfig, plan_targets
from ..models.adapters import BLOCK_OF_KIND
from ..models.lora import LoraSettings, attach_lora
from ..models.params import count_params, embedding_params
from ..recipes import DEFAULT_RECIPE, RECIPES
from ..recovery.rounds import RoundsConfig, train_rounds
from ..training.hooks import KLShareSwitch, LossPartsLog, share_at
from ..training.checkpoint import latest_checkpoint
from ..lhspg.train import train_lhspg
from ..training.loop import StepHook, TrainConfig, checkpoint_root, make_accelerator
from ..training.loop import train as train_loop
from ..training.losses import DistillConfig, KLShare, LossParts, distillation_loss, lm_loss, make_teacher
from ..training.report import kept_per_layer, plot_prune

logger = logging.getLogger(__name__)

REPORT_FILE = "prune_report.json"
RESULT_FILE = "prune_result.json"
PLOT_FILE = "prune.png"


@dataclass
class PruneConfig:
    """Everything ``lorashear prune`` needs: inputs, outputs, and its components' settings."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    model: str = field(default="", metadata={"help": "model name, hub id or directory", "cli": False})
    out: str = field(default="", metadata={"help": "output directory (model, prune_report.json, prune.png)",
                                           "cli": False})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": f"preset of defaults for every option not given: {', '.join(RECIPES)} (see lorashear.recipes)"})
    data: DataConfig = section(DataConfig, help="training text")
    knowledge: str | None = field(default=None, metadata={
        "help": "knowledge.json from `lorashear analyze`: its unprunable blocks are never pruned"})
    unprunable: tuple[str, ...] = field(default=(), metadata={
        "help": "extra unprunable blocks as LAYER:BLOCK, BLOCK in attention|mlp (e.g. 0:attention,29:mlp)"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the base model"})
    lora: LoraSettings = section(LoraSettings, prefix="lora_", help="LoRA factors")
    target: TargetConfig = section(TargetConfig, help="how much to remove")
    lhspg: LHSPGConfig = section(LHSPGConfig, help="LHSPG schedule and saliency")
    train: TrainConfig = section(TrainConfig, help="training loop")
    distill: DistillConfig = section(DistillConfig, prefix="distill_", help="distillation from the dense model")
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in OUT/checkpoints"})
    force: bool = field(default=False, metadata={
        "help": "start over: delete OUT/checkpoints of an earlier run instead of refusing"})
    keep_run_checkpoints: bool = field(default=False, metadata={"help": "keep OUT/checkpoints after success"})
    eval_data: str | None = field(default=None, metadata={
        "help": "held-out text for perplexity before/after (e.g. builtin:heldout-validation); off when unset"})
    eval_windows: int = field(default=32, metadata={"help": "perplexity windows of --seq-len tokens"})
    verify: bool = field(default=True, metadata={
        "help": "check the selected groups are exactly zero and compacted logits equal the masked model's"})
    compact_at: Literal["period_end", "prune_end", "end"] = field(default="period_end", metadata={
        "help": "when the zeroed structures are cut out: period_end (the default since 2026-12-06) = each pruning "
                "period's once the cut pays (--compact-min-gain), so the later steps train a smaller model; "
                "prune_end = all of them when the last pruning period ends (LoRA factors and optimizer state "
                "sliced alike; both single process, several processes compact after the last step); end = after "
                "the last step (the masked model trains at full width throughout)"})
    compact_min_gain: float = field(default=0.5, metadata={
        "help": "--compact-at period_end: a period's structures are cut out only when what they would still cost "
                "until pruning ends is worth this many training steps (their share of the model's forward FLOPs "
                "x the pruning steps left; a cut costs about 0.5 s against 1.6-2 s a pruning step of the "
                "reference model at two CPU threads); otherwise they wait, exactly zero, for a later cut. The last "
                "period always cuts. 0: cut at every period end"})
    post_pruning: Literal["continue", "recover", "full"] = field(default="continue", metadata={
        "help": "what the compacted model trains on for the rest of the budget: continue = the same training "
                "stream (LoRA); recover = the dynamic mix of paper Alg. 5 over --post-sources, its weights measured "
                "on their validation split every round; full = the same stream with every weight trained (LoRA "
                "merged first; rate --post-lr; the loss as --distill-after-pruning sets it). recover and full need "
                "--compact-at prune_end or period_end"})
    post_lr: float = field(default=1e-4, metadata={
        "help": "learning rate of --post-pruning full (every weight; Minitron retrains at 1e-4)"})
    post: RoundsConfig = section(RoundsConfig, prefix="post_", help="the dynamic mix after pruning")

    def __post_init__(self) -> None:
        self.unprunable = tuple(self.unprunable)
        if self.eval_windows < 1:
            raise ConfigError(f"eval_windows must be >= 1, got {self.eval_windows}")
        parse_unprunable(self.unprunable)
        if self.post_pruning != "continue" and self.compact_at == "end":
            raise ConfigError(f"--post-pruning {self.post_pruning} trains the compacted model: it needs "
                              "--compact-at prune_end or period_end")
        if self.compact_min_gain < 0:
            raise ConfigError(f"compact_min_gain must be >= 0, got {self.compact_min_gain}")
        if not self.post_lr > 0:
            raise ConfigError(f"post_lr must be > 0, got {self.post_lr}")
        if self.target.knowledge_grading and not (self.knowledge and self.target.uniform_per_layer):
            raise ConfigError("--knowledge-grading needs --knowledge FILE and --uniform-per-layer "
                              "(it grades the per-layer counts by the knowledge analysis)")


@dataclass
class PruneResult:
    """What the prune stage produced (saved as ``prune_result.json``; the full record is ``report``)."""

    out: str
    params_before: int
    params_after: int
    ratio_removed: float
    non_embedding_ratio_removed: float
    target_ratio: float | None
    perplexity_before: float | None
    perplexity_after: float | None
    steps: int
    tokens_seen: int
    wall_time_s: float
    report: dict[str, Any] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("report")
        return out


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


def unprunable_ids(graph: StructureGraph, knowledge: str | None, explicit: tuple[str, ...]) -> tuple[set[int], list]:
    """Group ids never to prune, and the blocks they come from (for the report)."""
    from ..knowledge.result import load_knowledge

    blocks = parse_unprunable(explicit)
    ids: set[int] = set()
    if knowledge:
        result = load_knowledge(knowledge)
        ids |= result.unprunable_group_ids(graph)
        blocks |= {(n.layer, n.block) for n in result.unprunable_node_groups()}
    ids |= {g.id for g in graph.groups if (g.layer, BLOCK_OF_KIND.get(g.kind)) in blocks}
    return ids, sorted([layer, block] for layer, block in blocks)


#: options that do not change what a prune run computes (they may differ between a run and its resume)
NON_DEFINING = {"out", "resume", "force", "keep_run_checkpoints", "eval_data", "eval_windows", "verify", "progress",
                "checkpoint_every", "keep_checkpoints", "log_every", "lorashear_version"}


def run_settings(config: PruneConfig, data: torch.Tensor) -> dict[str, Any]:
    """The settings that define a prune run (a resume must match them), with the training data's shape."""
    from ..config import to_flat_dict

    settings = {k: v for k, v in to_flat_dict(config).items() if k not in NON_DEFINING}
    if config.model:  # by content: the same directory named another way resumes, other weights there do not
        from ..models.identity import model_identity

        settings["model"] = model_identity(config.model)
    settings["data_shape"] = list(data.shape)
    settings["data_checksum"] = int(data[:, :8].long().sum()) if data.numel() else 0
    return settings


def max_removable(candidates: list, all_groups: list, target: TargetConfig) -> float:
    """Most parameters the target's group kinds can remove: every layer keeps at least one structure
    of each kind, ``round_to`` channels (the rule :func:`~lorashear.lhspg.plan_targets` applies)."""
    from collections import Counter

    from ..lhspg.targets import effective_round_to, min_kept

    round_to = effective_round_to(target, all_groups)
    total = 0.0
    for kind in target.kinds:
        mine = [g for g in candidates if g.kind == kind and g.prunable]
        if not mine:
            continue
        keep = min_kept(kind, round_to)
        size = sum(g.base_params for g in mine) / len(mine)
        widths = Counter(g.layer for g in all_groups if g.kind == kind and g.layer is not None)
        per = Counter(g.layer for g in mine)
        count = sum(n if layer is None else min(n, max(0, widths.get(layer, n) - keep)) for layer, n in per.items())
        total += count * size
    return total


def check_hidden_width(config: PruneConfig, model_config: Any) -> int:
    """The multiple the kept hidden size must keep for ``model_config``'s class to accept it (1 when hidden
    channels are not pruned); refuses hidden-channel pruning where the config accepts no other hidden size."""
    if "hidden_channel" not in config.target.kinds:
        return 1
    from ..models.widths import hidden_size_multiple

    multiple = hidden_size_multiple(model_config)
    if multiple == 0:
        raise ConfigError(f"the {model_config.model_type} config accepts no other hidden size, so the pruned "
                          f"model could not be saved; drop hidden_channel from --kinds")
    return multiple


def check_reachable(candidates: list, all_groups: list, target: TargetConfig, total_params: int) -> None:
    """Refuse a target the structure cannot reach, with one line stating the most it can: ``--attention-ratio``
    and ``--mlp-ratio`` (a fraction of their cluster's prunable parameters), then ``--ratio`` (of the model)."""
    import dataclasses

    from ..lhspg.targets import CLUSTER_OF_KIND

    pool = {k: sum(g.base_params for g in candidates if g.kind == k and g.prunable) for k in target.kinds}
    most_of = {k: max_removable(candidates, all_groups, dataclasses.replace(target, kinds=(k,))) for k in pool}
    keeps = "every layer keeps at least one structure of each kind; unprunable blocks stay"
    for cluster in ("attention", "mlp"):
        ratio = target.cluster_ratio(cluster)
        kinds = [k for k in pool if CLUSTER_OF_KIND[k] == cluster and pool[k]]
        if ratio is None or not kinds:
            continue
        most = min(most_of[k] / pool[k] for k in kinds)
        if ratio > most + 0.005:
            raise ConfigError(f"{cluster} ratio {ratio:g} is unreachable: at most {most:.4f} of the {cluster} "
                              f"structures' parameters can be removed ({keeps}); choose --{cluster}-ratio "
                              f"{math.floor(most * 1000) / 1000:g} or less")
    if target.ratio is None:
        return
    fixed = {k: target.cluster_ratio(CLUSTER_OF_KIND[k]) for k in pool}
    removable = sum(most_of[k] if fixed[k] is None else min(fixed[k] * pool[k], most_of[k]) for k in pool)
    most = removable / total_params
    if target.ratio > most + 0.005:
        raise ConfigError(f"ratio {target.ratio:g} is unreachable: at most {most:.4f} of this model's parameters can "
                          f"be removed ({keeps}); choose --ratio {math.floor(most * 1000) / 1000:g} or less")


def heldout_perplexity(model, tokenizer, source: str, seq_len: int, windows: int) -> float:
    from ..evaluation.perplexity import load_eval_texts, perplexity, token_stream

    stream = token_stream(load_eval_texts(source), tokenizer)
    return perplexity(model, stream, seq_len=seq_len, max_windows=windows, source=source).perplexity


#: files that mark a directory as a prune stage's output (it may then be replaced)
OWNER_FILES = (REPORT_FILE, RESULT_FILE)


def check_config(config: PruneConfig) -> None:
    """What can be checked before any work: the LHSPG schedule fits the step budget."""
    lcfg = config.lhspg.resolve(config.train.steps)
    if lcfg.schedule.prune_end > config.train.steps:
        raise ConfigError(f"pruning ends at step {lcfg.schedule.prune_end} but only {config.train.steps} steps are "
                          "planned; raise --steps or lower --warmup-steps/--period-steps/--num-periods")


def run(config: PruneConfig, *, model: Any = None, tokenizer: Any = None, data: torch.Tensor | None = None,
        accelerator: Any = None, stop_after: int | None = None) -> PruneResult | None:
    """Run the prune stage; returns its result (``None`` when stopped early with ``stop_after``).

    ``model``/``tokenizer``/``data`` may be given directly (tests, notebooks); otherwise
    they are loaded from ``config.model`` and ``config.data``. ``config.out`` is checked
    and locked before anything is loaded.
    """
    out = validate_out(config.out, owner_files=OWNER_FILES)
    check_config(config)
    if model is None and not config.model:
        raise ConfigError("name the model to prune (MODEL, or `model:` in --config)")
    if model is None:
        from ..models.loading import check_causal_lm

        check_causal_lm(config.model)
    accelerator = accelerator or make_accelerator(config.train.mixed_precision)
    with output_lock(out, enabled=accelerator.is_main_process):
        return _run(config, out, model=model, tokenizer=tokenizer, data=data, accelerator=accelerator,
                    stop_after=stop_after)


@dataclass
class _Setup:
    """Everything the training needs, resolved before the first step: the model with LoRA, its data, the
    structure graph, what must never be pruned and the target plan."""

    model: torch.nn.Module  #: the dense model (LoRA attached in place: the same object as ``peft_model``'s base)
    tokenizer: Any
    data: torch.Tensor
    peft_model: torch.nn.Module
    graph: Any
    excluded: set[int]
    blocks: Any
    plan: Any
    lcfg: Any  #: the LHSPG config resolved for the step count
    params_before: int
    embedding: int
    ppl_before: float | None
    dense_flops: float
    teacher: Any  #: the frozen dense copy (``None`` without distillation); the training takes it
    sources: list[Any]  #: recovery sources (post_pruning=recover)
    dense_losses: dict[str, float]
    chat_tokens: int = 0  #: tokens of the self-distilled conversations (the dense model's passes over them)


def _with_self_chat(config: PruneConfig, model: Any, tokenizer: Any, data: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``data`` with ``--chat-share`` of its rows replaced by the dense model's own chat replies, packed
    (self-data distillation; cached by the model's content), and the tokens of those conversations."""
    from ..data import pack_texts
    from ..data.self_distill import mix_in, self_chat_prompts, self_distilled_texts
    from ..models.identity import model_identity

    d = config.data
    prompts = self_chat_prompts(d.chat_prompts)  # one prompt set for every seed: generated once, then cached
    texts = self_distilled_texts(model, tokenizer, prompts, max_new_tokens=d.chat_max_new_tokens,
                                 model_id=model_identity(config.model) if config.model else None)
    chat = pack_texts(texts, tokenizer, data.shape[1], seed=config.train.seed)
    mixed = mix_in(data, chat, d.chat_share)
    logger.info("self-distilled chat: %d conversations -> %d sequences, %.0f%% of the %d training rows",
                len(texts), chat.shape[0], 100 * d.chat_share, data.shape[0])
    return mixed, sum(len(tokenizer(t)["input_ids"]) for t in texts)


def _setup(config: PruneConfig, accelerator: Any, *, model: Any, tokenizer: Any,
           data: torch.Tensor | None) -> _Setup:
    """Load the model (tokenizer first: a missing one fails fast), measure it, pack the data, attach LoRA,
    discover the graph and plan the targets."""
    from accelerate.utils import set_seed

    from ..graph.discover import discover

    train = config.train
    seq_len = config.data.seq_len
    recovers = config.post_pruning == "recover"
    if tokenizer is None and config.model and (data is None or config.eval_data or recovers):
        from ..models.loading import load_tokenizer

        tokenizer = load_tokenizer(config.model)  # before the weights: a missing tokenizer fails fast
    if model is None:
        from ..models.loading import load_model

        model = load_model(config.model, dtype=config.dtype)
    if tokenizer is not None:
        from ..models.loading import check_tokenizer_fits

        check_tokenizer_fits(model, tokenizer, config.model)
    model.to(accelerator.device)
    hidden_multiple = check_hidden_width(config, model.config)  # before any data or teacher work
    params_before = count_params(model)
    emb = embedding_params(model)
    ppl_before = None
    if config.eval_data and accelerator.is_main_process:
        ppl_before = heldout_perplexity(model, tokenizer, config.eval_data, seq_len, config.eval_windows)
        logger.info("held-out perplexity before: %.3f", ppl_before)

    teacher = make_teacher(model, config.distill.teacher_dtype) if config.distill.enabled else None
    chat_tokens = 0
    if data is None:
        from ..data import load_texts, pack_texts

        data = pack_texts(load_texts(config.data.spec), tokenizer, seq_len,
                          num_sequences=config.data.num_sequences, seed=train.seed)
        if config.data.chat_share > 0:
            data, chat_tokens = _with_self_chat(config, model, tokenizer, data)
    sources, dense_losses = _round_sources(config, model, tokenizer, data) if recovers else ([], {})
    set_seed(train.seed)
    dense_flops = forward_flops_per_token(model, data.shape[1])
    peft_model = attach_lora(model, config.lora)
    graph = discover(peft_model, hidden="hidden_channel" in config.target.kinds)
    excluded, blocks = unprunable_ids(graph, config.knowledge, config.unprunable)
    candidates = [g for g in graph.groups if g.prunable and g.id not in excluded]
    check_reachable(candidates, graph.groups, config.target, params_before)
    weights = None
    if config.target.knowledge_grading:
        from ..knowledge.result import load_knowledge

        weights = load_knowledge(config.knowledge).layer_weights(config.target.knowledge_grading)
    try:
        plan = plan_targets(candidates, total_params=params_before, embedding_params=emb, config=config.target,
                            all_groups=graph.groups, layer_weights=weights, hidden_multiple=hidden_multiple)
    except ConfigError as exc:
        if "unreachable" in str(exc):
            raise ConfigError(f"{exc}; choose a smaller --ratio") from exc
        raise
    lcfg = config.lhspg.resolve(train.steps)
    logger.info("target: %s groups (expected %.2f%% of %d params); schedule T_w=%d, P=%d, T_p=%d",
                plan.counts, 100 * plan.expected_ratio, params_before, lcfg.warmup_steps, lcfg.num_periods,
                lcfg.period_steps)
    return _Setup(model=model, tokenizer=tokenizer, data=data, peft_model=peft_model, graph=graph, excluded=excluded,
                  blocks=blocks, plan=plan, lcfg=lcfg, params_before=params_before, embedding=emb,
                  ppl_before=ppl_before, dense_flops=dense_flops, teacher=teacher, sources=sources,
                  dense_losses=dense_losses, chat_tokens=chat_tokens)


@dataclass
class _Trained:
    """What the training phases left: the pruning outcome and the counters of the whole budget."""

    outcome: PruningOutcome
    mid: bool  #: compacted when pruning ended (the model is small already)
    log: list[dict[str, Any]]
    steps_done: int
    tokens_seen: int
    train_wall_s: float
    resumed_from: int | None
    rounds: Any  #: the recovery rounds (post_pruning=recover), else None


def _train(config: PruneConfig, s: _Setup, out: Path, accelerator: Any, stop_after: int | None) -> _Trained | None:
    """The pruning phase (LHSPG on the masked model), then, compacted when pruning ends, the small model for
    the rest of the budget (continued training or recovery rounds). ``None``: stopped early (``stop_after``)."""
    from ..compaction import Compactions, compact

    train, lcfg, peft_model, graph, data = config.train, s.lcfg, s.peft_model, s.graph, s.data
    ckpt_dir = checkpoint_root(out)
    if config.force and ckpt_dir.is_dir():
        logger.info("--force: removing the checkpoints of an earlier run in %s", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    share = KLShare(config.distill.weight, parts=LossParts())
    loss_fn, hooks = _loss_and_hooks(config, s.teacher, data, lcfg, share, accelerator)
    s.teacher = None  # the loss holds it as long as it needs it
    settings = run_settings(config, data)
    mid = _compacts_mid_run(config, lcfg, accelerator)
    small_dir = ckpt_dir / COMPACTED_DIR
    log: list[dict[str, Any]] = []
    optimizer = None
    compacted = _compacted_checkpoints(small_dir) if mid and config.resume else None
    periodic = mid and config.compact_at == "period_end"
    if compacted is not None:
        outcome = PruningOutcome.read(compacted)  # the pruning phase is over: rebuild the small model
        if outcome.rounds is None:
            compact(peft_model, [graph.groups[i] for i in outcome.selected_ids])
        else:  # cut by period: the same cuts in the same order make the same model, to the bit
            replay = Compactions(graph.groups)
            for cut in outcome.rounds:
                replay.apply(peft_model, cut["groups"])
        resumed_from = outcome.resumed_from
    else:
        first = train_lhspg(peft_model, graph.groups, s.plan, data, train_config=train, lhspg_config=lcfg,
                            exclude=s.excluded, checkpoint_dir=ckpt_dir, resume=config.resume,
                            accelerator=accelerator, stop_after=stop_after, run_settings=settings, loss_fn=loss_fn,
                            hooks=hooks, end_step=lcfg.schedule.prune_end if mid else None,
                            compact_periods=periodic, compact_min_gain=config.compact_min_gain,
                            probe=_probe(data, accelerator.device)[:1, :16] if periodic and config.verify else None)
        if first.stopped_early:
            return None
        lh = first.lhspg
        assert lh is not None
        outcome = PruningOutcome.from_lhspg(lh, first, end=lcfg.schedule.prune_end if mid else train.steps)
        log = first.log
        resumed_from = first.resumed_from
        if periodic:  # every period's structures are cut out already, the last ones as pruning ended
            from ..lhspg.optimizer import _inner

            optimizer = _inner(lh.optimizer)
        elif mid:
            outcome.compaction_logit_diff, optimizer = _compact_in_training(peft_model, lh, data, config.verify,
                                                                            accelerator.device)
        else:
            return _Trained(outcome=outcome, mid=False, log=log, steps_done=first.steps_done,
                            tokens_seen=first.tokens_seen, train_wall_s=first.wall_time_s,
                            resumed_from=resumed_from, rounds=None)
    # the small model trains for the rest of the budget
    if not _post_pruning_needs_teacher(config):
        loss_fn = lm_loss  # the teacher is no longer needed: let it go
    common: dict[str, Any] = {
        "loss_fn": loss_fn, "hooks": [*hooks, PrunedLogFields(outcome)], "accelerator": accelerator,
        "stop_after": stop_after, "run_settings": settings, "extra_params": _base_weight_names(peft_model),
        "extra_state": {"pruning": outcome.to_dict()}}
    rounds = None
    if config.post_pruning == "recover":
        if optimizer is None:  # resumed after the compaction: the checkpoint fills its state
            from ..training.optim import lora_parameters, make_optimizer

            optimizer = make_optimizer(lora_parameters(peft_model), train.optimizer, train.lr, train.weight_decay)
        second = rounds = train_rounds(peft_model, s.sources, s.dense_losses, config.post, train_config=train,
                                       start=outcome.compact_step, optimizer=optimizer, checkpoint_root=small_dir,
                                       resume=config.resume, **common)
    else:
        resume_small = config.resume and optimizer is None  # resumed after the compaction: a checkpoint fills in
        if config.post_pruning == "full":
            optimizer = _train_every_weight(peft_model, config.post_lr, train)
        second = train_loop(peft_model, data, config=train, checkpoint_dir=small_dir, desc="train pruned",
                            resume=resume_small, optimizer=optimizer, start_step=outcome.compact_step, **common)
    if second.stopped_early:
        return None
    return _Trained(outcome=outcome, mid=True, log=(log or outcome.log) + second.log, steps_done=second.steps_done,
                    tokens_seen=second.tokens_seen, train_wall_s=outcome.train_wall_time_s + second.wall_time_s,
                    resumed_from=second.resumed_from if second.resumed_from is not None else resumed_from,
                    rounds=rounds)


def _run(config: PruneConfig, out: Path, *, model: Any, tokenizer: Any, data: torch.Tensor | None,
         accelerator: Any, stop_after: int | None) -> PruneResult | None:
    """Set up, train (prune, then the small model), and on the main process compact, report and write."""
    t_start = time.perf_counter()
    s = _setup(config, accelerator, model=model, tokenizer=tokenizer, data=data)
    trained = _train(config, s, out, accelerator, stop_after)
    if trained is None:
        return None
    pruned = _finish(config, s, trained, out, accelerator, t_start) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    return pruned


def _finish(config: PruneConfig, s: _Setup, t: _Trained, out: Path, accelerator: Any,
            t_start: float) -> PruneResult:
    """Compact (unless done already), check against the masked model, measure, and write the result whole."""
    from ..compaction import compact
    from ..models.saving import write_pretrained

    seq_len, data, outcome, mid = config.data.seq_len, s.data, t.outcome, t.mid
    probe = _probe(data, accelerator.device)
    masked_logits = None
    if config.verify and not mid:
        with torch.no_grad():
            masked_logits = s.peft_model(input_ids=probe).logits.float().cpu()
    selected = [s.graph.groups[i] for i in outcome.selected_ids]
    with warnings.catch_warnings():  # post_pruning=full merged the factors already: nothing left to merge
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        small = compact(s.peft_model, [] if mid else selected, merge_lora=True)
    small.eval()
    logits_diff = outcome.compaction_logit_diff
    if masked_logits is not None:
        with torch.no_grad():
            logits_diff = float((small(input_ids=probe).logits.float().cpu() - masked_logits).abs().max())
    params_after = count_params(small)
    ppl_after = None
    if config.eval_data:
        ppl_after = heldout_perplexity(small, s.tokenizer, config.eval_data, seq_len, config.eval_windows)
        logger.info("held-out perplexity after: %.3f", ppl_after)
    params_before, emb = s.params_before, s.embedding
    removed = params_before - params_after
    kept = kept_per_layer(s.graph.groups, selected)
    sched = s.lcfg.schedule
    target = config.target
    compute = _compute(config, s.dense_flops, small, outcome, t.steps_done, data.shape[1], sched.warmup_steps,
                       sched.prune_end)
    compute.prep(s.chat_tokens, s.dense_flops)  # the dense model's replies (self-distilled chat), if any
    recovery = None
    if t.rounds is not None:
        from ..recovery.mixing import degradation

        rounds = t.rounds
        compute.prep(sum(int(src.validation.numel()) for src in s.sources), s.dense_flops)
        compute.prep(rounds.measured_tokens, forward_flops_per_token(small, data.shape[1]))
        recovery = {"sources": {src.name: src.describe() for src in s.sources}, "dense_losses": s.dense_losses,
                    "rounds": rounds.history, "final_losses": rounds.final_losses,
                    "final_deltas": degradation(rounds.final_losses, s.dense_losses),
                    "split": "the sources' validation documents (never test)"}
    plan = s.plan
    report = {
        "command": "prune",
        "model": config.model or type(s.model).__name__,
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
            "candidates": outcome.candidates, "selected": len(selected),
            "selected_by_kind": {k: sum(1 for g in selected if g.kind == k) for k in plan.counts},
            "unprunable_blocks": s.blocks, "unprunable_groups": len(s.excluded),
            "selected_ids": outcome.selected_ids,
            "max_abs_selected": outcome.max_abs_selected,
        },
        "kept_per_layer": {k: {str(layer): v for layer, v in d.items()} for k, d in kept.items()},
        "verify": {"compacted_vs_masked_max_abs_logit_diff": logits_diff},
        "compaction": {"step": outcome.compact_step, "at": config.compact_at if mid else "end",
                       **({"rounds": [{"step": r["step"], "groups": len(r["groups"]), "logit_diff": r["logit_diff"],
                                       "flops_per_token": r["flops_per_token"]} for r in outcome.rounds]}
                          if outcome.rounds is not None else {})},
        "post_pruning": config.post_pruning if mid else None,
        "recovery": recovery,
        "compute": compute.to_dict(),
        "perplexity": {"source": config.eval_data, "before": s.ppl_before, "after": ppl_after,
                       "windows": config.eval_windows, "seq_len": seq_len},
        "schedule": {"warmup_steps": sched.warmup_steps, "num_periods": sched.num_periods,
                     "period_steps": sched.period_steps, "prune_end": sched.prune_end,
                     "period_boundaries": [sched.warmup_steps + p * sched.period_steps
                                           for p in range(sched.num_periods + 1)]},
        "periods": outcome.history,
        "log": t.log,
        "steps": t.steps_done,
        "tokens_seen": t.tokens_seen,
        "train_wall_time_s": t.train_wall_s,
        "wall_time_s": time.perf_counter() - t_start,
        "resumed_from": t.resumed_from,
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        "data": {"spec": config.data.spec, "sequences": int(data.shape[0]), "seq_len": int(data.shape[1])},
        "settings": to_json_dict(config),
    }
    pruned = PruneResult(
        out=str(out), params_before=params_before, params_after=params_after,
        ratio_removed=removed / params_before, non_embedding_ratio_removed=removed / max(1, params_before - emb),
        target_ratio=target.ratio, perplexity_before=s.ppl_before, perplexity_after=ppl_after,
        steps=t.steps_done, tokens_seen=t.tokens_seen, wall_time_s=report["wall_time_s"],
        report=report)
    # the whole result in a temporary sibling, then one swap: the old result (and, unless kept,
    # the run's checkpoints) goes only once the new one is in place
    carry = ("checkpoints",) if config.keep_run_checkpoints else ()
    with atomic_directory(out, carry=carry) as tmp:
        write_pretrained(small, tmp, tokenizer=s.tokenizer)
        plot_prune(report, tmp / PLOT_FILE)
        atomic_write_json(tmp / RESULT_FILE, pruned.summary())
        atomic_write_json(tmp / REPORT_FILE, report)
    logger.info("removed %d of %d parameters (%.2f%%) -> %s", removed, params_before,
                100 * removed / params_before, out)
    return pruned


#: where the checkpoints after the mid-run compaction go (under ``OUT/checkpoints``)
COMPACTED_DIR = "compacted"


@dataclass
class PruningOutcome:
    """What the pruning phase decided; stored in every checkpoint after a mid-run compaction, so a resume
    rebuilds the small model from the dense one (the groups are positions in the deterministic graph)."""

    selected_ids: list[int]
    candidates: int
    history: list[dict[str, Any]]
    max_abs_selected: float
    compact_step: int
    log: list[dict[str, Any]]
    train_wall_time_s: float
    resumed_from: int | None = None
    compaction_logit_diff: float | None = None
    sparsity: float = 1.0  #: committed / candidate groups when pruning ended
    #: the cuts at every period end (``compact_at=period_end``: step, group ids, logit difference, FLOPs per
    #: token after it), replayed in order by a resume; None when everything was cut at once
    rounds: list[dict[str, Any]] | None = None

    @classmethod
    def from_lhspg(cls, lh: Any, result: Any, *, end: int) -> PruningOutcome:
        cut = result.compaction.rounds if getattr(result, "compaction", None) is not None else None
        biggest = max([lh.committed_max_abs(), *(r["max_abs"] for r in cut or [])])
        return cls(selected_ids=[g.id for g in lh.committed_groups], candidates=len(lh.candidates),
                   history=lh.history, max_abs_selected=biggest, compact_step=end, log=result.log,
                   train_wall_time_s=result.wall_time_s, resumed_from=result.resumed_from, sparsity=lh.sparsity(),
                   rounds=[dict(r) for r in cut] if cut is not None else None,
                   compaction_logit_diff=result.compaction.max_logit_diff if cut is not None else None)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def read(cls, checkpoints: Path) -> PruningOutcome:
        """The outcome stored in the newest readable checkpoint under ``checkpoints`` (every checkpoint after the
        compaction holds the same one; an unreadable newest one is left to the resume, which skips it too)."""
        from ..training.checkpoint import list_checkpoints, read_checkpoint_file

        problems = []
        for _, ckpt in reversed(list_checkpoints(checkpoints)):
            try:
                state = read_checkpoint_file(ckpt, "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
                return cls(**state["pruning"])
            except CorruptCheckpointError as exc:
                problems.append(str(exc))
            except (KeyError, TypeError) as exc:
                problems.append(f"checkpoint {ckpt} does not record the pruning phase ({exc})")
        raise CorruptCheckpointError(f"{problems[0]}; no usable checkpoint left: start over with --force")


def _compacted_checkpoints(small_dir: Path) -> Path | None:
    """The directory with the newest checkpoint after the compaction: a recovery round's, or ``small_dir``."""
    rounds = [d for d in sorted(small_dir.glob("round-*"), reverse=True) if latest_checkpoint(d) is not None]
    if rounds:
        return rounds[0]
    return small_dir if latest_checkpoint(small_dir) is not None else None


def _round_sources(config: PruneConfig, model: torch.nn.Module, tokenizer: Any,
                   data: torch.Tensor) -> tuple[list[Any], dict[str, float]]:
    """The dynamic mix's sources and the dense model's validation loss on each (measured before pruning)."""
    from ..recovery.rounds import load_round_sources
    from ..recovery.sources import source_losses

    if tokenizer is None:
        raise ConfigError("--post-pruning recover reads its sources as text: name the model (its tokenizer) or "
                          "pass a tokenizer")
    sources = load_round_sources(config.post, tokenizer, data.shape[1], config.train.seed)
    return sources, source_losses(model, sources)


class PrunedLogFields(StepHook):
    """The pruning fields of the step log after a mid-run compaction (nothing is pruned any more)."""

    def __init__(self, outcome: PruningOutcome) -> None:
        self.fields = {"group_sparsity": outcome.sparsity, "committed": len(outcome.selected_ids), "redundant": 0,
                       "phase": "compacted"}

    def log_fields(self) -> dict[str, Any]:
        return dict(self.fields)


def _compacts_mid_run(config: PruneConfig, lcfg: Any, accelerator: Any) -> bool:
    """Whether the model is compacted by the time pruning ends (``compact_at`` prune_end or period_end)."""
    if config.compact_at == "end" or lcfg.schedule.prune_end >= config.train.steps:
        return False
    if accelerator.num_processes > 1:
        logger.warning("compact_at=%s is single-process only: under %d processes the model is compacted "
                       "after the last step", config.compact_at, accelerator.num_processes)
        return False
    return True


def _post_pruning_needs_teacher(config: PruneConfig) -> bool:
    d = config.distill
    share = d.weight if d.after_pruning is None else d.after_pruning
    return d.enabled and (share > 0 or bool(d.topk))


def _loss_and_hooks(config: PruneConfig, teacher: Any, data: torch.Tensor, lcfg: Any, share: KLShare,
                    accelerator: Any) -> tuple[Any, list[StepHook]]:
    """The training loss (cross-entropy, or mixed with the KL to the dense teacher) and the hook that switches
    the KL share when pruning ends."""
    train = config.train
    hooks: list[StepHook] = []
    d = config.distill
    if d.after_pruning is not None or d.before_pruning is not None:  # shares by phase: warm-up, pruning, after
        hooks.append(KLShareSwitch(share, d.shares(lcfg.schedule.warmup_steps, lcfg.schedule.prune_end)))
    if teacher is not None and config.distill.topk:  # the teacher's top-k logits once; then free it
        from ..training.teacher_cache import build_topk_cache, rows_used, topk_distillation_loss

        rows = rows_used(data.shape[0], steps=train.steps, batch_size=train.batch_size, grad_accum=train.grad_accum,
                         seed=train.seed, rank=accelerator.process_index, world=accelerator.num_processes)
        cache = build_topk_cache(teacher, data, rows, k=config.distill.topk, batch_size=train.batch_size)
        return topk_distillation_loss(cache, share, config.distill.temperature), hooks
    if teacher is not None:
        hooks.append(LossPartsLog(share.parts))
        return distillation_loss(teacher, config.distill, share), hooks
    return lm_loss, hooks


def _probe(data: torch.Tensor, device: Any) -> torch.Tensor:
    """A few tokens of the training data to compare logits on."""
    return data[: min(2, data.shape[0]), : min(64, data.shape[1])].to(device)


@torch.no_grad()
def _compact_in_training(model: torch.nn.Module, lh: Any, data: torch.Tensor, verify: bool,
                         device: Any) -> tuple[float | None, torch.optim.Optimizer]:
    """Remove the committed groups from the LoRA model in place (LoRA factors included, not merged) and make
    the optimizer follow; returns the max |logit difference| to the masked model (``verify``) and the
    optimizer to continue with."""
    from ..compaction import Replacements, compact, slice_optimizer
    from ..lhspg.optimizer import _inner

    probe = _probe(data, device)
    was_training = model.training
    model.eval()
    before = model(input_ids=probe).logits.float().cpu() if verify else None
    replacements: Replacements = {}
    compact(model, lh.committed_groups, replacements=replacements)
    optimizer = _inner(lh.optimizer)
    slice_optimizer(optimizer, replacements)
    diff = None
    if before is not None:
        diff = float((model(input_ids=probe).logits.float().cpu() - before).abs().max())
        logger.info("compacted at the end of pruning: max |logit difference| to the masked model %.2e", diff)
    model.train(was_training)
    return diff, optimizer


def _train_every_weight(model: torch.nn.Module, lr: float, train: TrainConfig) -> torch.optim.Optimizer:
    """Merge the LoRA factors into the base weights and make every weight of ``model`` trainable (the merged
    factors are frozen: they no longer take part); returns a fresh optimizer over those weights at ``lr``
    (``post_pruning=full``). A resume repeats this, then the checkpoint restores every weight and the moments."""
    from ..training.optim import lora_parameters, make_optimizer

    model.merge_adapter()
    for name, param in model.named_parameters():
        param.requires_grad_("lora_" not in name)
    params = lora_parameters(model)  # the trainable parameters, as the training loop takes them
    logger.info("post-pruning: every weight trains (%d parameters) at lr %.2e", sum(p.numel() for p in params), lr)
    return make_optimizer(params, train.optimizer, lr, train.weight_decay)


def _base_weight_names(model: torch.nn.Module) -> list[str]:
    """The frozen weights the pruning phase may have changed (decays, merges): every LoRA layer's base weight."""
    return [n for n, p in model.named_parameters() if not p.requires_grad and ".base_layer." in n]


def _compute(config: PruneConfig, dense_flops: float, small: torch.nn.Module, outcome: PruningOutcome, steps: int,
             seq_len: int, warmup_end: int, prune_end: int) -> Compute:
    """Token-passes and FLOPs of the training: the masked model at full width until the first cut, each width
    after it (the small one after the last), the teacher while its KL share is above zero."""
    per_step = config.train.batch_size * config.train.grad_accum * seq_len
    compute = Compute()
    widths = [(0, dense_flops)]
    if outcome.rounds is not None:
        widths += [(int(r["step"]), float(r["flops_per_token"])) for r in outcome.rounds]
    else:
        widths.append((outcome.compact_step, forward_flops_per_token(small, seq_len)))
    for (start, flops), (stop, _) in zip(widths, widths[1:] + [(steps, 0.0)]):
        compute.train((stop - start) * per_step, flops,
                      full=config.post_pruning == "full" and start >= outcome.compact_step)
    d = config.distill
    if d.enabled and d.topk:  # the top-k cache: one teacher pass over every training token
        compute.teacher(steps * per_step, dense_flops)
    elif d.enabled:  # the online teacher runs at the steps whose KL share is above zero
        shares = d.shares(warmup_end, prune_end)
        teacher_steps = sum(1 for step in range(steps) if share_at(shares, step) > 0)
        compute.teacher(teacher_steps * per_step, dense_flops)
    return compute
