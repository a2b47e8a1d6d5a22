"""Operator rules of the space tracer: a registry, one entry per operator name.

A rule ``fn(tracer, name, args, kwargs, out) -> bool`` gives an operator's outputs their spaces
(unifying or restructuring the spaces of its inputs on the way, see :mod:`lorashear.graph.spaces`)
and returns ``False`` on a case it does not understand; the tracer then blocks every tracked
dimension involved, which is safe. Each entry also says how the channels of a *zeroed* group
pass through the operator (``zeros``), which is what decides whether a reduction over those
channels is exact (a sum over channels that are zero) or not (a sum of ``exp`` of them):

- ``"all"``: the output is zero there when every input is (reshapes, slices, additions; a
  non-zero scalar operand, ``x + 1``, breaks it);
- ``"first"``: as the first tensor input (``silu``, ``neg``, ``to``: ``f(0) = 0``);
- ``"cover"``: when any input that is zero there spans every tracked dimension of the output
  (multiplications: ``x * w``, ``q @ k^T``);
- ``"source"``: always (``linear``/``embedding``: the group's rows or columns are zeroed);
- ``"none"``: never known (``exp``, ``sigmoid``, ``softmax``, comparisons).

Reductions over a dimension are described by :data:`REDUCTIONS` (operator -> effect); the tracer
records each reduction over a tracked (prunable) dimension and discovery decides, per structure,
whether removing it is exact, exact after compensating a norm scale, or impossible.

Adding an operator is one ``@rule(...)`` function or one name in a table here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

#: the tracer (:class:`lorashear.graph.trace.SpaceTracer`; not imported: it imports this module)
Tracer = Any
RuleFn = Callable[[Tracer, str, tuple, dict, Any], bool]
ZeroMode = str  # "all" | "first" | "cover" | "source" | "none" | "pow"


@dataclass(frozen=True)
class OpRule:
    fn: RuleFn
    zeros: ZeroMode = "none"


RULES: dict[str, OpRule] = {}


def rule(*names: str, zeros: ZeroMode = "none") -> Callable[[RuleFn], RuleFn]:
    """Register ``fn`` as the rule of every operator in ``names``."""
    def register(fn: RuleFn) -> RuleFn:
        for name in names:
            RULES[name] = OpRule(fn, zeros)
        return fn
    return register


# -- reductions ---------------------------------------------------------------------------------------

#: How a reduction over a channel dimension treats the channels of a removed (zeroed) structure:
#: ``"sum"``: zeros add nothing, exact when the channels are zero where they are reduced;
#: ``"mean"``: divides by the channel count: exact only as the mean of squares of an RMS norm whose
#: scale parameter compaction can rescale (``sqrt(n / n_kept)``), otherwise mixing;
#: ``"mixing"``: the result depends on the removed channels (mean-centring, ``exp``): never exact;
#: ``"order"``: order-dependent (``max``, ``cumsum``): the dimension is blocked outright.
REDUCTIONS: dict[str, str] = {
    "sum": "sum", "nansum": "sum", "norm": "sum",
    "mean": "mean", "nanmean": "mean",
    "var": "mixing", "std": "mixing", "var_mean": "mixing", "std_mean": "mixing", "logsumexp": "mixing",
    "softmax": "mixing", "log_softmax": "mixing", "_softmax": "mixing",
    "amax": "order", "amin": "order", "max": "order", "min": "order", "argmax": "order", "argmin": "order",
    "all": "order", "any": "order", "prod": "order", "cumsum": "order",
}

# -- helpers --------------------------------------------------------------------------------------


def flatten(obj: Any) -> list[Any]:
    if isinstance(obj, (list, tuple)):
        return [y for x in obj for y in flatten(x)]
    if isinstance(obj, dict):
        return [y for x in obj.values() for y in flatten(x)]
    return [obj]


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in flatten((args, kwargs)):
        if isinstance(a, torch.Tensor):
            return a
    return None


def arg(args: tuple, kwargs: dict, pos: int, name: str) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _spaces_or_none(t: Tracer, x: torch.Tensor) -> tuple:
    return t.spaces(x) or (None,) * x.dim()


# -- element-wise ---------------------------------------------------------------------------------

#: shape-preserving operators with f(0) = 0
ZERO_PRESERVING = {
    "contiguous", "clone", "detach", "to", "float", "half", "bfloat16", "double", "type_as", "type",
    "dropout", "alpha_dropout", "feature_alpha_dropout", "requires_grad_", "cpu", "cuda",
    "neg", "__neg__", "silu", "gelu", "relu", "tanh", "sqrt", "square", "abs", "erf", "log1p", "sin",
    "mish", "elu", "leaky_relu", "relu6", "hardswish", "gelu_pytorch_tanh", "nan_to_num", "sign",
    "silu_", "relu_", "zero_", "detach_", "tanh_", "neg_", "round",
}
#: shape-preserving operators that do not keep zeros (f(0) != 0) or whose value is unknown
NOT_ZERO_PRESERVING = {
    "exp", "rsqrt", "cos", "sigmoid", "log", "reciprocal", "softplus", "hardsigmoid", "clamp", "clip",
    "clamp_", "clamp_min", "clamp_max", "logical_not", "__invert__", "fill_", "masked_fill_", "exp_", "sigmoid_",
}
POWERS = {"pow", "__pow__", "float_power"}


@rule(*ZERO_PRESERVING, zeros="first")
@rule(*NOT_ZERO_PRESERVING, zeros="none")
@rule(*POWERS, zeros="pow")
def _identity(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    src = first_tensor(args, kwargs)
    if isinstance(out, torch.Tensor) and src is not None and tuple(out.shape) == tuple(src.shape):
        t.set(out, t.spaces(src) or ())
        return True
    if isinstance(out, torch.Tensor) and src is not None and out.dim() == src.dim():
        return elementwise(t, [src], out)
    return False


ADDITIVE = {"add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
            "rsub", "maximum", "minimum"}
MULTIPLICATIVE = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "__and__", "logical_and", "bitwise_and"}
DIVISIONS = {"div", "__truediv__", "__itruediv__", "div_"}
OTHER_ELEMENTWISE = {
    "__rtruediv__", "where", "masked_fill", "lerp", "addcmul", "addcdiv", "copy_", "__or__",
    "eq", "__eq__", "ne", "__ne__", "lt", "__lt__", "le", "__le__", "gt", "__gt__", "ge", "__ge__", "__mod__",
    "fmod", "remainder", "logical_or", "bitwise_or", "__rpow__",
}


@rule(*ADDITIVE, zeros="all")
@rule(*MULTIPLICATIVE, zeros="cover")
@rule(*DIVISIONS, zeros="first")
@rule(*OTHER_ELEMENTWISE, zeros="none")
def _elementwise_rule(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    return elementwise(t, [a for a in flatten((args, kwargs)) if isinstance(a, torch.Tensor)], out)


def elementwise(t: Tracer, tensors: list[torch.Tensor], out: Any) -> bool:
    """Unify the aligned (right-aligned, equal-size) dimensions of ``tensors`` with ``out``'s."""
    if not isinstance(out, torch.Tensor):
        return False
    result: list[int | None] = [None] * out.dim()
    for x in tensors:
        xs = _spaces_or_none(t, x)
        for k in range(1, min(x.dim(), out.dim()) + 1):
            if x.shape[-k] == out.shape[-k] and out.shape[-k] > 1:
                result[-k] = t.union(result[-k], xs[-k])
    t.set(out, result)
    return True


