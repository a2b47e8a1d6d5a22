"""When LHSPG prunes: warm-up, ``P`` pruning periods of ``T_p`` steps, then fine-tuning.

Steps are counted from 0 (the index of the optimizer step just taken)::

    steps   0 .. T_w-1                     warm-up (LoRA training only)
    steps   T_w + p*T_p .. T_w+(p+1)*T_p-1 pruning period p (p = 0 .. P-1)
    steps   T_w + P*T_p ..                 LoRA training with the pruned groups held at 0

Inside period ``p`` the step at position ``t`` (0 .. T_p-1) decays each redundant
group by ``1 / (T_p - t)`` of its current norm, so at ``t = T_p - 1`` the group
is exactly zero. Groups for period ``p`` are selected at the boundary before its
first step (see :class:`~lorashear.lhspg.optimizer.LHSPG`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError


def split_quota(total: int, periods: int) -> list[int]:
    """``floor(total / periods)`` per period, the remainder added to the last one."""
    if periods <= 0:
        raise ConfigError(f"the number of pruning periods must be positive, got {periods}")
    if total < 0:
        raise ConfigError(f"a pruning quota cannot be negative, got {total}")
    base = total // periods
    quotas = [base] * periods
    quotas[-1] += total - base * periods
    return quotas


def period_quotas(total: int, periods: int, shape: str = "even") -> list[int]:
    """Structures to remove in each period: ``even`` (:func:`split_quota`, the paper's) or ``front``.

    ``front`` removes more early, while the model still has the most capacity to take over what
    the removed structures did: the cumulative count after period ``p`` is
    ``round(total * (1 - (1 - (p + 1) / periods) ** 3))`` (the cubic schedule of gradual pruning),
    so every period's share is rounded and the last period gets no pile-up.
    """
    if shape == "even":
        return split_quota(total, periods)
    if shape != "front":
        raise ConfigError(f"unknown quota shape {shape!r}; use even or front")
    if periods <= 0:
        raise ConfigError(f"the number of pruning periods must be positive, got {periods}")
    cumulative = [round(total * (1.0 - (1.0 - (p + 1) / periods) ** 3)) for p in range(periods)]
    cumulative[-1] = total
    return [c - (cumulative[i - 1] if i else 0) for i, c in enumerate(cumulative)]


@dataclass(frozen=True)
class PruningSchedule:
    """Warm-up length, number of pruning periods and their length, in optimizer steps."""

    warmup_steps: int
    num_periods: int
    period_steps: int

    def __post_init__(self) -> None:
        if self.warmup_steps < 0:
            raise ConfigError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.num_periods < 1:
            raise ConfigError(f"num_periods must be >= 1, got {self.num_periods}")
        if self.period_steps < 1:
            raise ConfigError(f"period_steps must be >= 1, got {self.period_steps}")

    @classmethod
    def for_budget(cls, total_steps: int, num_periods: int = 10, *, warmup_fraction: float = 0.1,
                   prune_end_fraction: float = 0.7) -> "PruningSchedule":
        """Size ``T_w`` and ``T_p`` so pruning ends at about ``prune_end_fraction`` of ``total_steps``."""
        if total_steps < num_periods + 1:
            raise ConfigError(f"{total_steps} steps are too few for {num_periods} pruning periods "
                              f"(need at least {num_periods + 1}); raise --steps or lower --num-periods")
        warmup = max(1, round(warmup_fraction * total_steps))
        end = max(warmup + num_periods, round(prune_end_fraction * total_steps))
        period = max(1, (min(end, total_steps) - warmup) // num_periods)
        return cls(warmup, num_periods, period)

    @property
    def prune_end(self) -> int:
        """First step after the last pruning period."""
        return self.warmup_steps + self.num_periods * self.period_steps

    def position(self, step: int) -> tuple[int, int] | None:
        """``(period, t)`` for a step inside a pruning period, else ``None``."""
        if step < self.warmup_steps or step >= self.prune_end:
            return None
        offset = step - self.warmup_steps
        return offset // self.period_steps, offset % self.period_steps

    def period_starting_at(self, step: int) -> int | None:
        """The period whose first step is ``step``, if any."""
        pos = self.position(step)
        return pos[0] if pos is not None and pos[1] == 0 else None

    def period_ending_at(self, step: int) -> int | None:
        """The period whose last step is ``step``, if any."""
        pos = self.position(step)
        return pos[0] if pos is not None and pos[1] == self.period_steps - 1 else None
