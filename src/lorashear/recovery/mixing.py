"""The dynamic data adaptor (paper Alg. 5): degradation per source -> sampling weights -> a subset.

With ``L_s`` the validation loss on source ``s``::

    Delta_s = max(L_s(pruned) - L_s(dense), 0)
    w_s     = (1 - beta) * Delta_s / sum_t Delta_t + beta / |S|      (uniform when every Delta_s is 0)

Worked example, ``beta = 0.3``, ``Delta = (3, 1, 0)``: ``w = (0.7*3/4 + 0.1, 0.7*1/4 + 0.1, 0.1)
= (0.625, 0.275, 0.1)``; a round of 40 sequences takes 25, 11 and 4 of them
(:func:`allocate`: largest remainders). Sources are read through a seeded permutation each, from
where the previous round stopped (:func:`sample_subset`), so rounds see new sequences until a
source's pool is used up, then its next permutation.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from ..errors import ConfigError


def degradation(pruned: Mapping[str, float], dense: Mapping[str, float]) -> dict[str, float]:
    """``Delta_s = max(L_s(pruned) - L_s(dense), 0)`` for every source of ``pruned``."""
    missing = [s for s in pruned if s not in dense]
    if missing:
        raise ConfigError(f"no dense loss for source {missing[0]!r}")
    return {s: max(float(pruned[s]) - float(dense[s]), 0.0) for s in pruned}


def sampling_weights(deltas: Mapping[str, float], beta: float) -> dict[str, float]:
    """``w_s = (1 - beta) Delta_s / sum(Delta) + beta / |S|`` (uniform when every ``Delta_s`` is 0)."""
    if not deltas:
        raise ConfigError("sampling weights need at least one source")
    if not 0.0 <= beta <= 1.0:
        raise ConfigError(f"beta must be in [0, 1], got {beta}")
    if any(d < 0 or not math.isfinite(d) for d in deltas.values()):
        raise ConfigError(f"degradations must be finite and >= 0, got {dict(deltas)}")
    n = len(deltas)
    total = sum(deltas.values())
    if total == 0:
        return {s: 1.0 / n for s in deltas}
    return {s: (1.0 - beta) * d / total + beta / n for s, d in deltas.items()}


def allocate(weights: Mapping[str, float], total: int) -> dict[str, int]:
    """Split ``total`` sequences in proportion to ``weights`` (largest remainders; ties by source order)."""
    if total < 0:
        raise ConfigError(f"cannot allocate {total} sequences")
    norm = sum(weights.values())
    if norm <= 0:
        raise ConfigError("sampling weights must sum to a positive number")
    exact = {s: total * w / norm for s, w in weights.items()}
    counts = {s: math.floor(x) for s, x in exact.items()}
    order = sorted(weights, key=lambda s: (-(exact[s] - counts[s]), list(weights).index(s)))
    for s in order[: total - sum(counts.values())]:
        counts[s] += 1
    return counts


def _source_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + int(hashlib.sha256(name.encode("utf-8")).hexdigest()[:12], 16)) % (2**63)


def draw(pool_size: int, name: str, start: int, count: int, *, seed: int) -> list[int]:
    """Positions ``start .. start + count`` of source ``name``'s stream of pool indices: one seeded
    permutation of the pool after another (a pure function of its arguments)."""
    if pool_size < 1:
        raise ConfigError(f"source {name!r} has no training sequences")
    out: list[int] = []
    epoch, perm = -1, None
    for pos in range(start, start + count):
        e, offset = divmod(pos, pool_size)
        if e != epoch:
            gen = torch.Generator().manual_seed(_source_seed(seed, name) + e)
            epoch, perm = e, torch.randperm(pool_size, generator=gen)
        out.append(int(perm[offset]))  # type: ignore[index]
    return out


def sample_subset(weights: Mapping[str, float], num_sequences: int, pools: Mapping[str, torch.Tensor], *,
                  seed: int, offsets: Mapping[str, int] | None = None
                  ) -> tuple[torch.Tensor, dict[str, int], dict[str, int]]:
    """One round's training subset: ``num_sequences`` sequences drawn from ``pools`` by ``weights``.

    Args:
        weights: source -> sampling weight.
        num_sequences: sequences in the subset.
        pools: source -> its training sequences ``(N_s, seq_len)``.
        seed: the run's seed.
        offsets: source -> sequences already drawn from it in earlier rounds (default none).

    Returns:
        ``(subset (num_sequences, seq_len), counts per source, offsets after this round)``;
        deterministic in its arguments.
    """
    offsets = dict(offsets or {})
    counts = allocate(weights, num_sequences)
    parts: list[torch.Tensor] = []
    after = dict(offsets)
    for name, n in counts.items():
        if n == 0:
            continue
        pool = pools[name]
        start = offsets.get(name, 0)
        parts.append(pool[draw(pool.shape[0], name, start, n, seed=seed)])
        after[name] = start + n
    if not parts:
        raise ConfigError("a round needs at least one training sequence")
    return torch.cat(parts), counts, after  # (num_sequences, seq_len)


def improvement(before: float, after: float) -> float:
    """Relative improvement of the largest degradation: ``(before - after) / before`` (0 when ``before`` is 0)."""
    return (before - after) / before if before > 0 else 0.0


__all__ = ["allocate", "degradation", "draw", "improvement", "sample_subset", "sampling_weights"]

