"""Training losses: each a function ``loss(model, batch) -> scalar tensor``.

The training loop (:func:`lorashear.training.loop.train`) takes any of them; a new
loss is one function here. ``batch`` is a ``LongTensor[B, seq_len]`` of token ids.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LossFn = Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of the model on its own batch (labels = inputs, shifted inside)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss
