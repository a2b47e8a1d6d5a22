"""What a family's config accepts as a pruned width, asked of the config class itself.

transformers validates a config when it is built and when it is saved. Some families check the hidden size
against the number of attention heads even where ``head_dim`` is given (``LlamaConfig`` and the Gemma 2/3
configs in transformers 5: ``hidden_size % num_attention_heads == 0``), so a model whose residual width was
pruned to any other size cannot be saved. :func:`hidden_size_multiple` finds the multiple by building the
config with other hidden sizes, so no list of families has to be kept in step with transformers.
"""

from __future__ import annotations

from typing import Any


def _accepts(config: Any, hidden_size: int) -> bool:
    try:
        type(config).from_dict({**config.to_dict(), "hidden_size": hidden_size})
    except Exception:  # noqa: BLE001 - a refusal is any error: ValueError, huggingface_hub's StrictDataclass... errors
        return False
    return True


def hidden_size_multiple(config: Any) -> int:
    """The multiple a pruned hidden size of ``config``'s model must keep so its config class accepts it: 1 when
    any size is accepted, the attention head count when the config checks divisibility by it, 0 when neither
    (the hidden size cannot change)."""
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    if hidden < 2:
        return 0
    if _accepts(config, hidden - 1):
        return 1
    heads = int(getattr(config, "num_attention_heads", 0) or 0)
    if 1 < heads < hidden and _accepts(config, hidden - heads):
        return heads
    return 0


__all__ = ["hidden_size_multiple"]
