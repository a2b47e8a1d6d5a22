"""Trace a forward pass and derive which parameter dimensions are coupled.

Why a ``TorchFunctionMode`` (and not torch.fx or torch.export): it records the
operators that really run, at the level of ``F.linear``, ``view``, ``matmul``
and ``scaled_dot_product_attention``, on any module, including peft-wrapped
ones, with data-dependent Python control flow left intact, and it works on the
``meta`` device, so a 7B model is traced without allocating a weight. fx
cannot trace Hugging Face models' dynamic control flow without per-model
patches; torch.export specialises and lowers (``linear`` becomes
``addmm``/``view``), losing the operator boundaries we reason about.

Each tensor dimension gets a space (see :mod:`lorashear.graph.spaces`); each
operator's rule unifies or restructures the spaces of its inputs and outputs:
``linear`` couples its input's last dimension with the weight's columns and
gives its output the weight's rows; element-wise operators unify aligned
dimensions; ``view``/``reshape`` split or merge spaces into products; slicing
and ``chunk`` produce concatenations; an activation-by-activation ``matmul``
or SDPA marks attention heads and keeps head dimensions whole. An operator
without a rule that touches a tracked dimension *blocks* it: it can never be
pruned, which is safe, and the reason is kept for the error message. The rules
are a registry, one entry per operator, in :mod:`lorashear.graph.rules`.

Reductions over a tracked dimension (``sum``, ``mean``, ``var``, ``softmax``,
``logsumexp``, ``layer_norm``, an RMS norm written out as
``x * rsqrt(x.pow(2).mean(-1) + eps) * w``...) couple every channel they reduce:
removing some of them is exact only for a sum over channels that are zero when
their group is zeroed, or for the mean of squares of an RMS norm once its scale
``w`` is multiplied by ``sqrt(n / n_kept)``. Each is recorded as a
:class:`Reduction`; discovery marks the structures under any other one
unprunable, naming the operator.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .rules import DIVISIONS, MULTIPLICATIVE, POWERS, RULES, flatten
from .spaces import SpaceTable

logger = logging.getLogger(__name__)

Spaces = tuple["int | None", ...]

_NO_TENSOR = {"size", "dim", "numel", "__len__", "data_ptr", "is_floating_point", "element_size", "__format__",
              "__bool__", "item", "tolist", "is_contiguous", "stride", "__index__", "__int__", "__float__",
              "get_device", "__repr__", "__hash__", "storage_offset", "is_complex", "untyped_storage", "nelement"}
#: operators that only convert or copy: a square, a parameter view or an RMS step stays what it was
_CONVERSIONS = {"to", "float", "double", "half", "bfloat16", "type", "type_as", "contiguous", "clone", "detach"}
_ADDS = {"add", "__add__", "__radd__", "__iadd__", "add_"}


@dataclass
class Reduction:
    """One reduction over a tracked (prunable) dimension, seen while tracing.

    Attributes:
        op: the operator (``mean``, ``sum``, ``softmax``, ``layer_norm``...).
        space: the space reduced over (its atoms are the structures it couples).
        effect: how removed channels affect it, see :data:`lorashear.graph.rules.REDUCTIONS`.
        zero_input: the channels of a zeroed group are zero where they are reduced.
        scale: for the mean of squares of an RMS norm, the parameter that scales its output, as
            ``(name, shift)``: the norm multiplies by ``param + shift`` (``shift`` 1 for ``x * (1 + w)``).
        escaped: an operator that used the mean of squares other than as an RMS normaliser.
    """

    op: str
    space: int
    effect: str
    zero_input: bool
    scale: tuple[str, float] | None = None
    escaped: str | None = None

    def problem(self) -> str | None:
        """Why removing channels of :attr:`space` changes the result (``None``: it does not, or it does
        not once :attr:`scale` is rescaled by ``sqrt(n / n_kept)``)."""
        if self.effect == "sum":
            return None if self.zero_input else (
                f"reduction '{self.op}' sums channels that are not zero when their group is zeroed")
        if self.effect == "mean":
            if self.escaped:
                why = f"its mean of squares is also used by '{self.escaped}'"
            elif self.scale is None:
                why = "not the mean of squares of an RMS norm with a scale parameter"
            elif not self.zero_input:
                why = "the channels are not zero when their group is zeroed"
            else:
                return None
            return f"reduction '{self.op}' averages over the channels ({why})"
        return f"reduction '{self.op}' mixes the channels"


@dataclass
class TraceResult:
    """What the trace found: a space table, the spaces of each parameter's dims, the reductions."""

    table: SpaceTable
    param_spaces: dict[str, Spaces]
    output_spaces: Spaces
    unknown_ops: dict[str, int] = field(default_factory=dict)
    reductions: list[Reduction] = field(default_factory=list)


