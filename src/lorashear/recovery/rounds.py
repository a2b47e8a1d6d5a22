"""Dynamic knowledge recovery (paper Alg. 5) as the phase after pruning, inside one training budget.

Once the prune stage has compacted the model (``compact_at=prune_end``), the steps left of its budget can
train on the calibration stream (``post_pruning=continue``) or on the dynamic mix of several sources
(``post_pruning=recover``, this module). The remaining steps ``[start, steps)`` are cut into ``rounds``
equal rounds; each round:

1. measures every source's validation loss on the current (small) model and its degradation against the
   dense model's, ``Delta_s = max(L_s(pruned) - L_s(dense), 0)`` (validation documents only: the
   ``test`` half of every source is never read);
2. samples the round's sequences from the sources' training pools with weights
   ``w_s = (1 - beta) Delta_s / sum(Delta) + beta / |S|``, new sequences every round;
3. trains on them, one pass, continuing the prune stage's LoRA factors and optimizer state (no restart,
   no merge until the end) with the stage's loss and learning-rate schedule.

Every round checkpoints into a directory of its own (``round-NN``) with the round's weights and offsets, so
a resume rebuilds exactly the subset the round was training on and continues bit-identically on CPU.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, CorruptCheckpointError
from ..training.hooks import StepHook
from .mixing import degradation, sample_subset, sampling_weights
from .sources import Source, source_losses

logger = logging.getLogger(__name__)

#: the built-in pretraining-style sources (the recover stage's defaults)
DEFAULT_ROUND_SOURCES: tuple[str, ...] = ("builtin:austen", "builtin:wikipedia", "builtin:debian-handbook")


@dataclass
class RoundsConfig:
    """The dynamic mix of the post-pruning phase."""

    sources: tuple[str, ...] = field(default=DEFAULT_ROUND_SOURCES, metadata={
        "help": "sources of the dynamic mix after pruning (one data spec each); their validation split measures "
                "the degradation"})
    rounds: int = field(default=4, metadata={"help": "rounds the steps after pruning are cut into"})
    beta: float = field(default=0.3, metadata={
        "help": "share of each round sampled uniformly over the sources; the rest goes by degradation"})
    val_sequences: int = field(default=16, metadata={"help": "validation sequences per source"})
    min_paragraph_tokens: int = field(default=64, metadata={
        "help": "drop paragraphs shorter than this many tokens (the paper keeps paragraphs over 64 tokens)"})

    def __post_init__(self) -> None:
        self.sources = tuple(str(s).strip() for s in ([self.sources] if isinstance(self.sources, str)
                                                      else self.sources) if str(s).strip())
        if not self.sources:
            raise ConfigError("name at least one source for the dynamic mix (--post-sources SPEC)")
        if len(set(self.sources)) != len(self.sources):
            raise ConfigError("a source of the dynamic mix is named twice; each source is weighted on its own")
        if self.rounds < 1:
            raise ConfigError(f"post_rounds must be >= 1, got {self.rounds}")
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"post_beta must be in [0, 1], got {self.beta}")
        if self.val_sequences < 1 or self.min_paragraph_tokens < 0:
            raise ConfigError("post_val_sequences must be >= 1 and post_min_paragraph_tokens >= 0")


def load_round_sources(config: RoundsConfig, tokenizer: Any, seq_len: int, seed: int) -> list[Source]:
    """Every source of the mix: cleaned, split by document, packed (training pool + validation sequences)."""
    from .sources import SourceConfig, load_source

    scfg = SourceConfig(seq_len=seq_len, val_sequences=config.val_sequences,
                        min_paragraph_tokens=config.min_paragraph_tokens)
    return [load_source(spec, tokenizer, scfg, kind="text", seed=seed) for spec in config.sources]


def round_boundaries(start: int, steps: int, rounds: int) -> list[int]:
    """``rounds + 1`` step boundaries cutting ``[start, steps)`` into near-equal rounds (empty ones dropped)."""
    edges = [start + round(i * (steps - start) / rounds) for i in range(rounds + 1)]
    return sorted(set(edges))


@dataclass
class RoundState:
    """What a round is decided from; stored in each of its checkpoints."""

    round: int
    losses: dict[str, float]
    deltas: dict[str, float]
    weights: dict[str, float]
    counts: dict[str, int]
    offsets_before: dict[str, int]
    offsets_after: dict[str, int]
    history: list[dict[str, Any]]  #: the finished rounds
    log_before: list[dict[str, Any]]  #: the step log of the finished rounds


@dataclass
class RoundsResult:
    log: list[dict[str, Any]]
    history: list[dict[str, Any]]
    final_losses: dict[str, float]
    steps_done: int
    tokens_seen: int
    wall_time_s: float
    resumed_from: int | None
    stopped_early: bool
    measured_tokens: int  #: validation tokens scored by the small model to set the weights


class RoundLogFields(StepHook):
    """The round number in the step log."""

    def __init__(self, number: int) -> None:
        self.number = number

    def log_fields(self) -> dict[str, Any]:
        return {"round": self.number}


def _read_round(directory: Path) -> RoundState | None:
    """The round state in the newest readable checkpoint of ``directory`` (None: no checkpoint)."""
    from ..training.checkpoint import list_checkpoints, read_checkpoint_file

    found = list(reversed(list_checkpoints(directory)))
    for _, ckpt in found:
        try:
            state = read_checkpoint_file(ckpt, "state.json", lambda f: json.loads(f.read_text(encoding="utf-8")))
            return RoundState(**state["recovery"])
        except CorruptCheckpointError:
            continue
        except (KeyError, TypeError):
            continue
    if found:
        raise CorruptCheckpointError(f"no readable checkpoint in {directory}; start over with --force")
    return None


def latest_round(root: Path) -> tuple[int, RoundState] | None:
    """The last round that has a checkpoint under ``root`` (``round-NN`` directories), with its state."""
    for directory in sorted(root.glob("round-*"), reverse=True):
        state = _read_round(directory)
        if state is not None:
            return state.round, state
    return None


def train_rounds(model: torch.nn.Module, sources: Sequence[Source], dense: dict[str, float], config: RoundsConfig, *,
                 train_config: Any, start: int, optimizer: torch.optim.Optimizer, checkpoint_root: Path,
                 resume: bool, loss_fn: Any, hooks: Sequence[StepHook] = (), accelerator: Any = None,
                 stop_after: int | None = None, run_settings: dict[str, Any] | None = None,
                 extra_params: Sequence[str] = (), extra_state: dict[str, Any] | None = None) -> RoundsResult:
    """Train ``model`` from step ``start`` to ``train_config.steps`` in rounds of the dynamic mix (module docstring).

    ``optimizer`` holds exactly the model's trainable parameters and carries over between rounds (on a resume
    its state is loaded from the round's checkpoint).
    """
    from ..training.loop import train

    cfg = train_config
    edges = round_boundaries(start, cfg.steps, config.rounds)
    pools = {s.name: s.train for s in sources}
    seq_per_step = cfg.batch_size * cfg.grad_accum
    t0 = time.perf_counter()
    found = latest_round(checkpoint_root) if resume else None
    first_round = found[0] if found else 0
    state: RoundState | None = found[1] if found else None
    history = list(state.history) if state else []
    log = list(state.log_before) if state else []
    offsets = dict(state.offsets_before) if state else {}
    measured = 0
    tokens = 0  # the last segment's count (each counts from step 0)
    resumed_from = None
    losses: dict[str, float] = {}
    for number in range(first_round, len(edges) - 1):
        s0, s1 = edges[number], edges[number + 1]
        resuming = state is not None and number == first_round
        if not resuming:
            losses = source_losses(model, sources)
            measured += sum(int(s.validation.numel()) for s in sources)
            deltas = degradation(losses, dense)
            weights = sampling_weights(deltas, config.beta)
            _, counts, after = sample_subset(weights, (s1 - s0) * seq_per_step, pools, seed=cfg.seed,
                                             offsets=offsets)
            state = RoundState(round=number, losses=losses, deltas=deltas, weights=weights, counts=counts,
                               offsets_before=offsets, offsets_after=after, history=history, log_before=log)
        assert state is not None
        subset, _, _ = sample_subset(state.weights, (s1 - s0) * seq_per_step, pools, seed=cfg.seed,
                                     offsets=state.offsets_before)
        logger.info("recovery round %d (steps %d-%d): weights %s", number + 1, s0, s1,
                    ", ".join(f"{k}={v:.3f}" for k, v in state.weights.items()))
        res = train(model, subset, config=cfg, loss_fn=loss_fn, hooks=[*hooks, RoundLogFields(number + 1)],
                    accelerator=accelerator, checkpoint_dir=checkpoint_root / f"round-{number:02d}", resume=resuming,
                    stop_after=stop_after, desc=f"recover {number + 1}", run_settings=run_settings,
                    optimizer=optimizer, start_step=s0, end_step=s1, data_start=s0, extra_params=extra_params,
                    extra_state={**(extra_state or {}), "recovery": _json(state)})
        if res.resumed_from is not None:
            resumed_from = res.resumed_from
        log = log + res.log
        tokens = res.tokens_seen
        if res.stopped_early:
            return RoundsResult(log, history, {}, res.steps_done, tokens, time.perf_counter() - t0, resumed_from,
                                True, measured)
        history = history + [{"round": number + 1, "steps": [s0, s1], "sequences": state.counts,
                              "losses_before": state.losses, "deltas_before": state.deltas,
                              "weights": state.weights}]
        offsets = state.offsets_after
        state = None
    final = source_losses(model, sources)
    measured += sum(int(s.validation.numel()) for s in sources)
    return RoundsResult(log, history, final, cfg.steps, tokens, time.perf_counter() - t0, resumed_from, False,
                        measured)


def _json(state: RoundState) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(state)))


__all__ = ["DEFAULT_ROUND_SOURCES", "RoundsConfig", "RoundsResult", "latest_round", "load_round_sources",
           "round_boundaries", "train_rounds"]
