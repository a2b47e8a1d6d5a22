"""Importance proxies of the knowledge analysis: which structures of a node group are pruned first.

A proxy is ``proxy(group, params) -> importance`` (the lowest-scored structures go first). The proxies
are a registry: a new one is one ``@register_proxy("name")`` factory here (or in any module imported
before the analysis runs), given a :class:`ProxyContext` (the model, the structures to score, the
analysis tokens, the seed), returning the proxy.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import ConfigError
from ..graph.groups import Group

#: ``proxy(group, params) -> importance``; the lowest-scored structures are pruned first.
Proxy = Callable[[Group, Mapping[str, torch.Tensor]], float]


@dataclass
class ProxyContext:
    """What a proxy factory may use: data proxies score ``groups`` on ``tokens`` with ``model``."""

    model: Any = None
    groups: Sequence[Group] = ()
    tokens: torch.Tensor | None = None
    seed: int = 0
    batch_size: int = 4


ProxyFactory = Callable[[ProxyContext], Proxy]
#: proxy factories by name, in registration order
PROXIES: dict[str, ProxyFactory] = {}


def register_proxy(name: str) -> Callable[[ProxyFactory], ProxyFactory]:
    """Register ``factory`` as the proxy called ``name``."""
    def register(factory: ProxyFactory) -> ProxyFactory:
        PROXIES[name] = factory
        return factory
    return register


def check_proxy_name(name: str) -> None:
    if name not in PROXIES:
        raise ConfigError(f"unknown proxy {name!r}; use {', '.join(PROXIES)}")


def make_proxy(name: str, context: ProxyContext) -> Proxy:
    """The proxy called ``name``, built for ``context``."""
    check_proxy_name(name)
    return PROXIES[name](context)


def resolve_proxy(name: str, seed: int = 0) -> Proxy:
    """A proxy that needs no model or data, by name (``fisher`` needs them: use :func:`make_proxy`)."""
    return make_proxy(name, ProxyContext(seed=seed))


def _base_slices(group: Group) -> list:
    base = [s for s in group.slices if "lora_" not in s.name]
    return base or list(group.slices)


@torch.no_grad()
def magnitude_proxy(group: Group, params: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of the group's base-weight slices (LoRA factors excluded)."""
    total = 0.0
    for s in _base_slices(group):
        p = params[s.name]
        total += float(p.index_select(s.dim, s.index_tensor(p.device)).double().pow(2).sum())
    return math.sqrt(total)


@torch.no_grad()
def avg_magnitude_proxy(group: Group, params: Mapping[str, torch.Tensor]) -> float:
    """:func:`magnitude_proxy` divided by the number of base weights in the group."""
    size = 0
    for s in _base_slices(group):
        shape = params[s.name].shape
        size += len(s.indices) * math.prod(d for i, d in enumerate(shape) if i != s.dim)
    return magnitude_proxy(group, params) / max(size, 1)


def random_proxy(seed: int = 0) -> Proxy:
    """A reproducible random order (a baseline for the magnitude proxy)."""

    def proxy(group: Group, params: Mapping[str, torch.Tensor]) -> float:
        return zlib.crc32(f"{seed}:{group.kind}:{group.layer}:{group.index}".encode()) / 2**32

    return proxy


def fisher_proxy(model: torch.nn.Module, groups: Sequence[Group], tokens: torch.Tensor,
                 batch_size: int = 4) -> Proxy:
    """The activation Fisher of each structure on ``tokens`` (one forward and backward pass per batch,
    no update), the same score LHSPG's ``fisher`` saliency uses; the model is left unchanged."""
    from ..lhspg.hooks import ActivationFisher
    from ..training.losses import lm_loss

    flags = {id(p): p.requires_grad for p in model.parameters()}
    was_training = model.training
    model.eval()
    fisher = ActivationFisher(model, list(groups))
    try:
        # gradients must reach every consumer's input: let the embeddings' output require grad
        handle = model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.requires_grad_(True))
        for p in model.parameters():
            p.requires_grad_(False)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                loss = lm_loss(model, tokens[start:start + batch_size])
                loss.backward()
        finally:
            handle.remove()
    finally:
        fisher.close()
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
            p.grad = None
        model.train(was_training)
    values = dict(zip((g.id for g in groups), fisher.scores(groups).tolist()))

    def proxy(group: Group, params: Mapping[str, torch.Tensor]) -> float:
        return values[group.id]

    proxy.__name__ = "fisher"
    return proxy


@register_proxy("magnitude")
def _magnitude(context: ProxyContext) -> Proxy:
    return magnitude_proxy


@register_proxy("avg_magnitude")
def _avg_magnitude(context: ProxyContext) -> Proxy:
    return avg_magnitude_proxy


@register_proxy("fisher")
def _fisher(context: ProxyContext) -> Proxy:
    if context.model is None or context.tokens is None:
        raise ConfigError("the fisher proxy needs the model and tokens: use fisher_proxy(model, groups, tokens)")
    return fisher_proxy(context.model, list(context.groups), context.tokens, context.batch_size)


@register_proxy("random")
def _random(context: ProxyContext) -> Proxy:
    return random_proxy(context.seed)


__all__ = ["PROXIES", "Proxy", "ProxyContext", "avg_magnitude_proxy", "fisher_proxy", "magnitude_proxy",
           "make_proxy", "random_proxy", "register_proxy", "resolve_proxy"]
