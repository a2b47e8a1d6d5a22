"""LHSPG: LoRA Half-Space Projected Gradient (paper Alg. 4), as an optimizer wrapper.

Wrap the optimizer of a peft LoRA model's trainable factors::

    inner = torch.optim.AdamW(lora_params, lr=2e-4)
    opt = LHSPG(model, graph.prunable(), inner, plan=plan, config=LHSPGConfig(...))
    for batch in data:
        loss = model(**batch).loss
        loss.backward()
        opt.step()          # inner.step(), then the LHSPG update of the base weights
        opt.zero_grad()

or keep your optimizer and call :meth:`LHSPG.post_step` after each of its steps
(the "step hook" form). Learning-rate schedulers attach to the inner optimizer.

What one call of :meth:`post_step` does at optimizer step ``k`` (see
:class:`~lorashear.lhspg.schedule.PruningSchedule` for the timeline):

1. **Progressive forgetting** (inside a period, position ``t``) of every group
   ``g`` of the current redundant set::

       x~_g = [x + s B A]_g - lambda_g [x]_g / ||[x]_g||,  lambda_g = ||[x]_g|| / (T_p - t)
            = (1 - 1/(T_p - t)) [x]_g + [s B A]_g

   then the half-space projection ``x~_g = 0`` if ``<x~_g, x_g> < eps ||x_g||^2``
   (also when ``x_g`` is already 0 [ours]: a group that reached zero stays there);
   the LoRA part just folded is zeroed: **rows of lora_B** for slices on output
   rows (q/k/v/gate/up rows), **columns of lora_A** for slices on input columns
   (o_proj/down_proj columns) — ``s B A[:, j]`` is exactly the contribution of
   column ``j`` of ``A``, so adding it to ``x[:, j]`` and zeroing ``A[:, j]`` leaves
   the effective weight ``W = x + s B A`` unchanged. At the period's last step
   (``T_p - t = 1``) the decay takes all of ``x_g`` and the group is set to
   exactly 0 (the update of that one step is dropped with it [ours]); the group is
   then *committed*.
2. Committed groups are held at exactly zero (base and LoRA slices).
3. At a period boundary, the next period's redundant groups are selected by
   saliency (lowest first, per kind, quota ``floor(K/P)``, remainder to the last
   period). Selection uses the LoRA update accumulated so far, so it runs
   *before* the merge below [ours].
4. At a period's end, ``s B A`` is merged into ``x`` for every LoRA layer (the
   redundant/committed parts are already 0 there), ``B`` is reset to 0 (``A`` is
   kept, as after peft's own init) and the inner optimizer's state for both
   factors is cleared: the LoRA restarts from the merged point with the
   effective weights unchanged.

All group arithmetic is vectorised per weight through
:class:`~lorashear.lhspg.tables.SliceTable`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch

from ..errors import ConfigError
from ..graph.groups import Group
from .saliency import CRITERIA, DATA_CRITERIA, criteria, group_statistics, known_criteria, saliency
from .schedule import PruningSchedule, period_quotas
from .tables import LoraInfo, Positions, SliceTable, find_loras, gather, lora_rows, scatter
from .targets import TargetPlan, layer_rounding
from .transfer import GramSource, consumer_module, kept_columns, transfer_matrix

logger = logging.getLogger(__name__)


SaliencySpec = tuple[str, ...]
PAPER_SALIENCY: SaliencySpec = CRITERIA  # the paper's five criteria, equal weights


def parse_saliency(spec: Sequence[str]) -> dict[str, float]:
    """``("magnitude=1", "fisher")`` -> ``{"magnitude": 1.0, "fisher": 1.0}`` (criteria by name)."""
    known = known_criteria()
    out: dict[str, float] = {}
    for item in spec:
        name, _, weight = str(item).partition("=")
        name = name.strip()
        if name not in known:
            raise ConfigError(f"unknown saliency criterion {name!r}; choose from {', '.join(known)}")
        try:
            w = float(weight) if weight.strip() else 1.0
        except ValueError as exc:
            raise ConfigError(f"saliency weight of {name} must be a number, got {weight!r}") from exc
        if w < 0:
            raise ConfigError(f"saliency weight of {name} must be >= 0, got {w}")
        out[name] = out.get(name, 0.0) + w
    if not any(out.values()):
        raise ConfigError("saliency needs at least one criterion with a positive weight")
    return out


@dataclass
class LHSPGConfig:
    """Settings of the LHSPG optimizer: schedule, saliency and allocation."""

    warmup_steps: int | None = field(default=None, metadata={
        "help": "LoRA-only steps before the first pruning period T_w (default: --warmup-fraction of the steps)"})
    num_periods: int = field(default=10, metadata={"help": "number of pruning periods (P)"})
    period_steps: int | None = field(default=None, metadata={
        "help": "optimizer steps per pruning period T_p (default: pruning ends at --prune-end of the steps)"})
    warmup_fraction: float = field(default=0.1, metadata={
        "help": "warm-up length as a fraction of the steps, when --warmup-steps is unset"})
    prune_end: float = field(default=0.7, metadata={
        "help": "fraction of the steps at which pruning ends, when --period-steps is unset"})
    quota: Literal["even", "front"] = field(default="even", metadata={
        "help": "structures removed per period: even = floor(K/P) with the remainder in the last period "
                "(paper); front = front-loaded (cumulative 1-(1-p/P)^3), every period's share rounded"})
    epsilon: float = field(default=0.0, metadata={
        "help": "half-space projection threshold: zero a fading group once <x~,x> < epsilon ||x||^2"})
    saliency: tuple[str, ...] = field(default=PAPER_SALIENCY, metadata={
        "help": "saliency criteria as NAME or NAME=WEIGHT: magnitude, avg_magnitude, cosine, taylor_first, "
                "taylor_second (weights and LoRA update), fisher (activation Taylor/Fisher from the "
                "training steps' own forward and backward passes) and fluctuation (FLAP's input-variance x "
                "weight-norm metric from their forward passes)"})
    fisher_decay: float = field(default=0.5, metadata={
        "help": "data saliency (fisher, fluctuation): weight of earlier periods' statistics at each selection "
                "(0 = newest only)"})
    allocation: Literal["global", "layer"] = field(default="global", metadata={
        "help": "global = rank each kind across all layers (paper); layer = divide each score by the mean "
                "score of its layer first, so every layer loses about the same share"})
    min_keep: float = field(default=0.0, metadata={
        "help": "each layer keeps at least this fraction of each kind's structures (and always one)"})
    merge_at_period_end: bool = field(default=True, metadata={
        "help": "merge s*B*A into the base weights at each period's end and restart the LoRA factors"})
    reset_optimizer_state: bool = field(default=True, metadata={
        "help": "clear the optimizer state of the LoRA factors when they restart"})
    transfer: bool = field(default=False, metadata={
        "help": "explicit transfer: while a structure fades, move what its consumer (down_proj / o_proj) "
                "columns lose into the kept columns by least squares on the consumer's input statistics, "
                "gathered during the training steps (off in both recipes: at 400 steps on the reference model "
                "it raised held-out perplexity by 3.19, benchmarks/results/quality_smollm2.md)"})
    transfer_damp: float = field(default=0.01, metadata={
        "help": "explicit transfer: ridge damping, as a fraction of the mean diagonal of the kept columns' Gram"})
    transfer_token_stride: int = field(default=8, metadata={
        "help": "explicit transfer: the input statistics use every N-th token of each training batch "
                "(1 = all; the Gram hooks cost about 1/N of their full price)"})

    def __post_init__(self) -> None:
        if isinstance(self.saliency, str):
            self.saliency = tuple(p.strip() for p in self.saliency.split(",") if p.strip())
        self.saliency = tuple(self.saliency)
        parse_saliency(self.saliency)
        if self.epsilon < 0:
            raise ConfigError(f"epsilon must be >= 0, got {self.epsilon}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ConfigError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if not self.warmup_fraction < self.prune_end <= 1.0:
            raise ConfigError(f"prune_end must be in (warmup_fraction, 1], got {self.prune_end}")
        if not 0.0 <= self.fisher_decay <= 1.0:
            raise ConfigError(f"fisher_decay must be in [0, 1], got {self.fisher_decay}")
        if not 0.0 <= self.min_keep < 1.0:
            raise ConfigError(f"min_keep must be in [0, 1), got {self.min_keep}")
        if self.transfer_token_stride < 1:
            raise ConfigError(f"transfer_token_stride must be >= 1, got {self.transfer_token_stride}")
        if not self.transfer_damp > 0:
            raise ConfigError(f"transfer_damp must be > 0, got {self.transfer_damp}")
        if self.warmup_steps is not None and self.period_steps is not None:
            self.schedule  # validates the step counts

    @property
    def saliency_weights(self) -> dict[str, float]:
        return parse_saliency(self.saliency)

    @property
    def data_criteria(self) -> tuple[str, ...]:
        """The criteria with a positive weight that need activation statistics from the training steps."""
        return tuple(name for name in DATA_CRITERIA if self.saliency_weights.get(name, 0.0) > 0)

    @property
    def uses_data(self) -> bool:
        """True when a criterion needs activation statistics from the training steps."""
        return bool(self.data_criteria)

    @property
    def resolved(self) -> bool:
        return self.warmup_steps is not None and self.period_steps is not None

    def resolve(self, total_steps: int) -> "LHSPGConfig":
        """A copy with ``warmup_steps``/``period_steps`` sized for a run of ``total_steps`` where unset."""
        if self.resolved:
            return self
        auto = PruningSchedule.for_budget(total_steps, self.num_periods, warmup_fraction=self.warmup_fraction,
                                          prune_end_fraction=self.prune_end)
        return dataclasses.replace(
            self, warmup_steps=auto.warmup_steps if self.warmup_steps is None else self.warmup_steps,
            period_steps=auto.period_steps if self.period_steps is None else self.period_steps)

    @property
    def schedule(self) -> PruningSchedule:
        if not self.resolved:
            raise ConfigError("the LHSPG schedule is sized from the run's steps: call config.resolve(steps) first")
        return PruningSchedule(self.warmup_steps, self.num_periods, self.period_steps)  # type: ignore[arg-type]


class DataScores(Protocol):
    """Per-structure scores measured during training (e.g. :class:`lorashear.lhspg.hooks.ActivationFisher`)."""

    def scores(self, groups: Sequence[Group]) -> torch.Tensor: ...

    def roll(self) -> None: ...


def _inner(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer under wrappers such as accelerate's ``AcceleratedOptimizer``."""
    while hasattr(optimizer, "optimizer") and not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    return optimizer


