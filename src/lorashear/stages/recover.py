"""The recover stage: dynamic knowledge recovery of a pruned model (paper Alg. 5), distillation optional.

Recipe (each step a component)::

    sources = [load_source(spec) for spec in config.data]        # stage 1: pretraining-style text
    dense = validation losses of the teacher per source          # once; cached in OUT/dense_losses.json
    repeat:                                                      # one round
        Delta = degradation(source_losses(model, sources), dense)
        stop when max(Delta) is 0, improved by less than `tolerance` (relative) in the last round,
             or after `max_rounds` rounds
        w = sampling_weights(Delta, beta)                        # (1-beta) Delta_s/sum(Delta) + beta/|S|
        subset = sample_subset(w, sequences per round, pools)    # by the weights, new sequences each round
        model = finetune(model, subset, lora, train)             # LoRA on the shared loop, merged
                                                                 # (lora_across_rounds: one LoRA and optimizer
                                                                 #  through the stage, merged at its end)
    the same for stage 2 on config.instruct_data                 # instruction data, loss on responses only

The training loss is next-token cross-entropy on the trained-on tokens, or with ``distill_weight > 0``
mixed with the KL to the teacher's next-token distribution (``(1-w) CE + w T^2 KL``), on the same
loop as pruning. Each round trains ``steps`` optimizer steps; ``tokens`` sets them instead
(``ceil(tokens / (batch_size * grad_accum * seq_len))``, rounded up to whole steps), and the
round's subset holds exactly the sequences those steps read.

``config.out`` then holds the recovered model (safetensors + config + tokenizer; same loading
rules as the prune stage's output), ``recover_report.json`` (every round and source: Delta_s,
weight, sequences and tokens, validation loss before and after; the round's training loss),
``recover.png`` and ``dense_losses.json`` (the teacher's losses, keyed by teacher, source and the
held-out sequences, reused by later runs). While running, ``out/checkpoints`` holds the state
after the last complete round (model weights as safetensors, the round state and RNG as JSON);
``resume`` continues from it, bit-identically on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_directory, atomic_write_json, output_lock, validate_out
from ..config import section, to_flat_dict, to_json_dict
from ..errors import CheckpointError, ConfigError, CorruptCheckpointError
from ..models.lora import LoraSettings
from ..recovery.finetune import LoraRun
from ..recovery.sources import Source, SourceConfig
from ..training.loop import TrainConfig
from ..training.losses import DistillConfig

logger = logging.getLogger(__name__)

REPORT_FILE = "recover_report.json"
PLOT_FILE = "recover.png"
DENSE_FILE = "dense_losses.json"
CHECKPOINTS = "checkpoints"
#: files that mark a directory as a recover stage's output, and the run state it may hold besides
OWNER_FILES = (REPORT_FILE,)
TRANSIENT = (CHECKPOINTS, DENSE_FILE)

#: stage 1's default sources: the built-in pretraining-style corpora, each its own source
DEFAULT_SOURCES: tuple[str, ...] = ("builtin:austen", "builtin:wikipedia", "builtin:debian-handbook")
#: stage 2's default source: the built-in chat data (offline)
DEFAULT_INSTRUCTIONS: tuple[str, ...] = ("builtin:instructions",)
#: options that do not change what a run computes (not checked on resume)
_RUN_ONLY = ("out", "resume", "keep_run_checkpoints", "progress")


@dataclass
class RecoverConfig:
    """Everything ``lorashear recover`` needs: inputs, outputs, the adaptor and its components' settings."""

    model: str = field(default="", metadata={"help": "the pruned model: name, hub id or directory", "cli": False})
    out: str = field(default="", metadata={"help": "output directory (model, recover_report.json, recover.png)",
                                           "cli": False})
    teacher: str = field(default="", metadata={
        "help": "the dense model before pruning: reference of each source's degradation, and the distillation "
                "teacher"})
    data: tuple[str, ...] = field(default=DEFAULT_SOURCES, metadata={
        "help": "stage-1 sources (pretraining-style text), one data spec each; repeat --data for more"})
    instruct_data: tuple[str, ...] = field(default=DEFAULT_INSTRUCTIONS, metadata={
        "help": "stage-2 instruction sources (Alpaca-style json/jsonl records or chat messages; loss on the "
                "responses); `none` skips stage 2"})
    tokens: int | None = field(default=None, metadata={
        "help": "training tokens per round (sets the steps of each round; default: --steps steps per round)"})
    max_rounds: int = field(default=3, metadata={"help": "most rounds per stage"})
    tolerance: float = field(default=0.01, metadata={
        "help": "stop a stage when the largest degradation improved by less than this fraction in a round"})
    beta: float = field(default=0.3, metadata={
        "help": "share of each round sampled uniformly over the sources; the rest goes by degradation"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the model and the teacher"})
    source: SourceConfig = section(SourceConfig, help="cleaning, split and packing of every source")
    lora: LoraSettings = section(LoraSettings, prefix="lora_", help="LoRA factors of each round (merged after it)")
    lora_across_rounds: bool = field(default=True, metadata={
        "help": "keep one set of LoRA factors and its optimizer state through all rounds of a stage, merged at "
                "the stage's end (measured better in two seeds, benchmarks/results/recover_smollm2.md); "
                "--no-lora-across-rounds: new factors each round, merged after it, as in the paper"})
    train: TrainConfig = section(TrainConfig, help="training loop of each round", steps=50)
    distill: DistillConfig = section(DistillConfig, prefix="distill_",
                                     help="distillation from the teacher (off by default: 0.5 measured worse than off "
                                          "on the reference model, benchmarks/results/recover_smollm2.md)")
    resume: bool = field(default=False, metadata={"help": "continue from the last complete round in OUT/checkpoints"})
    keep_run_checkpoints: bool = field(default=False, metadata={"help": "keep OUT/checkpoints after success"})

    def __post_init__(self) -> None:
        self.data = _specs(self.data)
        self.instruct_data = _specs(self.instruct_data)
        if not self.data and not self.instruct_data:
            raise ConfigError("name at least one source (--data SPEC or --instruct-data SPEC)")
        names = self.data + self.instruct_data
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"source {twice[0]!r} is named twice; each source is weighted on its own")
        if self.tokens is not None and self.tokens < 1:
            raise ConfigError(f"tokens must be >= 1, got {self.tokens}")
        if self.max_rounds < 1:
            raise ConfigError(f"max_rounds must be >= 1, got {self.max_rounds}")
        if not (self.tolerance >= 0 and math.isfinite(self.tolerance)):
            raise ConfigError(f"tolerance must be a number >= 0, got {self.tolerance}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta must be in [0, 1], got {self.beta}")
        if self.distill.topk:
            raise ConfigError("distill topk applies to the prune stage only: recovery picks each round's data from the "
                              "round before, so its teacher stays online (set it to 0)")
        for name in ("after_pruning", "before_pruning"):
            if getattr(self.distill, name) is not None:
                raise ConfigError(f"distill {name} applies to the prune stage only (recovery has no pruning steps); "
                                  "drop it and set --distill-weight")
        if self.distill.teacher_dtype != "model":
            raise ConfigError("distill teacher_dtype applies to the prune stage only (recovery's teacher also measures "
                              "the dense losses, in --dtype); drop it")

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of each round: from ``tokens`` when given, else ``train.steps``."""
        if self.tokens is None:
            return self.train.steps
        return max(1, math.ceil(self.tokens / self.sequences_per_step / self.source.seq_len))

    @property
    def sequences_per_step(self) -> int:
        return self.train.batch_size * self.train.grad_accum

    @property
    def sequences_per_round(self) -> int:
        """Sequences of each round's subset: exactly what its steps read (one pass)."""
        return self.steps_per_round * self.sequences_per_step


def _specs(value: Any) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    items = tuple(str(s).strip() for s in items if str(s).strip())
    return () if tuple(s.lower() for s in items) == ("none",) else items


@dataclass
class RecoverResult:
    """What the recover stage produced (the full record is ``report``, saved as ``recover_report.json``)."""

    out: str
    rounds: int                                 #: training rounds run, both stages together
    stages: list[dict[str, Any]]                #: per stage: sources, rounds, stop reason, degradation before/after
    final_delta: dict[str, float]               #: each source's degradation after the last round of its stage
    tokens_seen: int
    wall_time_s: float
    report: dict[str, Any] = field(repr=False, default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("report")
        return out


# -- dense (teacher) losses, cached --------------------------------------------------------------
def _cache_key(teacher: str, source: Source, dtype: str) -> str:
    from ..models.identity import model_identity

    payload = json.dumps({"teacher": model_identity(teacher), "source": source.name, "dtype": dtype,
                          "validation": source.fingerprint()}, sort_keys=True)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def dense_losses(sources: list[Source], get_teacher: Any, *, teacher_name: str, dtype: str, batch_size: int,
                 cache: Path | None) -> dict[str, float]:
    """Each source's validation loss under the dense teacher; from ``cache`` (JSON) when it has them."""
    from ..recovery.sources import validation_loss

    stored: dict[str, Any] = {}
    if cache is not None and cache.is_file():
        try:
            stored = json.loads(cache.read_text())
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable %s", cache)
    out: dict[str, float] = {}
    changed = False
    for src in sources:
        key = _cache_key(teacher_name, src, dtype) if cache is not None else None
        if key is not None and key in stored:
            out[src.name] = float(stored[key]["loss"])
            continue
        out[src.name] = validation_loss(get_teacher(), src.validation, batch_size=batch_size)
        logger.info("dense loss on %s: %.4f", src.name, out[src.name])
        if key is not None:
            stored[key] = {"teacher": teacher_name, "source": src.name, "dtype": dtype, "loss": out[src.name],
                           "validation_sequences": int(src.validation.shape[0])}
            changed = True
    if changed and cache is not None:
        atomic_write_json(cache, stored)
    return out


# -- round checkpoints --------------------------------------------------------------------------------
def _settings(config: RecoverConfig) -> dict[str, Any]:
    """What defines a recover run (a resume must match it): the settings, and the model and teacher by content
    (the same directory named another way is the same model; other weights at the same path are not)."""
    from ..models.identity import model_identity

    flat = {k: v for k, v in to_flat_dict(config).items() if k not in _RUN_ONLY}
    for key in ("model", "teacher"):
        if flat.get(key):
            flat[key] = model_identity(flat[key])
    return flat


def _checkpointed(model: torch.nn.Module, lora_run: LoraRun | None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """What a round checkpoint holds: the model's parameters, or with a LoRA run open, the peft model's
    (base and factors) and the run's optimizer."""
    if lora_run is None:
        return model, {}
    return lora_run.model, {"lora_optimizer": lora_run.optimizer}


def _save_round(root: Path, model: torch.nn.Module, state: dict[str, Any], settings: dict[str, Any],
                lora_run: LoraRun | None) -> None:
    """The state after a round; with a LoRA run still open, its factors (with the model) and optimizer."""
    from ..training.checkpoint import save_checkpoint

    target, stateful = _checkpointed(model, lora_run)
    names = [n for n, _ in target.named_parameters()]
    save_checkpoint(root, step=state["round"], model=target, param_names=names, stateful=stateful,
                    state={"recover": {**state, "lora_open": lora_run is not None}, "settings": settings}, keep=1)


def _load_round(root: Path, model: torch.nn.Module, settings: dict[str, Any],
                open_lora: Callable[[torch.nn.Module, int], LoraRun]) -> tuple[dict[str, Any], LoraRun | None] | None:
    """The state of the last complete round loaded into ``model`` (and a LoRA run opened with ``open_lora``
    when that round left one open); ``None`` when there is no checkpoint."""
    from ..training.checkpoint import latest_checkpoint, load_checkpoint, read_state

    path = latest_checkpoint(root)
    if path is None:
        logger.warning("no checkpoint in %s; starting from the first round", root)
        return None
    try:
        stored = read_state(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{exc}; run without --resume to start over") from exc
    saved = stored.get("settings")
    if saved != settings:
        saved = saved if isinstance(saved, dict) else {}
        diff = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        raise CheckpointError(f"checkpoint {path} was written with other settings ({', '.join(diff[:3])}); "
                              f"run without --resume to start over")
    recover_state = stored.get("recover")
    if not _is_round_state(recover_state):
        raise CorruptCheckpointError(f"checkpoint file {path / 'state.json'} is corrupt (no round state); run "
                                     "without --resume to start over")
    lora_run = open_lora(model, int(recover_state["stage_index"])) if recover_state.get("lora_open") else None
    target, stateful = _checkpointed(model, lora_run)
    try:
        state = load_checkpoint(path, model=target, stateful=stateful)
    except CorruptCheckpointError as exc:
        raise CorruptCheckpointError(f"{exc}; run without --resume to start over") from exc
    logger.info("resumed from %s (round %d)", path, state["recover"]["round"])
    recovered = state["recover"]
    recovered.pop("lora_open", None)
    return recovered, lora_run


# -- the stage ------------------------------------------------------------------------------------
def _fresh_state() -> dict[str, Any]:
    return {"round": 0, "stage_index": 0, "stage_round": 0, "losses": None, "prev_max": None, "offsets": {},
            "history": [], "stages": [], "tokens_seen": 0, "elapsed_s": 0.0}


def _is_round_state(state: Any) -> bool:
    """Whether ``state`` has every field of a round's state, the counters as whole numbers."""
    if not isinstance(state, dict) or set(_fresh_state()) - set(state):
        return False
    counters = [state[k] for k in ("round", "stage_index", "stage_round")]
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in counters) and \
        isinstance(state["history"], list) and isinstance(state["stages"], list) and isinstance(state["offsets"], dict)


def check_sources(config: RecoverConfig) -> None:
    """Every source read once before any model loads (missing, empty, binary or not instruction data: one
    line); a hub source is left to the stage."""
    from ..data import parse_data_spec
    from ..recovery.sources import split_conversations, split_texts

    for specs, split in ((config.data, split_texts), (config.instruct_data, split_conversations)):
        for spec in specs:
            if parse_data_spec(spec).kind != "hf":
                split(spec)


def run(config: RecoverConfig, *, model: Any = None, tokenizer: Any = None, teacher: Any = None,
        stop_after_rounds: int | None = None) -> RecoverResult | None:
    """Run the recover stage; returns its result (``None`` when stopped with ``stop_after_rounds``).

    ``model`` (the pruned model), ``tokenizer`` and ``teacher`` (the dense model) may be given
    directly (tests, notebooks); otherwise they are loaded from ``config.model`` and
    ``config.teacher``. The teacher is loaded only when needed: for losses not in the cache, and
    for distillation. ``stop_after_rounds``: stop after this many rounds in total (a deliberate
    interruption; ``resume`` continues).
    """
    if not config.out:
        raise ConfigError("name an output directory (--out DIR)")
    out = validate_out(config.out, owner_files=OWNER_FILES, transient=TRANSIENT)
    if not config.teacher and teacher is None:
        raise ConfigError("name the dense model the pruned one came from (--teacher DENSE): each source's "
                          "degradation is measured against it")
    if model is None and not config.model:
        raise ConfigError("name the pruned model to recover (MODEL)")
    from ..models.loading import check_causal_lm, check_same_vocabulary

    if model is None:
        check_causal_lm(config.model)
    if teacher is None:
        check_causal_lm(config.teacher)
    if model is None and teacher is None:
        check_same_vocabulary(config.model, config.teacher)
    with output_lock(out):
        return _run(config, out, model=model, tokenizer=tokenizer, teacher=teacher,
                    stop_after_rounds=stop_after_rounds)


@dataclass
class _Inputs:
    """What the rounds work on: the model on its device, its tokenizer and the sources of each stage."""

    model: torch.nn.Module
    tokenizer: Any
    stages: list[tuple[int, str, list[Source]]]  #: (stage number, label, sources)
    device: torch.device

    @property
    def sources(self) -> list[Source]:
        return [s for _, _, srcs in self.stages for s in srcs]


def _load_inputs(config: RecoverConfig, model: Any, tokenizer: Any) -> _Inputs:
    """The tokenizer, every source (data first: a bad spec fails before any model loads), then the model."""
    from ..models.loading import check_tokenizer_fits, load_model, load_tokenizer
    from ..recovery.sources import load_source

    if tokenizer is None:
        tokenizer = load_tokenizer(config.model or config.teacher)
    plan = [(1, "pretraining", "text", config.data), (2, "instruction", "instruction", config.instruct_data)]
    stages = [(num, label, [load_source(spec, tokenizer, config.source, kind=kind, seed=config.train.seed)
                            for spec in specs]) for num, label, kind, specs in plan if specs]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if model is None:
        model = load_model(config.model, dtype=config.dtype)
    check_tokenizer_fits(model, tokenizer, config.model)
    model.to(device)
    return _Inputs(model=model, tokenizer=tokenizer, stages=stages, device=device)


class _Teacher:
    """The dense model, loaded on first use (cached dense losses may make it unnecessary) and frozen."""

    def __init__(self, config: RecoverConfig, given: Any, tokenizer: Any, device: torch.device) -> None:
        self.config, self.model, self.tokenizer, self.device = config, given, tokenizer, device
        self.given = given is not None

    def get(self) -> torch.nn.Module:
        if self.model is None:
            from ..models.loading import check_tokenizer_fits, load_model

            self.model = load_model(self.config.teacher, dtype=self.config.dtype)
            check_tokenizer_fits(self.model, self.tokenizer, self.config.teacher)
        t = self.model.to(self.device)
        t.eval()
        for p in t.parameters():
            p.requires_grad_(False)
        return t

    def release(self) -> None:
        """Free a teacher this stage loaded itself."""
        if not self.given:
            self.model = None


def _stop_reason(state: dict[str, Any], worst: float, config: RecoverConfig) -> str | None:
    """Why the current stage stops before another round (``None``: it goes on)."""
    from ..recovery.mixing import improvement

    if worst == 0:
        return "recovered"  # no source is worse than under the dense model
    if state["prev_max"] is not None and improvement(state["prev_max"], worst) < config.tolerance:
        return "converged"
    if state["stage_round"] >= config.max_rounds:
        return "max_rounds"
    return None


def _round_record(state: dict[str, Any], num: int, srcs: list[Source], ft: Any, n_seq: int, seq_len: int, *,
                  deltas: dict[str, float], weights: dict[str, float], counts: dict[str, int],
                  after: dict[str, float], dense: dict[str, float]) -> dict[str, Any]:
    """One round's entry of the report's history."""
    from ..recovery.mixing import degradation, improvement

    worst = max(deltas.values())
    after_delta = degradation(after, dense)
    return {
        "round": state["round"] + 1, "stage": num, "stage_round": state["stage_round"] + 1,
        "steps": ft.steps, "sequences": n_seq, "tokens": ft.tokens_seen,
        "train_loss_first": ft.losses[0], "train_loss_last": ft.losses[-1],
        "train_loss_mean": sum(ft.losses) / len(ft.losses),
        "max_delta_before": worst, "max_delta_after": max(after_delta.values()),
        "improvement": improvement(worst, max(after_delta.values())),
        "sources": {s.name: {"delta": deltas[s.name], "weight": weights[s.name], "sequences": counts[s.name],
                             "tokens": counts[s.name] * seq_len, "validation_loss_before": state["losses"][s.name],
                             "validation_loss_after": after[s.name], "delta_after": after_delta[s.name],
                             "dense_loss": dense[s.name]} for s in srcs},
        "wall_time_s": ft.wall_time_s,
    }


def _final_report(config: RecoverConfig, model: torch.nn.Module, state: dict[str, Any], inputs: _Inputs,
                  dense: dict[str, float], *, wall_time_s: float, resumed_from: int | None) -> dict[str, Any]:
    n_seq, seq_len = config.sequences_per_round, config.source.seq_len
    return {
        "command": "recover",
        "model": config.model or type(model).__name__,
        "teacher": config.teacher or "(given in memory)",
        "stages": state["stages"],
        "rounds": state["history"],
        "sources": {s.name: s.describe() for s in inputs.sources},
        "dense_loss": dense,
        "final_delta": {k: v for r in state["stages"] for k, v in r["final_delta"].items()},
        "steps_per_round": config.steps_per_round,
        "sequences_per_round": n_seq,
        "tokens_per_round": n_seq * seq_len,
        "tokens_seen": state["tokens_seen"],
        "loss": ({"kind": "cross-entropy + KL to the teacher", "distill_weight": config.distill.weight,
                  "distill_temperature": config.distill.temperature} if config.distill.enabled
                 else {"kind": "cross-entropy"}),
        "train_wall_time_s": sum(r["wall_time_s"] for r in state["history"]),
        "wall_time_s": wall_time_s,
        "resumed_from_round": resumed_from,
        "settings": to_json_dict(config),
    }


def _run(config: RecoverConfig, out: Path, *, model: Any, tokenizer: Any, teacher: Any,
         stop_after_rounds: int | None) -> RecoverResult | None:
    """The stages of Alg. 5 as named steps: inputs, dense losses, resume, then rounds until each stage stops."""
    from ..recovery.finetune import FinetuneConfig, finetune
    from ..recovery.mixing import degradation, sample_subset, sampling_weights
    from ..recovery.sources import source_losses
    from ..training.losses import masked_distillation_loss, masked_lm_loss

    t_start = time.perf_counter()
    ckpt_root = out / CHECKPOINTS
    seed = config.train.seed
    inputs = _load_inputs(config, model, tokenizer)
    model, stages = inputs.model, inputs.stages
    pools = {s.name: s.train for s in inputs.sources}
    batch = config.train.batch_size
    teacher_box = _Teacher(config, teacher, inputs.tokenizer, inputs.device)
    dense = dense_losses(inputs.sources, teacher_box.get, teacher_name=config.teacher, dtype=config.dtype,
                         batch_size=batch, cache=(out / DENSE_FILE) if config.teacher else None)
    if config.distill.enabled:
        loss_fn = masked_distillation_loss(teacher_box.get(), config.distill)
    else:
        loss_fn = masked_lm_loss
        teacher_box.release()  # not needed any more: free its memory
    settings = _settings(config)

    def open_lora(base: torch.nn.Module, stage_index: int) -> LoraRun:
        return LoraRun(base, config.lora, config.train, seed=seed + 7919 * (stage_index + 1))

    state: dict[str, Any] | None = None
    lora_run: LoraRun | None = None  # open only with lora_across_rounds, between a stage's rounds
    if config.resume:
        loaded = _load_round(ckpt_root, model, settings, open_lora)
        if loaded is not None:
            state, lora_run = loaded
    else:
        shutil.rmtree(ckpt_root, ignore_errors=True)
    resumed_from = state["round"] if state is not None else None
    state = state or _fresh_state()
    steps, n_seq, seq_len = config.steps_per_round, config.sequences_per_round, config.source.seq_len
    elapsed_before = state["elapsed_s"]  # seconds spent by earlier invocations of this run

    while state["stage_index"] < len(stages):
        num, label, srcs = stages[state["stage_index"]]
        if state["losses"] is None:  # the stage starts: measure the model as it is
            state["losses"] = source_losses(model, srcs, batch_size=batch)
            state["stages"].append({"stage": num, "kind": label, "sources": [s.name for s in srcs],
                                    "initial_loss": state["losses"],
                                    "initial_delta": degradation(state["losses"], dense),
                                    "rounds": 0, "stop_reason": None})
        record = state["stages"][-1]
        deltas = degradation(state["losses"], dense)
        worst = max(deltas.values())
        reason = _stop_reason(state, worst, config)
        if reason is not None:
            if lora_run is not None:  # the stage's factors go into the weights
                model, lora_run = lora_run.merge(), None
            record.update(stop_reason=reason, final_loss=state["losses"], final_delta=deltas)
            logger.info("stage %d (%s) stops after %d rounds: %s", num, label, state["stage_round"], reason)
            state.update(stage_index=state["stage_index"] + 1, stage_round=0, losses=None, prev_max=None)
            continue

        weights = sampling_weights(deltas, config.beta)
        subset, counts, offsets = sample_subset(weights, n_seq, {s.name: pools[s.name] for s in srcs}, seed=seed,
                                                offsets=state["offsets"])
        logger.info("round %d (stage %d, %s): weights %s", state["round"] + 1, num, label,
                    ", ".join(f"{k}={v:.3f}" for k, v in weights.items()))
        round_train = dataclasses.replace(config.train, steps=steps, seed=seed + state["round"])
        if config.lora_across_rounds:
            if lora_run is None:
                lora_run = open_lora(model, state["stage_index"])
            ft = lora_run.train(subset, round_train, loss_fn=loss_fn)
        else:
            ft = finetune(model, None, subset, FinetuneConfig(seq_len=seq_len, lora=config.lora, train=round_train),
                          loss_fn=loss_fn)
            model = ft.model
        after = source_losses(ft.model, srcs, batch_size=batch)
        state["history"].append(_round_record(state, num, srcs, ft, n_seq, seq_len, deltas=deltas, weights=weights,
                                              counts=counts, after=after, dense=dense))
        record["rounds"] += 1
        state.update(round=state["round"] + 1, stage_round=state["stage_round"] + 1, prev_max=worst, losses=after,
                     offsets=offsets, tokens_seen=state["tokens_seen"] + ft.tokens_seen,
                     elapsed_s=elapsed_before + time.perf_counter() - t_start)
        _save_round(ckpt_root, model, state, settings, lora_run)
        if stop_after_rounds is not None and state["round"] >= stop_after_rounds:
            return None

    model.eval()
    report = _final_report(config, model, state, inputs, dense, resumed_from=resumed_from,
                           wall_time_s=elapsed_before + time.perf_counter() - t_start)
    _write_outputs(out, model, inputs.tokenizer, report, keep_checkpoints=config.keep_run_checkpoints)
    logger.info("recovered %s in %d rounds -> %s", report["model"], state["round"], out)
    return RecoverResult(out=str(out), rounds=state["round"], stages=state["stages"],
                         final_delta=report["final_delta"], tokens_seen=state["tokens_seen"],
                         wall_time_s=report["wall_time_s"], report=report)


def _write_outputs(out: Path, model: torch.nn.Module, tokenizer: Any, report: dict[str, Any], *,
                   keep_checkpoints: bool = False) -> None:
    """Model, plot and report written complete into a temporary sibling of ``out`` that then replaces it
    as a whole; the cached dense losses (and, with ``keep_checkpoints``, the checkpoints) move over."""
    from ..models.saving import write_pretrained
    from ..recovery.plot import plot_recover

    carry = (DENSE_FILE, CHECKPOINTS) if keep_checkpoints else (DENSE_FILE,)
    with atomic_directory(out, carry=carry) as tmp:
        write_pretrained(model, tmp, tokenizer=tokenizer)
        plot_recover(report, tmp / PLOT_FILE)
        atomic_write_json(tmp / REPORT_FILE, report)
