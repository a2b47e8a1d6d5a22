"""Training with LHSPG: the training loop (:func:`lorashear.training.loop.train`) with LHSPG's hooks, until
the target plan is reached (masked model, in place)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..graph.groups import Group
from ..training.hooks import StepHook
from ..training.loop import TrainConfig, TrainResult, make_accelerator, train
from ..training.losses import LossFn, lm_loss
from .compacting import PeriodCompaction
from .hooks import DATA_SCORERS, ActivationGram, LHSPGHook
from .optimizer import LHSPG, LHSPGConfig
from .targets import TargetPlan


@dataclass
class LHSPGTrainResult(TrainResult):
    """:class:`~lorashear.training.loop.TrainResult` with the LHSPG that pruned (its committed groups)."""

    lhspg: LHSPG | None = None
    #: the cuts made at every period end (``compact_periods``), else None
    compaction: PeriodCompaction | None = None


def train_lhspg(
    model: torch.nn.Module,
    groups: Sequence[Group],
    plan: TargetPlan,
    data: torch.Tensor,
    *,
    train_config: TrainConfig | None = None,
    lhspg_config: LHSPGConfig | None = None,
    exclude: Iterable[int] = (),
    loss_fn: LossFn = lm_loss,
    hooks: Sequence[StepHook] = (),
    checkpoint_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    accelerator: Any = None,
    stop_after: int | None = None,
    run_settings: dict[str, Any] | None = None,
    end_step: int | None = None,
    compact_periods: bool = False,
    compact_min_gain: float = 0.0,
    probe: torch.Tensor | None = None,
) -> LHSPGTrainResult:
    """Train with LHSPG until ``plan`` is reached (masked model, in place): :func:`train` + :class:`LHSPGHook`.

    ``groups`` are named on ``model``'s parameters; ``exclude`` are group ids never to prune.
    The committed groups of ``result.lhspg`` are exactly zero in ``model``. ``end_step``: stop there (e.g. when
    pruning ends, to compact the model and train on at its new width). ``compact_periods``: cut each period's
    structures out of the model as the period ends (:class:`~lorashear.lhspg.compacting.PeriodCompaction`; single
    process), checking the logits on ``probe`` at each cut when it is given; the model is then smaller in place.
    ``compact_min_gain``: a period's cut waits until it is worth that many training steps (``PeriodCompaction``).
    """
    from accelerate.utils import broadcast_object_list

    cfg = train_config or TrainConfig()
    lcfg = (lhspg_config or LHSPGConfig()).resolve(cfg.steps)
    if lcfg.schedule.prune_end > cfg.steps:
        raise ConfigError(f"pruning ends at step {lcfg.schedule.prune_end} but only {cfg.steps} steps are planned")
    if accelerator is None:
        accelerator = make_accelerator(cfg.mixed_precision)
    if compact_periods and accelerator.num_processes > 1:
        raise ConfigError("cutting structures out at every period end is single-process only; "
                          "compact after the last step under several processes")
    box: dict[str, Any] = {}

    def broadcast(chosen: list[int]) -> list[int]:
        if accelerator.num_processes == 1:
            return chosen
        holder = [chosen]
        broadcast_object_list(holder, from_process=0)
        return holder[0]

    excluded = set(exclude)

    def make(unwrapped: torch.nn.Module, optimizer: Any) -> list[StepHook]:
        made: list[StepHook] = []
        scorers = {}
        if lcfg.uses_data:
            scored = [g for g in groups if g.prunable and g.kind in plan.counts and g.id not in excluded]
            scorers = {name: DATA_SCORERS[name](unwrapped, scored, decay=lcfg.fisher_decay)
                       for name in lcfg.data_criteria}
            made.extend(scorers.values())
        grams = None
        if lcfg.transfer:
            pruned = [g for g in groups if g.prunable and g.kind in plan.counts and g.id not in excluded]
            grams = ActivationGram.for_groups(unwrapped, pruned, decay=lcfg.fisher_decay,
                                              token_stride=lcfg.transfer_token_stride)
            made.append(grams)
        lh = box["lhspg"] = LHSPG(unwrapped, groups, optimizer, plan=plan, config=lcfg, exclude=excluded,
                                  broadcast=broadcast, data_scores=scorers, grams=grams)
        made.append(LHSPGHook(lh))
        if compact_periods:
            box["compaction"] = PeriodCompaction(unwrapped, lh, scorers=list(scorers.values()), grams=grams,
                                                 probe=probe, seq_len=data.shape[1], min_gain=compact_min_gain)
            made.append(box["compaction"])
        return made

    result = train(model, data, config=cfg, loss_fn=loss_fn, hooks=hooks, make_hooks=make, accelerator=accelerator,
                   checkpoint_dir=checkpoint_dir, resume=resume, stop_after=stop_after, desc="prune",
                   run_settings=run_settings, end_step=end_step)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(TrainResult)}
    return LHSPGTrainResult(**fields, lhspg=box["lhspg"], compaction=box.get("compaction"))


__all__ = ["LHSPGTrainResult", "train_lhspg"]
