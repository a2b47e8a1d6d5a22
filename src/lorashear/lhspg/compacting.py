"""Cutting each pruning period's structures out of the model as the period ends, while LHSPG trains on.

A committed structure is exactly zero and stays so (LHSPG holds it), so removing it changes no output
(zero-invariance), and every later step of the masked model computes what the smaller model computes, only at
full width. :class:`PeriodCompaction` removes them when their period ends: the model, the LoRA factors and the
optimizer's moments are sliced with the same index maps (:class:`lorashear.compaction.Compactions`), and what
still refers to structures by position follows: the remaining candidates of LHSPG (re-indexed), its hold lists,
and the activation statistics of the data saliency and of explicit transfer. The next period is selected on the
smaller model, so each period's steps cost what its width costs.

A checkpoint stores the compactions so far; a resume replays them on the freshly loaded model, step by step,
before the parameters are restored (:meth:`PeriodCompaction.before_load`), so a run resumed after a compaction
is bit-identical to one that was never stopped. Single process only: every rank would have to cut alike.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from ..compaction import Compactions, slice_optimizer
from ..compute import forward_flops_per_token
from ..errors import CorruptCheckpointError
from ..training.hooks import StepHook
from .hooks import ActivationGram
from .optimizer import LHSPG, _inner
from .transfer import consumer_module

logger = logging.getLogger(__name__)


class PeriodCompaction(StepHook):
    """Cuts LHSPG's committed structures out of ``model`` at every period end (a step hook that LHSPG calls back).

    Args:
        model: the peft LoRA model LHSPG trains (unwrapped).
        lhspg: the LHSPG whose commits trigger the cuts (its ``on_commit`` is set here).
        scorers: the data-saliency scorers (:data:`lorashear.lhspg.hooks.DATA_SCORERS`) to re-index.
        grams: explicit transfer's input statistics, if any.
        probe: token ids (``(batch, len)``) to compare logits on before and after each cut; ``None``: no check.
        seq_len: training sequence length (the forward FLOPs per token recorded at each width).
        min_gain: cut a period's structures only when what they still cost before pruning ends is worth at
            least this many training steps of the current model (their share of its forward FLOPs times the
            pruning steps left); the structures of a period not cut wait, exactly zero, for a later cut, and the
            last period's cut takes all that are left. 0: cut at every period end.

    :attr:`rounds` records every cut: the step from which the smaller model trains, the groups cut out, the
    largest absolute value they held (0: exactly zero), the largest logit difference on ``probe`` and the forward
    FLOPs per token afterwards (LoRA factors left out).
    """

    state_name = "compactions"

    def __init__(self, model: torch.nn.Module, lhspg: LHSPG, *, scorers: Sequence[Any] = (),
                 grams: ActivationGram | None = None, probe: torch.Tensor | None = None, seq_len: int = 1,
                 min_gain: float = 0.0) -> None:
        self.model = model
        self.lhspg = lhspg
        self.scorers = list(scorers)
        self.grams = grams
        self.probe = probe
        self.seq_len = seq_len
        self.min_gain = min_gain
        self.compactions = Compactions(lhspg.candidates)
        self.rounds: list[dict[str, Any]] = []
        lhspg.on_commit = self.compact_committed

    def compact_committed(self) -> None:
        """Cut out every committed structure still in the model (LHSPG calls this when a period ends)."""
        lh = self.lhspg
        pending = [lh.candidates[i] for i in lh.committed if i not in lh.compacted]
        if not pending:
            return
        steps_left = lh.schedule.prune_end - (lh.step_count + 1)
        if steps_left > 0 and self.min_gain > 0:
            gain = self.pending_share(pending) * steps_left
            if gain < self.min_gain:
                logger.debug("step %d: %d structures wait (gain %.2f < %.2f)", lh.step_count + 1, len(pending),
                             gain, self.min_gain)
                return
        ids = [g.id for g in pending]
        biggest = lh.committed_max_abs()  # 0: LHSPG set and held them at exactly zero
        diff = self._cut(ids, verify=self.probe is not None)
        self.rounds.append({"step": lh.step_count + 1, "groups": ids, "max_abs": biggest, "logit_diff": diff,
                            "flops_per_token": forward_flops_per_token(self.model, self.seq_len)})
        logger.info("step %d: %d structures cut out (%d so far)%s", lh.step_count + 1, len(ids),
                    len(lh.compacted), "" if diff is None else f", max |logit difference| {diff:.2e}")

    def pending_share(self, pending: Sequence[Any]) -> float:
        """The share of the current model's forward FLOPs per token that ``pending`` groups' weights take (2 FLOPs
        per weight of theirs that a token multiplies, LoRA factors left out; an upper bound where groups overlap)."""
        weights = sum(g.base_params for g in pending)
        return 2.0 * weights / forward_flops_per_token(self.model, self.seq_len)

    @torch.no_grad()
    def _cut(self, ids: list[int], *, verify: bool) -> float | None:
        model = self.model
        was_training = model.training
        before = None
        if verify:
            model.eval()
            before = model(input_ids=self.probe).logits.float().cpu()
        step = self.compactions.apply(model, ids)
        slice_optimizer(_inner(self.lhspg.optimizer), step.replacements)
        self.lhspg.rebind(self.compactions.positions, self.compactions.removed)
        for scorer in self.scorers:
            scorer.rebind(model, step.kept)
        if self.grams is not None:
            for name, dims in step.kept.items():
                if 1 in dims:
                    self.grams.cut_inputs(consumer_module(name), dims[1])
        diff = None
        if before is not None:
            diff = float((model(input_ids=self.probe).logits.float().cpu() - before).abs().max())
        model.train(was_training)
        return diff

    @property
    def max_logit_diff(self) -> float | None:
        diffs = [r["logit_diff"] for r in self.rounds if r["logit_diff"] is not None]
        return max(diffs) if diffs else None

    def state_dict(self) -> dict[str, Any]:
        return {"rounds": [dict(r) for r in self.rounds]}

    def before_load(self, state: dict[str, Any]) -> None:
        """Replay the checkpoint's compactions that this model has not had yet (before its parameters load)."""
        rounds = list(state["rounds"])
        done = self.compactions.rounds
        if [list(r["groups"]) for r in rounds[:len(done)]] != done:
            raise CorruptCheckpointError("the checkpoint's compactions do not continue this model's; "
                                         "start over with --force")
        for r in rounds[len(done):]:
            self._cut([int(i) for i in r["groups"]], verify=False)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rounds = [dict(r) for r in state["rounds"]]


__all__ = ["PeriodCompaction"]
