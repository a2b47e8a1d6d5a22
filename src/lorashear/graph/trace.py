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
pruned, which is safe, and the reason is kept for the error message.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from .spaces import SpaceTable

logger = logging.getLogger(__name__)

Spaces = tuple["int | None", ...]

_IDENTITY = {
    "contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type_as", "type",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "requires_grad_", "cpu", "cuda",
    "neg", "__neg__", "silu", "gelu", "relu", "tanh", "sigmoid", "exp", "rsqrt", "sqrt", "square", "abs",
    "erf", "log", "log1p", "cos", "sin", "reciprocal", "softplus", "mish", "elu", "leaky_relu", "relu6",
    "hardswish", "hardsigmoid", "gelu_pytorch_tanh", "nan_to_num", "clamp", "clip", "clamp_", "clamp_min",
    "clamp_max", "sign", "logical_not", "__invert__", "pow", "__pow__", "float_power", "silu_", "relu_",
    "fill_", "zero_", "detach_", "masked_fill_", "tanh_", "exp_", "sigmoid_", "neg_", "round",
}
_ELEMENTWISE = {
    "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_", "rsub",
    "mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__rtruediv__", "__itruediv__", "div_",
    "where", "maximum", "minimum", "masked_fill", "lerp", "addcmul", "addcdiv", "copy_", "__and__", "__or__",
    "eq", "__eq__", "ne", "__ne__", "lt", "__lt__", "le", "__le__", "gt", "__gt__", "ge", "__ge__", "__mod__",
    "fmod", "remainder", "logical_and", "logical_or", "bitwise_and", "bitwise_or", "__rpow__",
}
_SUM_REDUCTIONS = {"sum", "nansum"}
_NORM_REDUCTIONS = {"mean", "var", "std", "norm", "nanmean", "var_mean", "std_mean", "logsumexp"}
_ORDER_REDUCTIONS = {"amax", "amin", "max", "min", "argmax", "argmin", "all", "any", "prod", "cumsum"}
_NO_TENSOR = {"size", "dim", "numel", "__len__", "data_ptr", "is_floating_point", "element_size", "__format__",
              "__bool__", "item", "tolist", "is_contiguous", "stride", "__index__", "__int__", "__float__",
              "get_device", "__repr__", "__hash__", "storage_offset", "is_complex", "untyped_storage", "nelement"}


@dataclass
class TraceResult:
    """What the trace found: a space table and the spaces of each parameter's dims."""

    table: SpaceTable
    param_spaces: dict[str, Spaces]
    output_spaces: Spaces
    unknown_ops: dict[str, int] = field(default_factory=dict)


def _name(func: Callable[..., Any]) -> str:
    name = getattr(func, "__name__", None)
    if name is None:
        name = type(func).__name__
    return name


