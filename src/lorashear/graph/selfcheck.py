"""Zero-invariance self-check for a model family without a dedicated adapter.

The tracer reasons operator by operator; a family nobody has checked may still use an operator
whose effect on removed channels the rules get wrong. Before such a family is pruned, discovery
builds a tiny random copy of its config (2 layers, a few heads of width 8, a small MLP and
vocabulary, O(1) activations, norm epsilons of 1e-12), discovers its groups, and for each group kind zeroes a few groups,
removes them with :func:`lorashear.compact` and compares the logits. A kind whose removal differs
from zeroing stops discovery with one line naming the family and the kind. It runs on the CPU in
well under a second and its verdict is kept per configuration for the process.

A config that cannot be shrunk (an unusual family) is not checked: a warning says so.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from ..errors import ConfigError

logger = logging.getLogger(__name__)

#: group kinds checked, and how many groups of each are zeroed per layer
CHECKED_KINDS = ("kv_group", "attention_head", "mlp_channel")
#: logits may differ by this much relative to their largest magnitude (float32 rounding; a real coupling such as
#: OLMo 2's q_norm over all heads shows up as 1e-2 and more)
RELATIVE_TOLERANCE = 1e-4
_SEQ = (3, 17, 42, 8, 31, 5, 60, 33, 2, 47, 14)
_verdicts: dict[str, str | None] = {}


def shrink_config(config: Any) -> Any:
    """A tiny copy of a decoder config: 2 layers, heads of width 8 (KV groups and slots kept as kinds),
    hidden = heads x 8, MLP 24, vocabulary 64. Raises if the config cannot be rebuilt that way."""
    values = config.to_dict()
    layers = int(values["num_hidden_layers"])
    heads = int(values["num_attention_heads"])
    kv = int(values.get("num_key_value_heads") or heads)
    new_kv = 1 if kv == 1 else 2
    new_heads = new_kv * min(heads // kv, 3) if kv != heads else 3
    new_kv = new_heads if kv == heads else new_kv
    vocab = 64
    values.update(num_hidden_layers=2, num_attention_heads=new_heads, num_key_value_heads=new_kv,
                  hidden_size=new_heads * 8, vocab_size=vocab, tie_word_embeddings=values.get("tie_word_embeddings"))
    if "head_dim" in values:
        values["head_dim"] = 8
    for key in ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size"):
        if isinstance(values.get(key), int):
            values[key] = 24
    for key, value in list(values.items()):
        if isinstance(value, list) and len(value) == layers:  # per-layer lists (layer_types, ...)
            values[key] = value[:2]
        if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
            values[key] = vocab - 1
        if key.endswith("token_id") and isinstance(value, list):
            values[key] = [min(v, vocab - 1) for v in value]
    for key in ("rope_scaling", "rope_parameters"):
        rope = values.get(key)
        if isinstance(rope, dict):  # per-frequency lists (longrope) follow the new head width
            values[key] = {k: (v[:4] if isinstance(v, list) else v) for k, v in rope.items()}
    for key, value in list(values.items()):  # the RMS rescale is exact up to eps: check the structure, not eps
        if (key.endswith("_eps") or key.endswith("epsilon")) and isinstance(value, float):
            values[key] = 1e-12
    values.pop("per_layer_config", None)
    values.pop("dtype", None)
    values.pop("torch_dtype", None)
    tiny = type(config).from_dict(values)
    tiny._attn_implementation = "eager"  # noqa: SLF001 - the masks of SDPA read values; eager is plain
    return tiny


def _tiny_model(model_class: type, config: Any, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    embedding = model.get_input_embeddings().weight
    with torch.no_grad():  # O(1) activations, non-trivial norms and biases: leaks show
        for p in model.parameters():
            if p.dim() == 1:
                p.normal_(1.0, 0.3)
            else:
                p.normal_(0.0, 1.0 if p is embedding else 1.0 / math.sqrt(p.shape[-1]))
    return model


def _pick(graph: Any, kind: str) -> list[Any]:
    """Up to two groups of ``kind`` per layer, keeping at least one of the kind in each layer."""
    chosen: list[Any] = []
    for layer in range(graph.num_layers):
        pool = [g for g in graph.in_layer(layer, [kind]) if g.prunable]
        total = len(graph.in_layer(layer, [kind]))
        chosen += pool[layer % 2::2][:min(2, total - 1)]
    return chosen


def check_zero_invariance(model: torch.nn.Module, discover: Callable[..., Any], *, seed: int = 0) -> None:
    """Raise :class:`~lorashear.errors.ConfigError` when, on a tiny random copy of ``model``'s family,
    removing groups of some kind is not the same as zeroing them. ``discover`` is
    :func:`lorashear.discover` (passed in: it calls this function)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    model_type = str(getattr(config, "model_type", "unknown"))
    try:
        tiny_config = shrink_config(config)
        key = f"{type(base).__name__}:{tiny_config.to_json_string()}"
    except Exception as exc:  # noqa: BLE001 - any family may fail to shrink
        logger.warning("model type '%s': no zero-invariance self-check (its config cannot be shrunk: %s: %s)",
                       model_type, type(exc).__name__, exc)
        return
    if key not in _verdicts:
        _verdicts[key] = _run(type(base), tiny_config, model_type, discover, seed)
    if _verdicts[key] is not None:
        raise ConfigError(_verdicts[key])


def _run(model_class: type, config: Any, model_type: str, discover: Callable[..., Any], seed: int) -> str | None:
    quiet = logging.getLogger("lorashear")  # the tiny copy's own notes (no adapter, unprunable kinds) are noise
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        reference = _tiny_model(model_class, config, seed)
        verdict = _compare(reference, discover(reference, self_check=False), config, model_type)
    except Exception as exc:  # noqa: BLE001 - a family whose tiny copy does not run is not checked
        verdict = exc
    finally:
        quiet.setLevel(level)
    if isinstance(verdict, Exception):
        logger.warning("model type '%s': no zero-invariance self-check (the tiny copy fails: %s: %s)",
                       model_type, type(verdict).__name__, verdict)
        return None
    if verdict is None:
        logger.info("model type '%s': zero-invariance self-check passed", model_type)
    return verdict


def _compare(reference: torch.nn.Module, graph: Any, config: Any, model_type: str) -> str | None:
    from ..compaction import compact
    from .groups import zero_groups

    ids = torch.tensor([[t % config.vocab_size for t in _SEQ]])
    for kind in CHECKED_KINDS:
        selection = _pick(graph, kind)
        if not selection:
            continue
        model = copy.deepcopy(reference)
        zero_groups(model, selection)
        with torch.no_grad():
            masked = model(ids).logits
            small = compact(model, selection)
            diff = (small(ids).logits - masked).abs().max().item()
        scale = max(1.0, masked.abs().max().item())
        if not diff <= RELATIVE_TOLERANCE * scale:
            return (f"model type '{model_type}' has no dedicated adapter and fails the zero-invariance self-check: "
                    f"removing {kind} groups is not the same as zeroing them on a tiny random copy (max logit "
                    f"difference {diff:.3g} of {scale:.3g}); it needs a dedicated adapter")
    return None
