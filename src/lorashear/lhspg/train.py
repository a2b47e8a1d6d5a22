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
from .hooks import DATA_SCORERS, ActivationGram, LHSPGHook
from .optimizer import LHSPG, LHSPGConfig
from .targets import TargetPlan


@dataclass
class LHSPGTrainResult(TrainResult):
    """:class:`~lorashear.training.loop.TrainResult` with the LHSPG that pruned (its committed groups)."""

    lhspg: LHSPG | None = None


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
) -> LHSPGTrainResult:
    """Train with LHSPG until ``plan`` is reached (masked model, in place): :func:`train` + :class:`LHSPGHook`.

    ``groups`` are named on ``model``'s parameters; ``exclude`` are group ids never to prune.
    The committed groups of ``result.lhspg`` are exactly zero in ``model``. ``end_step``: stop there (e.g. when
    pruning ends, to compact the model and train on at its new width).
    """
    from accelerate.utils import broadcast_object_list

    cfg = train_config or TrainConfig()
    lcfg = (lhspg_config or LHSPGConfig()).resolve(cfg.steps)
    if lcfg.schedule.prune_end > cfg.steps:
        raise ConfigError(f"pruning ends at step {lcfg.schedule.prune_end} but only {cfg.steps} steps are planned")
    if accelerator is None:
        accelerator = make_accelerator(cfg.mixed_precision)
    box: dict[str, LHSPG] = {}

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
        box["lhspg"] = LHSPG(unwrapped, groups, optimizer, plan=plan, config=lcfg, exclude=excluded,
                             broadcast=broadcast, data_scores=scorers, grams=grams)
        made.append(LHSPGHook(box["lhspg"]))
        return made

    result = train(model, data, config=cfg, loss_fn=loss_fn, hooks=hooks, make_hooks=make, accelerator=accelerator,
                   checkpoint_dir=checkpoint_dir, resume=resume, stop_after=stop_after, desc="prune",
                   run_settings=run_settings, end_step=end_step)
    fields = {f.name: getattr(result, f.name) for f in dataclasses.fields(TrainResult)}
    return LHSPGTrainResult(**fields, lhspg=box["lhspg"])


__all__ = ["LHSPGTrainResult", "train_lhspg"]