def _name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None)
    if name is None:
        name = type(func).__name__
    return name


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class SpaceTracer(TorchFunctionMode):
    """Propagates channel spaces through every torch-level operator of a forward pass.

    Besides spaces it follows three facts: which tensors are zero on the channels of a zeroed
    group (the rules' ``zeros`` modes), which are views of a parameter (``w.float()``, ``1 + w``),
    and the steps of an RMS norm written out (``x * rsqrt(x.pow(2).mean(-1) + eps) * w``), so that
    each :class:`Reduction` knows whether removing channels is exact, exact after rescaling ``w``,
    or not exact.
    """

    def __init__(self, params: dict[int, tuple[str, torch.nn.Parameter]]) -> None:
        super().__init__()
        self.table = SpaceTable()
        self._params = params
        self._param_spaces: dict[str, Spaces] = {}
        self._values: dict[int, tuple[torch.Tensor, Spaces]] = {}
        self.unknown_ops: dict[str, int] = {}
        self.reductions: list[Reduction] = []
        self._zero: set[int] = set()  # ids of tensors (kept alive in _values) zero on zeroed groups' channels
        self._squares: dict[int, torch.Tensor] = {}
        self._views: dict[int, tuple[torch.Tensor, str, float]] = {}  # tensor = param + shift
        self._rms: dict[int, tuple[torch.Tensor, str, Reduction]] = {}  # tensor -> RMS step

    # -- bookkeeping ------------------------------------------------------------
    def param_spaces(self) -> dict[str, Spaces]:
        return dict(self._param_spaces)

    def ensure_param(self, name: str, param: torch.Tensor) -> Spaces:
        if name not in self._param_spaces:
            spaces = tuple(self.table.new(s) if s > 1 else None for s in param.shape)
            self._param_spaces[name] = spaces
            self._values[id(param)] = (param, spaces)
        return self._param_spaces[name]

    def spaces(self, t: Any) -> Spaces | None:
        if not isinstance(t, torch.Tensor):
            return None
        hit = self._values.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        p = self._params.get(id(t))
        if p is not None:
            return self.ensure_param(p[0], t)
        return None

    def set(self, t: Any, spaces: Sequence[int | None]) -> None:
        if isinstance(t, torch.Tensor):
            fixed = tuple(s if (s is not None and t.shape[i] > 1) else None for i, s in enumerate(spaces))
            if len(fixed) != t.dim():
                fixed = tuple(None for _ in range(t.dim()))
            self._values[id(t)] = (t, fixed)

    def union(self, a: int | None, b: int | None) -> int | None:
        if a is None:
            return b
        if b is None:
            return a
        return self.table.union(a, b)

    def is_param(self, t: Any) -> bool:
        return id(t) in self._params

    def is_zero(self, t: Any) -> bool:
        """``t`` is zero on the channels of every zeroed group (parameters are: their slices are zeroed)."""
        if self.is_param(t):
            return True
        hit = self._values.get(id(t))
        return hit is not None and hit[0] is t and id(t) in self._zero

    def _roots(self, t: torch.Tensor) -> set[int]:
        return {self.table.find(s) for s in self.spaces(t) or () if s is not None}

    def _fresh_blocked(self, t: torch.Tensor, reason: str) -> None:
        spaces = []
        for size in t.shape:
            if size > 1:
                sid = self.table.new(size)
                self.table.block(sid, reason)
                spaces.append(sid)
            else:
                spaces.append(None)
        self.set(t, spaces)

    # -- reductions (called by the rules) -----------------------------------------------------
    def reduction(self, op: str, x: torch.Tensor, space: int, effect: str, out: Any) -> Reduction:
        """Record that ``op`` reduces ``x`` over ``space``; a mean of squares starts an RMS norm."""
        red = Reduction(op, space, effect, self.is_zero(x))
        self.reductions.append(red)
        if effect == "mean" and self._squares.get(id(x)) is x:
            for o in flatten(out):
                if isinstance(o, torch.Tensor):
                    self._rms[id(o)] = (o, "mean_square", red)
        return red

    def rms_scaled_by(self, red: Reduction, weight: Any) -> bool:
        """Make ``weight`` the scale of the RMS norm ``red`` if it is a 1-D view of a parameter over its space."""
        view = self._param_view(weight)
        if view is None or weight.dim() != 1 or self.table.find(red.space) not in self._roots(weight):
            return False
        red.scale = view
        return True

    def _param_view(self, t: Any) -> tuple[str, float] | None:
        if self.is_param(t):
            return self._params[id(t)][0], 0.0
        hit = self._views.get(id(t))
        return (hit[1], hit[2]) if hit is not None and hit[0] is t else None

    # -- the mode -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name == "__get__":  # a property such as .T or .mT: use the property's name
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _NO_TENSOR or not any(isinstance(o, torch.Tensor) for o in flatten(out)):
            return out
        inputs = [a for a in flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        tracked = [a for a in inputs if self.spaces(a) is not None and any(s is not None for s in self.spaces(a))]
        if tracked:
            self._apply(name, args, kwargs, inputs, tracked, out)
        self._follow(name, args, inputs, out)
        return out

    def _apply(self, name: str, args: tuple, kwargs: dict, inputs: list[torch.Tensor],
               tracked: list[torch.Tensor], out: Any) -> None:
        entry = RULES.get(name)
        try:
            handled = entry is not None and entry.fn(self, name, args, kwargs, out)
        except Exception as exc:  # a rule met a case it does not understand: be safe
            logger.debug("rule for %s failed (%s); blocking its dims", name, exc)
            handled = False
        outs = [o for o in flatten(out) if isinstance(o, torch.Tensor)]
        if handled:
            assert entry is not None
            zero = self._zeros_pass(entry.zeros, name, args, inputs, out)  # before updating: out may be an input
            for o in outs:
                if zero and id(o) in self._values:
                    self._zero.add(id(o))
                else:
                    self._zero.discard(id(o))
            return
        self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
        for t in tracked:
            for s in self.spaces(t) or ():
                if s is not None:
                    self.table.block(s, f"operator '{name}'")
        for o in outs:
            self._zero.discard(id(o))
            self._fresh_blocked(o, f"operator '{name}'")

    def _zeros_pass(self, mode: str, name: str, args: tuple, inputs: list[torch.Tensor], out: Any) -> bool:
        """Whether ``out`` is zero on zeroed groups' channels, by the rule's ``zeros`` mode."""
        if mode == "source":
            return True
        if mode == "first":
            return bool(inputs) and self.is_zero(inputs[0])
        if mode == "pow":
            return len(args) > 1 and _number(args[1]) and args[1] > 0 and self.is_zero(args[0])
        if mode == "all":
            scalars_ok = name not in _ADDS or all(a == 0 for a in args if _number(a))
            return scalars_ok and all(self.is_zero(t) for t in inputs)
        if mode == "cover":
            first = next((o for o in flatten(out) if isinstance(o, torch.Tensor)), None)
            needed = self._roots(first) if first is not None else set()
            return any(self.is_zero(t) and needed <= self._roots(t) for t in inputs)
        return False

    def _follow(self, name: str, args: tuple, inputs: list[torch.Tensor], out: Any) -> None:
        """Follow squares, parameter views and the steps of a written-out RMS norm through one operator."""
        outs = [o for o in flatten(out) if isinstance(o, torch.Tensor)]
        o = outs[0] if len(outs) == 1 else None
        x = inputs[0] if inputs else None
        if o is not None and x is not None:
            exponent = args[1] if len(args) > 1 and _number(args[1]) else None
            if ((name in POWERS and exponent == 2) or name == "square"
                    or (name in MULTIPLICATIVE and len(inputs) == 2 and inputs[1] is x)
                    or (name in _CONVERSIONS and self._squares.get(id(x)) is x)):
                self._squares[id(o)] = o
            view = self._param_view(x)
            if view is not None and len(inputs) == 1 and o.shape == x.shape:
                shift = [a for a in args[1:] if _number(a)]
                if name in _CONVERSIONS:
                    self._views[id(o)] = (o, view[0], view[1])
                elif name in _ADDS and len(shift) == 1:
                    self._views[id(o)] = (o, view[0], view[1] + shift[0])
        for t in inputs:
            hit = self._rms.get(id(t))
            if hit is None or hit[0] is not t:
                continue
            step, red = hit[1], hit[2]
            others = [a for a in inputs if a is not t]
            nxt = self._rms_step(name, args, step, red, t, others) if o is not None else None
            if nxt is None:
                red.escaped = red.escaped or name
            elif nxt != "scaled":
                self._rms[id(o)] = (o, nxt, red)

    def _rms_step(self, name: str, args: tuple, step: str, red: Reduction, t: torch.Tensor,
                  others: list[torch.Tensor]) -> str | None:
        """The RMS step after ``name`` applied to ``t`` (at ``step``), or ``None`` if it is no RMS step:
        ``mean_square`` (+ eps) -> ``rsqrt`` -> ``inverse``; ``sqrt`` -> ``root`` -> ``reciprocal`` -> ``inverse``;
        ``x * inverse`` or ``x / root`` -> ``normalized``; ``normalized * w`` -> ``scaled`` (``w`` is the scale)."""
        def spans(a: torch.Tensor) -> bool:
            return self.table.find(red.space) in self._roots(a)

        exponent = args[1] if len(args) > 1 and _number(args[1]) else None
        one = len(others) == 1
        if name in _CONVERSIONS:
            return step
        if step == "mean_square":
            if name in _ADDS and all(a.numel() == 1 for a in others):
                return "mean_square"
            if name == "rsqrt" or (name in POWERS and exponent == -0.5):
                return "inverse"
            return "root" if name == "sqrt" else None
        if step == "root" and name == "reciprocal":
            return "inverse"
        if step == "root" and name in DIVISIONS and one and args[0] is others[0] and spans(others[0]):
            return "normalized"
        if step == "inverse" and name in MULTIPLICATIVE and one and spans(others[0]):
            return "normalized"
        if step == "normalized" and name in MULTIPLICATIVE and one and self.rms_scaled_by(red, others[0]):
            return "scaled"
        return None


def _configs_to_force_eager(model: torch.nn.Module) -> list[Any]:
    seen: dict[int, Any] = {}
    for module in model.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen[id(cfg)] = cfg
    return list(seen.values())


def trace_spaces(model: torch.nn.Module, input_ids: torch.Tensor, named_params: dict[str, torch.nn.Parameter]) -> TraceResult:
    """Run ``model(input_ids)`` under :class:`SpaceTracer` and return the coupled spaces."""
    params = {id(p): (n, p) for n, p in named_params.items()}
    tracer = SpaceTracer(params)
    for n, p in named_params.items():
        tracer.ensure_param(n, p)
    attention_mask = torch.ones_like(input_ids)
    configs = _configs_to_force_eager(model) if input_ids.device.type == "meta" else []
    saved = [(cfg, cfg._attn_implementation) for cfg in configs]  # noqa: SLF001
    try:
        # on meta, the SDPA mask helpers read tensor values; eager attention does not
        for cfg, _ in saved:
            cfg._attn_implementation = "eager"  # noqa: SLF001
        with torch.no_grad(), tracer:
            output = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for cfg, impl in saved:
            cfg._attn_implementation = impl  # noqa: SLF001
    logits = output.logits if hasattr(output, "logits") else output[0]
    out_spaces = tracer.spaces(logits) or ()
    for s in out_spaces:
        if s is not None:
            tracer.table.tag(s, "output")
    return TraceResult(tracer.table, tracer.param_spaces(), tuple(out_spaces), tracer.unknown_ops,
                       tracer.reductions)
