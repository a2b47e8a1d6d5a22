"""LoRA dropout drawn by its gaps: dropout's distribution, dropout's gradient, reproducible, in place of peft's."""

from __future__ import annotations

import pytest
import torch

from lorashear.models.gap_dropout import GapDropout, dropped_positions, gap_dropout
from lorashear.models.lora import LoraSettings, attach_lora
from tiny_models import tiny_model


def test_positions_are_distinct_sorted_and_in_range():
    torch.manual_seed(0)
    for n, p in ((1, 0.05), (7, 0.2), (1000, 0.05), (100_003, 0.01)):
        for _ in range(20):
            pos = dropped_positions(n, p)
            assert pos.dtype == torch.int64
            if pos.numel():
                assert int(pos.min()) >= 0 and int(pos.max()) < n
                assert bool((pos[1:] > pos[:-1]).all())


def test_every_position_is_dropped_with_probability_p_independently():
    """Over many masks each position's drop rate is p (the first and the last included), the count per mask
    has the binomial's mean and variance, and neighbours are dropped together with probability p^2."""
    g = torch.Generator().manual_seed(1)
    n, p, draws = 40, 0.1, 20_000
    masks = torch.zeros(draws, n)
    for i in range(draws):
        masks[i, dropped_positions(n, p, generator=g)] = 1.0
    rate = masks.mean(0)
    sd = (p * (1 - p) / draws) ** 0.5  # 0.0021
    assert float((rate - p).abs().max()) < 4.5 * sd, rate
    counts = masks.sum(1)
    assert abs(float(counts.mean()) - n * p) < 4 * (n * p * (1 - p) / draws) ** 0.5
    assert abs(float(counts.var()) / (n * p * (1 - p)) - 1) < 0.05
    both = (masks[:, 1:] * masks[:, :-1]).mean()
    assert abs(float(both) - p * p) < 4 * (p * p / (draws * (n - 1))) ** 0.5 * 3


def test_a_large_tensor_loses_p_of_its_elements():
    torch.manual_seed(2)
    x = torch.ones(2, 256, 1536)
    y = gap_dropout(x, 0.05)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 0.002
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(3)
    x = torch.randn(3, 5, 16, requires_grad=True)
    y = gap_dropout(x, 0.25)
    y.sum().backward()
    kept = (y.detach() != 0).float()
    assert torch.equal(x.grad, kept / 0.75)
    assert torch.allclose(y.detach(), x.detach() * kept / 0.75)


def test_same_seed_same_masks_and_eval_is_identity():
    layer = GapDropout(0.05)
    x = torch.randn(4, 32, 64)
    torch.manual_seed(4)
    a = layer(x)
    torch.manual_seed(4)
    b = layer(x)
    assert torch.equal(a, b)
    assert not torch.equal(a, x)
    layer.eval()
    assert layer(x) is x
    assert GapDropout(0.0).train()(x) is x


def test_bad_probability_is_refused():
    with pytest.raises(ValueError):
        GapDropout(1.0)
    with pytest.raises(ValueError):
        dropped_positions(10, 0.0)


def test_attach_lora_uses_gap_dropout_unless_torch_is_asked():
    model = attach_lora(tiny_model("llama"), LoraSettings(dropout=0.05))
    kinds = {type(d).__name__ for m in model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                         torch.nn.ModuleDict)
             for d in m.lora_dropout.values()}
    assert kinds == {"GapDropout"}
    model = attach_lora(tiny_model("llama"), LoraSettings(dropout=0.05, dropout_sampler="torch"))
    kinds = {type(d).__name__ for m in model.modules() if isinstance(getattr(m, "lora_dropout", None),
                                                                         torch.nn.ModuleDict)
             for d in m.lora_dropout.values()}
    assert kinds == {"Dropout"}


def test_lora_model_trains_through_gap_dropout():
    torch.manual_seed(5)
    model = attach_lora(tiny_model("llama"), LoraSettings(dropout=0.1))
    for module in model.modules():  # nonzero B, so the dropout sits on the gradient's path
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.1)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)