class SpaceTracer(TorchFunctionMode):
    """Propagates channel spaces through every torch-level operator of a forward pass."""

    def __init__(self, params: dict[int, tuple[str, torch.nn.Parameter]]) -> None:
        super().__init__()
        self.table = SpaceTable()
        self._params = params
        self._param_spaces: dict[str, Spaces] = {}
        self._values: dict[int, tuple[torch.Tensor, Spaces]] = {}
        self.unknown_ops: dict[str, int] = {}

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

    def _union(self, a: int | None, b: int | None) -> int | None:
        if a is None:
            return b
        if b is None:
            return a
        return self.table.union(a, b)

    # -- the mode -------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name == "__get__":  # a property such as .T or .mT: use the property's name
            name = getattr(getattr(func, "__self__", None), "__name__", name)
        if name in _NO_TENSOR or not any(isinstance(o, torch.Tensor) for o in _flatten(out)):
            return out
        inputs = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
        tracked = [a for a in inputs if self.spaces(a) is not None and any(s is not None for s in self.spaces(a))]
        if not tracked:
            return out
        try:
            handled = self._apply(name, args, kwargs, out)
        except Exception as exc:  # a rule met a case it does not understand: be safe
            logger.debug("rule for %s failed (%s); blocking its dims", name, exc)
            handled = False
        if not handled:
            self.unknown_ops[name] = self.unknown_ops.get(name, 0) + 1
            for t in tracked:
                for s in self.spaces(t) or ():
                    if s is not None:
                        self.table.block(s, f"operator '{name}'")
            for o in _flatten(out):
                if isinstance(o, torch.Tensor):
                    self._fresh_blocked(o, f"operator '{name}'")
        return out

    # -- rules ------------------------------------------------------------------------
    def _apply(self, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
        if name == "linear":
            return self._linear(args, kwargs, out)
        if name == "embedding":
            x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            ws = self.spaces(w)
            if ws is None:
                return False
            self.set(out, (None,) * (out.dim() - 1) + (ws[1],))
            if ws[0] is not None:
                self.table.tag(ws[0], "vocab")
            return True
        if name in _IDENTITY:
            src = _first_tensor(args, kwargs)
            if isinstance(out, torch.Tensor) and src is not None and tuple(out.shape) == tuple(src.shape):
                self.set(out, self.spaces(src) or ())
                return True
            if isinstance(out, torch.Tensor) and src is not None and out.dim() == src.dim():
                return self._elementwise([src], out)
            return False
        if name in _ELEMENTWISE:
            tensors = [a for a in _flatten((args, kwargs)) if isinstance(a, torch.Tensor)]
            return self._elementwise(tensors, out)
        if name in ("softmax", "log_softmax", "_softmax"):
            x = _first_tensor(args, kwargs)
            dim = _arg(args, kwargs, 1, "dim")
            xs = self.spaces(x) or ()
            if dim is not None and xs[dim % x.dim()] is not None:
                self.table.block(xs[dim % x.dim()], "softmax over channels")
            self.set(out, xs)
            return True
        if name in _SUM_REDUCTIONS | _NORM_REDUCTIONS | _ORDER_REDUCTIONS:
            return self._reduce(name, args, kwargs, out)
        if name in ("matmul", "__matmul__", "bmm", "__rmatmul__"):
            a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
            return self._matmul(a, b, out)
        if name == "scaled_dot_product_attention":
            return self._sdpa(args, kwargs, out)
        if name in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view"):
            x = args[0]
            return self._reshape(x, out)
        if name in ("transpose", "swapaxes", "swapdims"):
            x, d0, d1 = args[0], _arg(args, kwargs, 1, "dim0"), _arg(args, kwargs, 2, "dim1")
            xs = list(self.spaces(x) or ())
            d0, d1 = d0 % x.dim(), d1 % x.dim()
            xs[d0], xs[d1] = xs[d1], xs[d0]
            self.set(out, xs)
            return True
        if name == "permute":
            x = args[0]
            dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
            dims = kwargs.get("dims", dims)
            xs = self.spaces(x) or ()
            self.set(out, [xs[d % x.dim()] for d in dims])
            return True
        if name in ("t", "T", "mT"):
            xs = self.spaces(args[0]) or ()
            self.set(out, tuple(reversed(xs)) if len(xs) <= 2 else (*xs[:-2], xs[-1], xs[-2]))
            return True
        if name == "unsqueeze":
            x, d = args[0], _arg(args, kwargs, 1, "dim")
            xs = list(self.spaces(x) or ())
            d = d % (x.dim() + 1)
            xs.insert(d, None)
            self.set(out, xs)
            return True
        if name == "squeeze":
            x = args[0]
            xs = self.spaces(x) or ()
            kept = [s for s, size in zip(xs, x.shape) if size != 1 or s is not None]
            if len(kept) != out.dim():
                kept = self._match_by_shape(x, out)
            self.set(out, kept)
            return True
        if name in ("expand", "expand_as", "broadcast_to"):
            return self._expand(args[0], out)
        if name == "__getitem__":
            return self._getitem(args[0], args[1], out)
        if name == "narrow":
            x, dim, start, length = args[0], args[1], args[2], args[3]
            return self._slice_dim(x, dim % x.dim(), int(start), int(start) + int(length), out)
        if name in ("chunk", "split", "tensor_split", "split_with_sizes", "unbind"):
            return self._split(name, args, kwargs, out)
        if name in ("cat", "concat", "concatenate"):
            return self._cat(args, kwargs, out)
        if name == "stack":
            tensors = list(_arg(args, kwargs, 0, "tensors"))
            dim = _arg(args, kwargs, 1, "dim") or 0
            dim = dim % out.dim()
            stacked = []
            for i in range(out.dim()):
                if i == dim:
                    stacked.append(None)
                    continue
                j = i if i < dim else i - 1
                sp = None
                for t in tensors:
                    sp = self._union(sp, (self.spaces(t) or (None,) * t.dim())[j])
                stacked.append(sp)
            self.set(out, stacked)
            return True
        if name in ("rms_norm", "layer_norm", "group_norm"):
            return self._norm(name, args, kwargs, out)
        return False

    def _linear(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
        b = _arg(args, kwargs, 2, "bias")
        ws = self.spaces(w)
        xs = self.spaces(x) or (None,) * x.dim()
        if ws is None or len(ws) != 2:
            return False
        self._union(xs[-1], ws[1])
        if ws[0] is None:
            self.set(out, (*xs[:-1], None))
            return True
        if b is not None:
            bs = self.spaces(b)
            if bs is not None:
                self._union(bs[0], ws[0])
        self.set(out, (*xs[:-1], ws[0]))
        return True

    def _elementwise(self, tensors: list[torch.Tensor], out: Any) -> bool:
        if not isinstance(out, torch.Tensor):
            return False
        result: list[int | None] = [None] * out.dim()
        for t in tensors:
            ts = self.spaces(t) or (None,) * t.dim()
            for k in range(1, t.dim() + 1):
                if k > out.dim():
                    break
                if t.shape[-k] == out.shape[-k] and out.shape[-k] > 1:
                    result[-k] = self._union(result[-k], ts[-k])
        self.set(out, result)
        return True

    def _reduce(self, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
        x = args[0] if args else kwargs.get("input")
        xs = self.spaces(x) or ()
        dim = _arg(args, kwargs, 1, "dim")
        keepdim = bool(_arg(args, kwargs, 2, "keepdim") or False)
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            dims = list(range(x.dim()))
        elif isinstance(dim, int):
            dims = [dim % x.dim()]
        elif isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
            dims = [d % x.dim() for d in dim]
        else:
            return False
        for d in dims:
            s = xs[d] if d < len(xs) else None
            if s is None:
                continue
            if name in _NORM_REDUCTIONS:
                self.table.tag(s, "normalized")
            elif name in _ORDER_REDUCTIONS:
                self.table.block(s, f"order-dependent reduction '{name}'")
        outs = [o for o in _flatten(out) if isinstance(o, torch.Tensor)]
        for o in outs:
            if keepdim:
                self.set(o, [None if i in dims else s for i, s in enumerate(xs)])
            else:
                self.set(o, [s for i, s in enumerate(xs) if i not in dims])
        return True

    def _matmul(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> bool:
        if a.dim() < 2 or b.dim() < 2:
            return False
        as_ = self.spaces(a) or (None,) * a.dim()
        bs = self.spaces(b) or (None,) * b.dim()
        self._union(as_[-1], bs[-2])
        batch: list[int | None] = [None] * (out.dim() - 2)
        for k in range(3, out.dim() + 1):
            sa = as_[-k] if k <= a.dim() and a.shape[-k] == out.shape[-k] else None
            sb = bs[-k] if k <= b.dim() and b.shape[-k] == out.shape[-k] else None
            batch[-(k - 2)] = self._union(sa, sb)
        is_activation = id(a) not in self._params and id(b) not in self._params
        if is_activation and any(s is not None for s in batch):
            # activation x activation with per-head batch dims: this is attention
            for s in batch:
                if s is not None:
                    self.table.tag(s, "attention_heads")
            for s in (as_[-1], bs[-1], as_[-2], bs[-2]):
                if s is not None:
                    self.table.mark_indivisible(s)
        self.set(out, (*batch, as_[-2], bs[-1]))
        return True

    def _sdpa(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
        qs = self.spaces(q) or (None,) * q.dim()
        ks = self.spaces(k) or (None,) * k.dim()
        vs = self.spaces(v) or (None,) * v.dim()
        for s in (qs[-1], ks[-1], vs[-1]):
            if s is not None:
                self.table.mark_indivisible(s)
        self._union(qs[-1], ks[-1])
        self._union(ks[-3], vs[-3])
        hq, hk = q.shape[-3], k.shape[-3]
        if hq != hk and qs[-3] is not None:
            slot = self.table.new(hq // hk, tag="gqa_slot")
            self.table.set_factors(qs[-3], [ks[-3] if ks[-3] is not None else self.table.new(hk), slot])
        else:
            self._union(qs[-3], ks[-3])
        if qs[-3] is not None:
            self.table.tag(qs[-3], "attention_heads")
        self.set(out, (*qs[:-3], qs[-3], qs[-2], vs[-1]))
        return True

    def _reshape(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        xs = self.spaces(x) or (None,) * x.dim()
        in_shape, out_shape = list(x.shape), list(out.shape)
        result: list[int | None] = [None] * len(out_shape)
        i = j = 0
        while i < len(in_shape) or j < len(out_shape):
            # skip singleton dims
            if i < len(in_shape) and in_shape[i] == 1:
                i += 1
                continue
            if j < len(out_shape) and out_shape[j] == 1:
                j += 1
                continue
            if i >= len(in_shape) or j >= len(out_shape):
                return False
            gi, gj = [i], [j]
            pi, pj = in_shape[i], out_shape[j]
            while pi != pj:
                if pi < pj:
                    i += 1
                    gi.append(i)
                    pi *= in_shape[i]
                else:
                    j += 1
                    gj.append(j)
                    pj *= out_shape[j]
            gi = [d for d in gi if in_shape[d] > 1]
            gj = [d for d in gj if out_shape[d] > 1]
            in_sp = [xs[d] for d in gi]
            if len(gi) == 1 and len(gj) == 1:
                result[gj[0]] = in_sp[0]
            elif len(gi) == 1:
                src = in_sp[0]
                if src is not None:
                    sizes = [out_shape[d] for d in gj]
                    info = self.table.info(src)
                    existing = info.factors
                    if existing is not None and [self.table.size(f) for f in existing] == sizes:
                        parts = list(existing)
                    else:
                        parts = [self.table.new(s) for s in sizes]
                        self.table.set_factors(src, parts)
                    for d, p in zip(gj, parts):
                        result[d] = p
            elif len(gj) == 1:
                if all(s is None for s in in_sp):
                    result[gj[0]] = None
                elif any(s is None for s in in_sp):
                    for s in in_sp:
                        if s is not None:
                            self.table.block(s, "merged with a batch dimension")
                    sid = self.table.new(out_shape[gj[0]])
                    self.table.block(sid, "merged with a batch dimension")
                    result[gj[0]] = sid
                else:
                    result[gj[0]] = self.table.product_of([s for s in in_sp if s is not None])
            else:
                return False
            i, j = i + 1, j + 1
        self.set(out, result)
        return True

    def _expand(self, x: torch.Tensor, out: torch.Tensor) -> bool:
        xs = list(self.spaces(x) or (None,) * x.dim())
        lead = out.dim() - x.dim()
        result: list[int | None] = [None] * lead
        for d in range(x.dim()):
            if x.shape[d] == 1 and out.shape[lead + d] > 1:
                result.append(self.table.new(out.shape[lead + d], tag="broadcast"))
            else:
                result.append(xs[d])
        self.set(out, result)
        return True

    def _slice_dim(self, x: torch.Tensor, dim: int, start: int, stop: int, out: torch.Tensor) -> bool:
        xs = list(self.spaces(x) or (None,) * x.dim())
        if xs[dim] is not None:
            xs[dim] = self.table.segment(xs[dim], start, stop)
        self.set(out, xs)
        return True

    def _getitem(self, x: torch.Tensor, idx: Any, out: Any) -> bool:
        if not isinstance(out, torch.Tensor):
            return False
        xs = self.spaces(x) or (None,) * x.dim()
        items = list(idx) if isinstance(idx, tuple) else [idx]
        if any(isinstance(it, torch.Tensor) or isinstance(it, list) for it in items):
            return False
        n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
        expanded: list[Any] = []
        for it in items:
            if it is Ellipsis:
                expanded.extend([slice(None)] * (x.dim() - n_real))
            else:
                expanded.append(it)
        expanded.extend([slice(None)] * (x.dim() - sum(1 for it in expanded if it is not None)))
        result: list[int | None] = []
        d = 0
        for it in expanded:
            if it is None:
                result.append(None)
                continue
            s = xs[d]
            size = x.shape[d]
            if isinstance(it, int):
                if s is not None:
                    self.table.block(s, "integer indexing")
            elif isinstance(it, slice):
                start, stop, step = it.indices(size)
                if step != 1:
                    if s is not None:
                        self.table.block(s, "strided slicing")
                    result.append(None if s is None else self._blocked_new(max(0, (stop - start + step - 1) // step)))
                elif s is None:
                    result.append(None)
                else:
                    result.append(self.table.segment(s, start, stop))
            else:
                return False
            d += 1
        self.set(out, result)
        return True

    def _blocked_new(self, size: int) -> int:
        sid = self.table.new(size)
        self.table.block(sid, "strided slicing")
        return sid

    def _split(self, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
        x = args[0]
        xs = self.spaces(x) or (None,) * x.dim()
        pieces = list(out)
        if name == "unbind":
            dim = (_arg(args, kwargs, 1, "dim") or 0) % x.dim()
            if xs[dim] is not None:
                self.table.block(xs[dim], "unbind")
            for p in pieces:
                self.set(p, [s for i, s in enumerate(xs) if i != dim])
            return True
        dim = _arg(args, kwargs, 2, "dim")
        dim = (dim if dim is not None else 0) % x.dim()
        offset = 0
        for p in pieces:
            length = p.shape[dim]
            self._slice_dim(x, dim, offset, offset + length, p)
            offset += length
        return True

    def _cat(self, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        tensors = [t for t in _arg(args, kwargs, 0, "tensors") if isinstance(t, torch.Tensor)]
        dim = _arg(args, kwargs, 1, "dim")
        dim = (dim if dim is not None else 0) % out.dim()
        result: list[int | None] = []
        for d in range(out.dim()):
            if d == dim:
                parts = []
                for t in tensors:
                    ts = self.spaces(t) or (None,) * t.dim()
                    parts.append(ts[d] if ts[d] is not None else self.table.new(t.shape[d], tag="constant"))
                result.append(self.table.concat_of(parts) if any(
                    (self.spaces(t) or (None,) * t.dim())[d] is not None for t in tensors) else None)
            else:
                sp = None
                for t in tensors:
                    ts = self.spaces(t) or (None,) * t.dim()
                    if t.shape[d] == out.shape[d]:
                        sp = self._union(sp, ts[d])
                result.append(sp)
        self.set(out, result)
        return True

    def _norm(self, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
        x = _arg(args, kwargs, 0, "input")
        xs = self.spaces(x) or (None,) * x.dim()
        shape = _arg(args, kwargs, 1, "normalized_shape")
        weight = _arg(args, kwargs, 2, "weight")
        bias = _arg(args, kwargs, 3, "bias") if name == "layer_norm" else None
        nd = len(shape) if isinstance(shape, (list, tuple)) else 1
        for k in range(1, nd + 1):
            s = xs[-k]
            if s is None:
                continue
            self.table.tag(s, "normalized")
            if name != "rms_norm":
                self.table.tag(s, "mean_centered")
        for p in (weight, bias):
            ps = self.spaces(p)
            if ps is not None:
                for k in range(1, len(ps) + 1):
                    self._union(xs[-k], ps[-k])
        self.set(out, xs)
        return True

    def _match_by_shape(self, x: torch.Tensor, out: torch.Tensor) -> list[int | None]:
        xs = [s for s, size in zip(self.spaces(x) or (), x.shape) if size != 1]
        return [xs.pop(0) if size != 1 and xs else None for size in out.shape]


def _flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in _flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in _flatten(x)]
    return [obj]


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in _flatten((args, kwargs)):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


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
    return TraceResult(tracer.table, tracer.param_spaces(), tuple(out_spaces), tracer.unknown_ops)