class LHSPG:
    """LoRA Half-Space Projected Gradient over a peft LoRA model and its prunable groups.

    Args:
        model: the peft-wrapped model (unwrapped from DDP) whose parameter names the groups use.
        groups: candidate groups; only ``prunable`` groups of the plan's kinds are ever selected.
        optimizer: the optimizer of the LoRA factors (AdamW, SGD, ...), possibly wrapped.
        plan: how many groups of each kind to remove (:func:`~lorashear.lhspg.targets.plan_targets`).
        config: schedule and saliency settings.
        exclude: ids of groups never to select (e.g. unprunable per knowledge analysis).
        broadcast: in multi-process runs, a function returning rank 0's copy of a list
            (e.g. ``accelerate.utils.broadcast_object_list``-based) so every rank selects alike.
    """

    def __init__(self, model: torch.nn.Module, groups: Iterable[Group], optimizer: Any, *, plan: TargetPlan,
                 config: LHSPGConfig | None = None, exclude: Iterable[int] = (),
                 broadcast: Callable[[list[int]], list[int]] | None = None,
                 data_scores: Mapping[str, DataScores] | None = None,
                 grams: GramSource | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.plan = plan
        self.config = config or LHSPGConfig()
        self.schedule = self.config.schedule
        self.broadcast = broadcast
        #: the scorer of every data criterion, by name
        self.data_scores: dict[str, DataScores] = dict(data_scores or {})
        missing = [name for name in self.config.data_criteria if name not in self.data_scores]
        if missing:
            raise ConfigError(f"the {', '.join(missing)} saliency needs activation statistics: pass data_scores "
                              "(lorashear.lhspg.hooks.DATA_SCORERS); train_lhspg does this for you")
        if self.config.transfer and grams is None:
            raise ConfigError("explicit transfer needs consumer input statistics: pass grams "
                              "(lorashear.lhspg.hooks.ActivationGram); train_lhspg does this for you")
        self.grams = grams if self.config.transfer else None
        #: per consumer weight being faded: (kept columns, T) of the current period
        self._transfer: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        groups = list(groups)
        excluded = set(exclude)
        self.candidates: list[Group] = [g for g in groups if g.prunable and g.kind in plan.counts
                                        and g.id not in excluded]
        self._pos = {g.id: i for i, g in enumerate(self.candidates)}
        if len(self._pos) != len(self.candidates):
            raise ValueError("group ids must be unique")
        self.params: dict[str, torch.nn.Parameter] = dict(model.named_parameters(remove_duplicate=False))
        self.loras: dict[str, LoraInfo] = find_loras(model)
        missing = {s.name for g in self.candidates for s in g.slices} - set(self.params)
        if missing:
            raise ValueError(f"groups name parameters the model does not have: {sorted(missing)[:3]}")
        self._kinds = [k for k in plan.counts if any(g.kind == k for g in self.candidates)]
        self._layer_width: dict[str, Counter] = {k: Counter(g.layer for g in groups if g.kind == k)
                                                 for k in self._kinds}
        #: the current position of every index of the uncut model, once structures were cut out (:meth:`rebind`)
        self._positions: Positions | None = None
        #: candidate positions cut out of the model (:meth:`rebind`); always committed ones
        self.compacted: set[int] = set()
        #: called when a period's structures have been committed (set to zero), before the next period is
        #: selected: e.g. to cut them out of the model (:class:`lorashear.lhspg.compacting.PeriodCompaction`)
        self.on_commit: Callable[[], None] | None = None
        self.step_count = 0
        self.selected_period = -1
        self.redundant: list[int] = []  # candidate positions of the current period
        self.committed: list[int] = []
        self.history: list[dict[str, Any]] = []
        self.last_zeroed = 0
        self._red_table: SliceTable | None = None
        self._hold_list: list[tuple[torch.Tensor, int, torch.Tensor]] = []

    # ---------------------------------------------------------------- optimizer protocol
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The inner optimizer step on the LoRA factors, then :meth:`post_step`."""
        loss = self.optimizer.step(closure) if closure is not None else self.optimizer.step()
        self.post_step()
        return loss

    # ---------------------------------------------------------------- the LHSPG update
    @torch.no_grad()
    def post_step(self) -> None:
        """LHSPG's work after optimizer step number :attr:`step_count` (0-based)."""
        s = self.step_count
        sched = self.schedule
        pos = sched.position(s)
        period_end = False
        if pos is not None:
            p, t = pos
            if self.selected_period < p:  # T_w = 0: nothing to select from before step 0
                self._select(p)
            last = t == sched.period_steps - 1
            self._forget(t, last)
            if last:
                self._commit()
                period_end = True
        self._hold()
        if period_end and self.on_commit is not None:
            self.on_commit()
        nxt = sched.period_starting_at(s + 1)
        if nxt is not None and self.selected_period < nxt:
            self._select(nxt)
        if period_end and self.config.merge_at_period_end:
            self.merge_lora()
        self.step_count += 1

    def _forget(self, t: int, last: bool) -> None:
        table = self._red_table
        if table is None or not len(table):
            self.last_zeroed = 0
            return
        n = len(table)
        c = 1.0 / (self.schedule.period_steps - t)
        dev = table.entries[0].idx.device
        norm_sq = torch.zeros(n, dtype=torch.float64, device=dev)
        inner = torch.zeros(n, dtype=torch.float64, device=dev)
        pending = []
        for e in table.base_entries:
            p = self.params[e.name]
            x = gather(p, e.dim, e.idx)  # (k, rest) fp32
            u = lora_rows(self.loras.get(e.name), e.dim, e.idx, p.dim())
            x_new = x * (1.0 - c) if u is None else x * (1.0 - c) + u
            norm_sq.index_add_(0, e.gid, (x * x).sum(1).double())
            inner.index_add_(0, e.gid, (x_new * x).sum(1).double())
            pending.append((e, p, x, u, x_new))
        zero = (inner < self.config.epsilon * norm_sq) | (norm_sq == 0)
        if last:
            zero[:] = True
        keep = (~zero).to(torch.float32)
        for e, p, x, u, x_new in pending:  # rows before columns (table order)
            after = x_new * keep[e.gid].unsqueeze(1)
            scatter(p, e.dim, e.idx, after)
            plan = self._transfer.get(e.name) if e.dim == 1 else None
            if plan is not None:  # what these consumer columns lost, moved into the kept columns
                kept, t = plan
                lost = (x if u is None else x + u) - after  # (|S|, out): the effective columns' change
                p.index_add_(1, kept, (lost.t() @ t).to(p.dtype))
            lora = self.loras.get(e.name)
            if lora is not None and p.dim() == 2:
                if e.dim == 0:
                    lora.B.index_fill_(0, e.idx, 0.0)  # folded rows of s*B*A
                else:
                    lora.A.index_fill_(1, e.idx, 0.0)  # folded columns of s*B*A
        for e in table.lora_entries:
            self.params[e.name].index_fill_(e.dim, e.idx, 0.0)
        self.last_zeroed = int(zero.sum())

    def _commit(self) -> None:
        self.committed.extend(self.redundant)
        self.redundant = []
        self._red_table = None
        self._rebuild_hold()

    def _rebuild_hold(self) -> None:
        """Index lists that keep committed groups (and their folded LoRA parts) at zero."""
        self._hold_list = []
        held = self.live_committed_groups
        if not held:
            return
        table = self._table(held)
        for (name, dim), idx in table.union().items():
            p = self.params[name]
            self._hold_list.append((p, dim, idx))
            lora = self.loras.get(name)
            if lora is not None and p.dim() == 2:
                self._hold_list.append((lora.B, 0, idx) if dim == 0 else (lora.A, 1, idx))

    def _hold(self) -> None:
        for p, dim, idx in self._hold_list:
            p.index_fill_(dim, idx, 0.0)

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Merge ``s B A`` into every base weight, reset ``B`` to 0 and the factors' optimizer state.

        The effective weights ``x + s B A`` are unchanged."""
        state = _inner(self.optimizer).state
        for name, lora in self.loras.items():
            base = self.params[name]
            base.add_(lora.delta().to(base.dtype))
            lora.B.zero_()
            if self.config.reset_optimizer_state:
                state.pop(lora.A, None)
                state.pop(lora.B, None)

    # ---------------------------------------------------------------- selection
    def _select(self, period: int) -> None:
        taken = set(self.committed) | set(self.redundant)
        cands = [i for i in range(len(self.candidates)) if i not in taken]
        chosen: list[int] = []
        if cands:
            table = self._table([self.candidates[i] for i in cands])
            stats = group_statistics(table, self.params, self.loras)
            kind_id = {k: j for j, k in enumerate(self._kinds)}
            clusters = torch.tensor([kind_id.get(self.candidates[i].kind, 0) for i in cands], dtype=torch.long)
            raw = criteria(stats)
            for name in self.config.data_criteria:
                values = self.data_scores[name].scores([self.candidates[i] for i in cands]).to(torch.float64)
                # a structure that was never measured must not look unimportant
                finite = torch.isfinite(values)
                top = values[finite].max() if finite.any() else torch.tensor(1.0, dtype=torch.float64)
                raw[name] = torch.where(finite, values, top.to(values.device)).to(stats.norm_sq.device)
            weights = self.config.saliency_weights
            score_t = saliency(raw, weights, clusters)
            if self.config.allocation == "layer":
                score_t = self._per_layer_normalised(cands, score_t)
            score = score_t.cpu().tolist()
            chosen = self._choose(period, cands, score)
        for scorer in self.data_scores.values():
            scorer.roll()
        if self.broadcast is not None:
            chosen = list(self.broadcast(chosen))
        self.redundant = chosen
        self._red_table = self._table([self.candidates[i] for i in chosen]) if chosen else None
        self._plan_transfer()
        self.selected_period = period
        self.history.append({"period": period, "step": self.step_count,
                             "selected": [self.candidates[i].id for i in chosen]})
        logger.debug("period %d: %d groups selected", period, len(chosen))

    @torch.no_grad()
    def _plan_transfer(self) -> None:
        """The least-squares maps of this period's fading consumer columns (:mod:`.transfer`)."""
        self._transfer = {}
        if self.grams is None:
            return
        if self._red_table is not None:
            dead: dict[str, list[torch.Tensor]] = defaultdict(list)
            if self.live_committed_groups:
                for e in self._table(self.live_committed_groups).base_entries:
                    if e.dim == 1:
                        dead[e.name].append(e.idx)
            for e in self._red_table.base_entries:
                p = self.params[e.name]
                if e.dim != 1 or p.dim() != 2 or torch.unique(e.idx).numel() != e.idx.numel():
                    continue
                gram = self.grams.gram(consumer_module(e.name))
                if gram is None:
                    continue
                kept = kept_columns(p.shape[1], torch.cat([e.idx, *dead[e.name]]))
                t = transfer_matrix(gram.to(p.device), e.idx, kept, self.config.transfer_damp)
                self._transfer[e.name] = (kept, t)
        self.grams.roll()

    def _per_layer_normalised(self, cands: list[int], score: torch.Tensor) -> torch.Tensor:
        """Each score divided by the mean score of its (kind, layer) among the candidates."""
        keys = [(self.candidates[i].kind, self.candidates[i].layer) for i in cands]
        index = {k: j for j, k in enumerate(dict.fromkeys(keys))}
        cl = torch.tensor([index[k] for k in keys], dtype=torch.long, device=score.device)
        sums = torch.zeros(len(index), dtype=score.dtype, device=score.device).index_add_(0, cl, score)
        counts = torch.zeros(len(index), dtype=score.dtype, device=score.device).index_add_(
            0, cl, torch.ones_like(score))
        mean = (sums / counts.clamp_min(1))[cl]
        return torch.where(mean > 0, score / mean.clamp_min(1e-300), score)

    def _quota(self, total: int, period: int) -> int:
        return period_quotas(total, self.schedule.num_periods, self.config.quota)[period]

    def _choose(self, period: int, cands: list[int], score: list[float]) -> list[int]:
        P = self.schedule.num_periods
        by_kind: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for i, sc in zip(cands, score):
            by_kind[self.candidates[i].kind].append((sc, i))
        removed = Counter(self.candidates[i].kind for i in self.committed)
        removed_layer = Counter((self.candidates[i].kind, self.candidates[i].layer) for i in self.committed)
        chosen: list[int] = []
        claimed: set[tuple[str, int, int]] | None = set() if self._kinds_overlap() else None
        for k in self._kinds:
            m = self.plan.multiple(k)
            items = sorted(by_kind.get(k, []))
            # never empty a layer: keep at least max(1, the kind's multiple) structures per layer
            cap = {layer: w - max(1, m, math.ceil(self.config.min_keep * w)) - removed_layer[(k, layer)]
                   for layer, w in self._layer_width[k].items()}
            per_layer = self.plan.per_layer.get(k) if self.plan.per_layer else None
            layer_items: dict[Any, list[tuple[float, int]]] = defaultdict(list)
            for sc, i in items:
                layer_items[self.candidates[i].layer].append((sc, i))
            if per_layer is not None:
                for layer, total in per_layer.items():
                    q = self._quota(total, period)
                    chosen += self._take(layer_items.get(layer, []), q, claimed, cap)
            elif m > 1 and period == P - 1:
                kept = {layer: w - removed_layer[(k, layer)] for layer, w in self._layer_width[k].items()
                        if layer in layer_items}
                take = layer_rounding(kept, {layer: len(v) for layer, v in layer_items.items()},
                                      self.plan.counts[k] - removed[k], m,
                                      {layer: [sc for sc, _ in v] for layer, v in layer_items.items()})
                for layer, q in take.items():
                    chosen += self._take(layer_items[layer], q, claimed, None)
            else:
                # with rounding, the last period removes each layer's remainder to a multiple of m (about m/2
                # per layer) and then whole blocks of m: the periods before leave that much of the count to it,
                # so the run lands on the target instead of past it
                q = self._quota(self.plan.counts[k] - self._rounding_reserve(k, m), period)
                chosen += self._take(items, q, claimed, cap)
        return chosen

    def _rounding_reserve(self, kind: str, m: int) -> int:
        """Groups of ``kind`` the periods before the last leave to the last one when widths round to ``m``:
        three quarters of a block per layer (the expected remainder of half a block, and room for whole
        blocks to land on the count)."""
        if m <= 1 or self.plan.per_layer:
            return 0
        return min(self.plan.counts[kind], (3 * m * len(self._layer_width[kind])) // 4)

    def _kinds_overlap(self) -> bool:
        return "kv_group" in self._kinds and "attention_head" in self._kinds

    def _take(self, items: Sequence[tuple[float, int]], q: int, claimed: set[tuple[str, int, int]] | None,
              cap: dict[Any, int] | None) -> list[int]:
        """The ``q`` lowest-saliency items, skipping layers at their cap and (with overlapping
        kinds) groups sharing a slice with one already chosen this period."""
        out: list[int] = []
        for _, i in items:
            if len(out) >= q:
                break
            layer = self.candidates[i].layer
            if cap is not None and layer is not None and cap.get(layer, 1) <= 0:
                continue
            if claimed is not None:
                keys = {(s.name, s.dim, j) for s in self.candidates[i].slices for j in s.indices}
                if keys & claimed:
                    continue
                claimed |= keys
            if cap is not None and layer is not None and layer in cap:
                cap[layer] -= 1
            out.append(i)
        if len(out) < q:
            logger.warning("only %d of %d groups could be selected (per-layer minimum widths)", len(out), q)
        return out

    # ---------------------------------------------------------------- reporting / state
    @property
    def selected_groups(self) -> list[Group]:
        """Committed groups followed by the current period's redundant ones."""
        return [self.candidates[i] for i in self.committed + self.redundant]

    @property
    def committed_groups(self) -> list[Group]:
        """The committed groups as discovered (indices of the uncut model)."""
        return [self.candidates[i] for i in self.committed]

    @property
    def live_committed_groups(self) -> list[Group]:
        """The committed groups still in the model (not cut out yet), as discovered."""
        return [self.candidates[i] for i in self.committed if i not in self.compacted]

    def _table(self, groups: Sequence[Group]) -> SliceTable:
        """The slices of ``groups`` in the model as it is now (re-indexed once structures were cut out)."""
        return SliceTable(groups, self.params, positions=self._positions)

    @torch.no_grad()
    def committed_max_abs(self) -> float:
        """The largest absolute value in the committed groups still in the model (0: exactly zero)."""
        biggest = 0.0
        for (name, dim), idx in self._table(self.live_committed_groups).union().items():
            values = self.params[name].detach().index_select(dim, idx)
            biggest = max(biggest, float(values.abs().max()) if values.numel() else 0.0)
        return biggest

    @torch.no_grad()
    def rebind(self, positions: Positions, cut: Iterable[int]) -> None:
        """Follow a model whose structures were cut out in place: ``positions`` maps every index of the uncut model
        to its current position (:attr:`lorashear.compaction.Compactions.positions`), ``cut`` holds the ids of the
        groups cut out so far. The parameters and LoRA factors are looked up again; the current period's table
        and the hold lists are rebuilt. A transfer plan is dropped (the next selection plans the next period's)."""
        self.params = dict(self.model.named_parameters(remove_duplicate=False))
        self.loras = find_loras(self.model)
        self._positions = positions
        self.compacted |= {self._pos[i] for i in cut if i in self._pos}
        self._red_table = self._table([self.candidates[i] for i in self.redundant]) if self.redundant else None
        self._transfer = {}
        self._rebuild_hold()

    @property
    def target_groups(self) -> int:
        return sum(self.plan.counts.values())

    def sparsity(self) -> float:
        """Fraction of the candidate groups that are committed (exactly zero)."""
        return len(self.committed) / max(1, len(self.candidates))

    @property
    def phase(self) -> str:
        pos = self.schedule.position(self.step_count)
        if self.step_count < self.schedule.warmup_steps:
            return "warmup"
        return f"period {pos[0]}" if pos is not None else "finetune"

    def state_dict(self, *, include_optimizer: bool = True) -> dict[str, Any]:
        """Period state (and the inner optimizer's unless ``include_optimizer`` is False)."""
        state = {
            "step_count": self.step_count,
            "selected_period": self.selected_period,
            "redundant": [self.candidates[i].id for i in self.redundant],
            "committed": [self.candidates[i].id for i in self.committed],
            "history": self.history,
        }
        if self._transfer:
            state["transfer"] = {name: {"kept": kept, "t": t} for name, (kept, t) in self._transfer.items()}
        if include_optimizer:
            state["optimizer"] = self.optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step_count = int(state["step_count"])
        self.selected_period = int(state["selected_period"])
        self.redundant = [self._pos[i] for i in state["redundant"]]
        self.committed = [self._pos[i] for i in state["committed"]]
        self.history = list(state["history"])
        if "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self._red_table = self._table([self.candidates[i] for i in self.redundant]) if self.redundant else None
        self._transfer = {}
        if self.grams is not None:
            for name, item in state.get("transfer", {}).items():
                device = self.params[name].device
                self._transfer[name] = (item["kept"].to(device), item["t"].to(device))
        self._rebuild_hold()


def effective_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``x + s B A`` for every LoRA base weight (fp32 copies), keyed by the base weight's name."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {name: params[name].detach().float() + lora.delta() for name, lora in find_loras(model).items()}