# -- stems ----------------------------------------------------------------------------------------

@rule("linear", zeros="source")
def _linear(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    ws = t.spaces(w)
    xs = _spaces_or_none(t, x)
    if ws is None or len(ws) != 2:
        return False
    t.union(xs[-1], ws[1])
    if ws[0] is None:
        t.set(out, (*xs[:-1], None))
        return True
    if b is not None:
        bs = t.spaces(b)
        if bs is not None:
            t.union(bs[0], ws[0])
    t.set(out, (*xs[:-1], ws[0]))
    return True


@rule("embedding", zeros="source")
def _embedding(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    ws = t.spaces(arg(args, kwargs, 1, "weight"))
    if ws is None:
        return False
    t.set(out, (None,) * (out.dim() - 1) + (ws[1],))
    if ws[0] is not None:
        t.table.tag(ws[0], "vocab")
    return True


# -- reductions and norms ---------------------------------------------------------------------------

def _reduced_dims(x: torch.Tensor, dim: Any) -> list[int] | None:
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    if isinstance(dim, int):
        return [dim % x.dim()]
    if isinstance(dim, (list, tuple)) and all(isinstance(d, int) for d in dim):
        return [d % x.dim() for d in dim]
    return None


@rule(*(n for n in REDUCTIONS if "softmax" not in n and n != "logsumexp"), zeros="first")
@rule("logsumexp", zeros="none")
def _reduce(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    x = args[0] if args else kwargs.get("input")
    xs = t.spaces(x) or ()
    at = 2 if name == "norm" else 1  # norm(input, p, dim, keepdim)
    dims = _reduced_dims(x, arg(args, kwargs, at, "dim"))
    if dims is None:
        return False
    keepdim = bool(arg(args, kwargs, at + 1, "keepdim") or False)
    effect = REDUCTIONS[name]
    if name == "norm":
        p = arg(args, kwargs, 1, "p")
        p = 2 if p in (None, "fro") else p
        if not isinstance(p, (int, float)) or p < 0:  # a p-norm with p >= 0 ignores zeros; p < 0 does not
            effect = "mixing"
    tracked = [(d, xs[d]) for d in dims if d < len(xs) and xs[d] is not None]
    for d, s in tracked:
        if effect == "order":
            t.table.block(s, f"order-dependent reduction '{name}'")
        else:
            t.reduction(name, x, s, effect if len(tracked) == 1 else "mixing", out)
    for o in (o for o in flatten(out) if isinstance(o, torch.Tensor)):
        if keepdim:
            t.set(o, [None if i in dims else s for i, s in enumerate(xs)])
        else:
            t.set(o, [s for i, s in enumerate(xs) if i not in dims])
    return True


@rule("softmax", "log_softmax", "_softmax", zeros="none")
def _softmax(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    x = first_tensor(args, kwargs)
    dim = arg(args, kwargs, 1, "dim")
    xs = t.spaces(x) or ()
    if dim is not None and xs[dim % x.dim()] is not None:
        t.reduction(name, x, xs[dim % x.dim()], "mixing", out)
    t.set(out, xs)
    return True


@rule("rms_norm", zeros="first")
@rule("layer_norm", "group_norm", zeros="none")
def _norm(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x = arg(args, kwargs, 0, "input")
    xs = _spaces_or_none(t, x)
    shape = arg(args, kwargs, 1, "normalized_shape")
    weight = arg(args, kwargs, 2, "weight")
    bias = arg(args, kwargs, 3, "bias") if name == "layer_norm" else None
    nd = len(shape) if isinstance(shape, (list, tuple)) else 1
    for p in (weight, bias):
        ps = t.spaces(p)
        if ps is not None:
            for k in range(1, len(ps) + 1):
                t.union(xs[-k], ps[-k])
    tracked = [xs[-k] for k in range(1, nd + 1) if xs[-k] is not None]
    for s in tracked:
        if name != "rms_norm":
            t.table.tag(s, "mean_centered")
        simple_rms = name == "rms_norm" and len(tracked) == 1 and weight is not None
        red = t.reduction(name, x, s, "mean" if simple_rms else "mixing", out)
        if simple_rms:
            t.rms_scaled_by(red, weight)
    t.set(out, xs)
    return True


# -- attention ------------------------------------------------------------------------------------

@rule("matmul", "__matmul__", "bmm", "__rmatmul__", zeros="cover")
def _matmul(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    a, b = (args[1], args[0]) if name == "__rmatmul__" else (args[0], args[1])
    if a.dim() < 2 or b.dim() < 2:
        return False
    as_, bs = _spaces_or_none(t, a), _spaces_or_none(t, b)
    t.union(as_[-1], bs[-2])
    batch: list[int | None] = [None] * (out.dim() - 2)
    for k in range(3, out.dim() + 1):
        sa = as_[-k] if k <= a.dim() and a.shape[-k] == out.shape[-k] else None
        sb = bs[-k] if k <= b.dim() and b.shape[-k] == out.shape[-k] else None
        batch[-(k - 2)] = t.union(sa, sb)
    if not t.is_param(a) and not t.is_param(b) and any(s is not None for s in batch):
        # activation x activation with per-head batch dims: this is attention
        for s in batch:
            if s is not None:
                t.table.tag(s, "attention_heads")
        for s in (as_[-1], bs[-1], as_[-2], bs[-2]):
            if s is not None:
                t.table.mark_indivisible(s)
    t.set(out, (*batch, as_[-2], bs[-1]))
    return True


@rule("scaled_dot_product_attention")
def _sdpa(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    q, k, v = (arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    qs, ks, vs = _spaces_or_none(t, q), _spaces_or_none(t, k), _spaces_or_none(t, v)
    for s in (qs[-1], ks[-1], vs[-1]):
        if s is not None:
            t.table.mark_indivisible(s)
    t.union(qs[-1], ks[-1])
    t.union(ks[-3], vs[-3])
    hq, hk = q.shape[-3], k.shape[-3]
    if hq != hk and qs[-3] is not None:
        slot = t.table.new(hq // hk, tag="gqa_slot")
        t.table.set_factors(qs[-3], [ks[-3] if ks[-3] is not None else t.table.new(hk), slot])
    else:
        t.union(qs[-3], ks[-3])
    if qs[-3] is not None:
        t.table.tag(qs[-3], "attention_heads")
    t.set(out, (*qs[:-3], qs[-3], qs[-2], vs[-1]))
    return True


# -- shapes ---------------------------------------------------------------------------------------

@rule("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "_unsafe_view", zeros="all")
def _reshape(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x = args[0]
    xs = _spaces_or_none(t, x)
    in_shape, out_shape = list(x.shape), list(out.shape)
    result: list[int | None] = [None] * len(out_shape)
    i = j = 0
    while i < len(in_shape) or j < len(out_shape):
        if i < len(in_shape) and in_shape[i] == 1:  # skip singleton dims
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
            _split_space(t, in_sp[0], [out_shape[d] for d in gj], gj, result)
        elif len(gj) == 1:
            result[gj[0]] = _merge_spaces(t, in_sp, out_shape[gj[0]])
        else:
            return False
        i, j = i + 1, j + 1
    t.set(out, result)
    return True


def _split_space(t: Tracer, src: int | None, sizes: list[int], dims: list[int], result: list[int | None]) -> None:
    if src is None:
        return
    existing = t.table.info(src).factors
    if existing is not None and [t.table.size(f) for f in existing] == sizes:
        parts = list(existing)
    else:
        parts = [t.table.new(s) for s in sizes]
        t.table.set_factors(src, parts)
    for d, p in zip(dims, parts):
        result[d] = p


def _merge_spaces(t: Tracer, in_sp: list[int | None], size: int) -> int | None:
    if all(s is None for s in in_sp):
        return None
    if any(s is None for s in in_sp):
        for s in in_sp:
            if s is not None:
                t.table.block(s, "merged with a batch dimension")
        sid = t.table.new(size)
        t.table.block(sid, "merged with a batch dimension")
        return sid
    return t.table.product_of([s for s in in_sp if s is not None])


@rule("transpose", "swapaxes", "swapdims", zeros="all")
def _transpose(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x, d0, d1 = args[0], arg(args, kwargs, 1, "dim0"), arg(args, kwargs, 2, "dim1")
    xs = list(t.spaces(x) or ())
    d0, d1 = d0 % x.dim(), d1 % x.dim()
    xs[d0], xs[d1] = xs[d1], xs[d0]
    t.set(out, xs)
    return True


@rule("permute", zeros="all")
def _permute(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x = args[0]
    dims = args[1:] if len(args) > 2 or isinstance(args[1], int) else args[1]
    dims = kwargs.get("dims", dims)
    xs = t.spaces(x) or ()
    t.set(out, [xs[d % x.dim()] for d in dims])
    return True


@rule("t", "T", "mT", zeros="all")
def _t(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    xs = t.spaces(args[0]) or ()
    t.set(out, tuple(reversed(xs)) if len(xs) <= 2 else (*xs[:-2], xs[-1], xs[-2]))
    return True


@rule("unsqueeze", zeros="all")
def _unsqueeze(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x, d = args[0], arg(args, kwargs, 1, "dim")
    xs = list(t.spaces(x) or ())
    xs.insert(d % (x.dim() + 1), None)
    t.set(out, xs)
    return True


@rule("squeeze", zeros="all")
def _squeeze(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x = args[0]
    xs = t.spaces(x) or ()
    kept = [s for s, size in zip(xs, x.shape) if size != 1 or s is not None]
    if len(kept) != out.dim():
        rest = [s for s, size in zip(xs, x.shape) if size != 1]
        kept = [rest.pop(0) if size != 1 and rest else None for size in out.shape]
    t.set(out, kept)
    return True


@rule("expand", "expand_as", "broadcast_to")  # repeated entries (repeat_kv) are not a removed group's zeros
def _expand(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x = args[0]
    xs = list(_spaces_or_none(t, x))
    lead = out.dim() - x.dim()
    result: list[int | None] = [None] * lead
    for d in range(x.dim()):
        if x.shape[d] == 1 and out.shape[lead + d] > 1:
            result.append(t.table.new(out.shape[lead + d], tag="broadcast"))
        else:
            result.append(xs[d])
    t.set(out, result)
    return True


# -- slices and concatenations --------------------------------------------------------------------

def slice_dim(t: Tracer, x: torch.Tensor, dim: int, start: int, stop: int, out: torch.Tensor) -> bool:
    xs = list(_spaces_or_none(t, x))
    if xs[dim] is not None:
        xs[dim] = t.table.segment(xs[dim], start, stop)
    t.set(out, xs)
    return True


@rule("narrow", zeros="all")
def _narrow(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    x, dim, start, length = args[0], args[1], args[2], args[3]
    return slice_dim(t, x, dim % x.dim(), int(start), int(start) + int(length), out)


@rule("__getitem__", zeros="all")
def _getitem(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    x, idx = args[0], args[1]
    if not isinstance(out, torch.Tensor):
        return False
    xs = _spaces_or_none(t, x)
    items = list(idx) if isinstance(idx, tuple) else [idx]
    if any(isinstance(it, (torch.Tensor, list)) for it in items):
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
        if isinstance(it, int):
            if s is not None:
                t.table.block(s, "integer indexing")
        elif isinstance(it, slice):
            start, stop, step = it.indices(x.shape[d])
            if step != 1:
                if s is not None:
                    t.table.block(s, "strided slicing")
                    s = t.table.new(max(0, (stop - start + step - 1) // step))
                    t.table.block(s, "strided slicing")
                result.append(s)
            else:
                result.append(None if s is None else t.table.segment(s, start, stop))
        else:
            return False
        d += 1
    t.set(out, result)
    return True


@rule("chunk", "split", "tensor_split", "split_with_sizes", "unbind", zeros="all")
def _split(t: Tracer, name: str, args: tuple, kwargs: dict, out: Any) -> bool:
    x = args[0]
    xs = _spaces_or_none(t, x)
    pieces = list(out)
    if name == "unbind":
        dim = (arg(args, kwargs, 1, "dim") or 0) % x.dim()
        if xs[dim] is not None:
            t.table.block(xs[dim], "unbind")
        for p in pieces:
            t.set(p, [s for i, s in enumerate(xs) if i != dim])
        return True
    dim = arg(args, kwargs, 2, "dim")
    dim = (dim if dim is not None else 0) % x.dim()
    offset = 0
    for p in pieces:
        length = p.shape[dim]
        slice_dim(t, x, dim, offset, offset + length, p)
        offset += length
    return True


@rule("cat", "concat", "concatenate", zeros="all")
def _cat(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    tensors = [x for x in arg(args, kwargs, 0, "tensors") if isinstance(x, torch.Tensor)]
    dim = arg(args, kwargs, 1, "dim")
    dim = (dim if dim is not None else 0) % out.dim()
    all_spaces = [_spaces_or_none(t, x) for x in tensors]
    result: list[int | None] = []
    for d in range(out.dim()):
        if d == dim:
            if any(xs[d] is not None for xs in all_spaces):
                result.append(t.table.concat_of([xs[d] if xs[d] is not None else t.table.new(x.shape[d], tag="constant")
                                                 for x, xs in zip(tensors, all_spaces)]))
            else:
                result.append(None)
            continue
        sp = None
        for x, xs in zip(tensors, all_spaces):
            if x.shape[d] == out.shape[d]:
                sp = t.union(sp, xs[d])
        result.append(sp)
    t.set(out, result)
    return True


@rule("stack", zeros="all")
def _stack(t: Tracer, name: str, args: tuple, kwargs: dict, out: torch.Tensor) -> bool:
    tensors = list(arg(args, kwargs, 0, "tensors"))
    dim = (arg(args, kwargs, 1, "dim") or 0) % out.dim()
    stacked: list[int | None] = []
    for i in range(out.dim()):
        if i == dim:
            stacked.append(None)
            continue
        j = i if i < dim else i - 1
        sp = None
        for x in tensors:
            sp = t.union(sp, _spaces_or_none(t, x)[j])
        stacked.append(sp)
    t.set(out, stacked)
    return True
