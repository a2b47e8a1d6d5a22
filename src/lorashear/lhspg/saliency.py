"""Group saliency: which groups LHSPG moves to the redundant set (paper Alg. 4, line 5).

For group ``g`` with base slices ``W_g`` and LoRA update ``U_g = (s B A)_g``
(which stands in for the gradient), five criteria, each normalised by its L2
norm over the candidate groups of a cluster and weighted by a user coefficient:

======================  ===============================
``magnitude``           ``||W_g||``
``avg_magnitude``       ``||W_g|| / size_g``
``cosine``              ``cos(W_g, U_g) + 1`` (``1`` where a norm is 0)
``taylor_first``        ``|<W_g, U_g>|``
``taylor_second``       ``0.5 <W_g, U_g>^2``
======================  ===============================

Low saliency = pruned first. :func:`group_statistics` computes the four sums every
criterion is built from (``||W||^2``, ``size``, ``<W,U>``, ``||U||^2``) for many
groups at once; :func:`criteria` turns them into the table above and
:func:`saliency` combines them. :func:`criteria_from_tensors` is the plain
reference for one group given as flat tensors.

The criteria are registries: a new weight criterion is one ``@weight_criterion("name")`` function of
:class:`GroupStatistics`; a criterion measured from activations during training is one
``data_criterion("name", source)`` line plus the step hook that supplies its values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .tables import LoraInfo, SliceTable, gather, lora_rows


@dataclass
class GroupStatistics:
    """Per-group sums over the base slices, each of shape (num_groups,), fp64."""

    norm_sq: torch.Tensor  # ||W_g||^2
    size: torch.Tensor  # number of base elements
    dot: torch.Tensor  # <W_g, U_g>
    update_norm_sq: torch.Tensor  # ||U_g||^2


@torch.no_grad()
def group_statistics(table: SliceTable, params: Mapping[str, torch.Tensor],
                     loras: Mapping[str, LoraInfo]) -> GroupStatistics:
    """The sums behind every criterion for all groups of ``table`` (one gather per weight)."""
    n = len(table)
    device = next(iter(params.values())).device if params else torch.device("cpu")
    z = lambda: torch.zeros(n, dtype=torch.float64, device=device)  # noqa: E731
    norm_sq, size, dot, unorm = z(), z(), z(), z()
    for e in table.base_entries:
        p = params[e.name]
        x = gather(p, e.dim, e.idx)  # (k, rest)
        gid = e.gid.to(x.device)
        norm_sq.index_add_(0, gid, (x * x).sum(1).double())
        size.index_add_(0, gid, torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device))
        u = lora_rows(loras.get(e.name), e.dim, e.idx, p.dim())
        if u is not None:
            dot.index_add_(0, gid, (x * u).sum(1).double())
            unorm.index_add_(0, gid, (u * u).sum(1).double())
    return GroupStatistics(norm_sq, size, dot, unorm)


#: a criterion computed from the weights and the LoRA update: per-group values (fp64) from the sums
WeightCriterion = Callable[[GroupStatistics], torch.Tensor]
#: weight criteria by name, in registration order (the order saliency sums them in)
WEIGHT_CRITERIA: dict[str, WeightCriterion] = {}
#: criteria computed from activations during training, by name -> what supplies their values
DATA_CRITERIA: dict[str, str] = {}


def weight_criterion(name: str) -> Callable[[WeightCriterion], WeightCriterion]:
    """Register a weight criterion under ``name``."""
    def register(fn: WeightCriterion) -> WeightCriterion:
        WEIGHT_CRITERIA[name] = fn
        return fn
    return register


def data_criterion(name: str, source: str) -> None:
    """Register a criterion whose values a step hook measures during training (``source`` names it)."""
    DATA_CRITERIA[name] = source


def known_criteria() -> tuple[str, ...]:
    """Every criterion a saliency weight may name."""
    return (*WEIGHT_CRITERIA, *DATA_CRITERIA)


@weight_criterion("magnitude")
def _magnitude(stats: GroupStatistics) -> torch.Tensor:
    return stats.norm_sq.clamp_min(0).sqrt()


@weight_criterion("avg_magnitude")
def _avg_magnitude(stats: GroupStatistics) -> torch.Tensor:
    return _magnitude(stats) / stats.size.clamp_min(1)


@weight_criterion("cosine")
def _cosine(stats: GroupStatistics) -> torch.Tensor:
    denom = _magnitude(stats) * stats.update_norm_sq.clamp_min(0).sqrt()
    cos = torch.where(denom > 0, stats.dot / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return cos.clamp(-1, 1) + 1


@weight_criterion("taylor_first")
def _taylor_first(stats: GroupStatistics) -> torch.Tensor:
    return stats.dot.abs()


@weight_criterion("taylor_second")
def _taylor_second(stats: GroupStatistics) -> torch.Tensor:
    return 0.5 * stats.dot**2


data_criterion("fisher", "lorashear.lhspg.hooks.ActivationFisher (activation Fisher of each structure's removal)")
data_criterion("fluctuation", "lorashear.lhspg.hooks.ActivationFluctuation (FLAP's fluctuation: variance of the "
                              "consumer's input column times its weight column's squared norm)")

#: the paper's five criteria (the order of a sequence of weights)
CRITERIA: tuple[str, ...] = ("magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second")


def criteria(stats: GroupStatistics) -> dict[str, torch.Tensor]:
    """Every registered weight criterion per group (fp64)."""
    return {name: fn(stats) for name, fn in WEIGHT_CRITERIA.items()}


def criteria_from_tensors(weight: torch.Tensor, update: torch.Tensor) -> dict[str, float]:
    """Reference criteria for one group: ``weight`` = W_g, ``update`` = U_g (any equal shapes)."""
    w, u = weight.double().flatten(), update.double().flatten()
    stats = GroupStatistics(norm_sq=(w @ w).reshape(1), size=torch.tensor([float(w.numel())], dtype=torch.float64),
                            dot=(w @ u).reshape(1), update_norm_sq=(u @ u).reshape(1))
    return {k: float(v[0]) for k, v in criteria(stats).items()}


def saliency(raw: Mapping[str, torch.Tensor], weights: Mapping[str, float] | Sequence[float],
             clusters: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted sum of the criteria, each divided by its L2 norm within its cluster.

    Args:
        raw: criterion name -> per-group values (:func:`criteria`, plus data criteria such as ``fisher``).
        weights: coefficient per criterion name (or a sequence in :data:`CRITERIA` order).
        clusters: (num_groups,) integer cluster id per group; ``None`` = one cluster.
    """
    if not isinstance(weights, Mapping):
        weights = dict(zip(CRITERIA, weights, strict=True))
    missing = [name for name, w in weights.items() if w and name not in raw]
    if missing:
        raise ValueError(f"no values for saliency criteria {missing}")
    n = next(iter(raw.values())).numel()
    cl = clusters if clusters is not None else torch.zeros(n, dtype=torch.long)
    cl = cl.to(next(iter(raw.values())).device)
    num = int(cl.max()) + 1 if n else 0
    score = torch.zeros(n, dtype=torch.float64, device=cl.device)
    for name in known_criteria():
        w = float(weights.get(name, 0.0))
        if w == 0.0:
            continue
        c = raw[name].to(score.device, torch.float64)
        norms = torch.zeros(num, dtype=torch.float64, device=c.device).index_add_(0, cl, c * c).sqrt()
        denom = norms[cl]
        score += w * torch.where(denom > 0, c / denom.clamp_min(1e-300), torch.zeros_like(c))
    return score
