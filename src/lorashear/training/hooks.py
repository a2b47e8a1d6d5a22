"""Step hooks of the training loop: the :class:`StepHook` interface and the general hooks (the loss parts in
the step log, a KL share set by the step). LHSPG's own hooks (its update, the activation statistics it
scores and transfers by) live in :mod:`lorashear.lhspg.hooks`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any

from .losses import KLShare

logger = logging.getLogger(__name__)


class StepHook:
    """Something the loop calls at fixed points of every step; override what you need."""

    #: name of the hook's state in checkpoints (hooks without state leave it None)
    state_name: str | None = None

    def before_micro_batch(self, step: int, micro: int) -> None:
        """Before the forward pass of micro-batch ``micro`` of optimizer step ``step`` (0-based)."""

    def after_optimizer_step(self, step: int) -> None:
        """After the optimizer step ``step`` (0-based), before the scheduler step and ``zero_grad``."""

    def log_fields(self) -> dict[str, Any]:
        """Extra fields for the step log (and the progress bar's ``progress_fields``)."""
        return {}

    def progress_fields(self) -> dict[str, str]:
        return {}

    def mutable_parameter_names(self) -> Iterable[str]:
        """Parameters this hook changes besides the trainable ones (checkpointed)."""
        return ()

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # A hook that changes the shapes of the model's parameters (cutting structures out while training) also
    # defines ``before_load(state)``: a resume calls it with the checkpointed state before the parameters are
    # restored, so the model takes the checkpoint's shapes first (:class:`lorashear.lhspg.compacting.PeriodCompaction`).

    def close(self) -> None:
        """Called once when training ends (remove module hooks here)."""


class LossPartsLog(StepHook):
    """Cross-entropy and KL of each step (from :class:`~lorashear.training.losses.LossParts`) in the step log."""

    def __init__(self, parts: Any) -> None:
        self.parts = parts

    def before_micro_batch(self, step: int, micro: int) -> None:
        if micro == 0:
            self.parts.reset()

    def log_fields(self) -> dict[str, Any]:
        return self.parts.fields()


def share_at(points: Sequence[tuple[int, float]], step: int) -> float:
    """The share of a piecewise-constant schedule ``(first step, share)`` (in step order, from step 0) at ``step``."""
    return [w for s, w in points if s <= step][-1]


class KLShareSwitch(StepHook):
    """Sets a distillation loss's KL share by the step, piecewise constant: ``shares`` lists
    ``(first step, share)`` in step order, the first from step 0 (e.g. the warm-up, the pruning periods and
    the steps after them).

    Stateless: the share is a function of the step, so a resumed run sets the same one.
    """

    def __init__(self, share: KLShare, shares: Sequence[tuple[int, float]]) -> None:
        points = [(int(s), float(w)) for s, w in shares]
        if not points or points[0][0] != 0 or any(a[0] > b[0] for a, b in zip(points, points[1:])):
            raise ValueError(f"KL shares must start at step 0 and go in step order, got {points}")
        self.share, self.points = share, points

    def before_micro_batch(self, step: int, micro: int) -> None:
        self.share.value = share_at(self.points, step)

    def log_fields(self) -> dict[str, Any]:
        return {"kl_share": self.share.value}


__all__ = ["KLShareSwitch", "LossPartsLog", "StepHook", "share_at"]
