"""The one-pass distillation loss equals the composed cross-entropy + KL, in value and gradient."""

import pytest
import torch

from lorashear.training import soft_targets
from lorashear.training.losses import (
    IGNORE_INDEX,
    DistillConfig,
    distillation_loss,
    kl_to_teacher,
    make_teacher,
    masked_distillation_loss,
    mask_prompt,
    next_token_losses,
    split_prompt_mask,
)
from lorashear.training.soft_targets import soft_target_loss
from test_lhspg import random_batches, tiny_lora_model


def _composed(logits, teacher_logits, labels, weight, temperature):
    total, count = next_token_losses(logits, labels)
    ce = total / count.clamp(min=1)
    kl = kl_to_teacher(logits, teacher_logits, temperature, mask=labels[:, 1:] != IGNORE_INDEX)
    return (1 - weight) * ce + weight * kl, ce, kl


@pytest.fixture
def small_slices(monkeypatch):
    """Slices of 3 positions, so a batch spans several slices and the last one is partial."""
    monkeypatch.setitem(soft_targets.CHUNK_ELEMENTS, "cpu", 3 * 37)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_equals_the_composed_loss_in_value_and_gradient(small_slices, weight, temperature):
    torch.manual_seed(0)
    logits = (torch.randn(2, 9, 37, dtype=torch.float64) * 3).requires_grad_(True)
    teacher = torch.randn(2, 9, 37, dtype=torch.float64) * 3
    labels = torch.randint(0, 37, (2, 9))
    labels[0, :4] = IGNORE_INDEX  # a prompt: those targets take no loss
    ref = logits.detach().clone().requires_grad_(True)
    expected, ce_ref, kl_ref = _composed(ref, teacher, labels, weight, temperature)
    expected.backward()
    loss, ce, kl = soft_target_loss(logits, teacher, labels, weight, temperature)
    loss.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(ce) == pytest.approx(float(ce_ref), rel=1e-5)
    if weight > 0:
        assert float(kl) == pytest.approx(float(kl_ref), rel=1e-5)
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-5, atol=1e-9)
    assert not ce.requires_grad and not kl.requires_grad
    assert logits.grad[:, -1].abs().max() == 0  # the last position predicts nothing


def test_no_target_gives_zero_loss_and_zero_gradient():
    logits = torch.randn(1, 4, 5, requires_grad=True)
    labels = torch.full((1, 4), IGNORE_INDEX)
    loss, _, _ = soft_target_loss(logits, torch.randn(1, 4, 5), labels, 0.5)
    loss.backward()
    assert float(loss) == 0.0 and float(logits.grad.abs().max()) == 0.0


def test_a_bfloat16_teacher_is_read_in_float32():
    torch.manual_seed(1)
    logits = torch.randn(1, 6, 11, requires_grad=True)
    teacher = torch.randn(1, 6, 11).bfloat16()
    labels = torch.randint(0, 11, (1, 6))
    loss = soft_target_loss(logits, teacher, labels, 0.5)[0]
    expected = _composed(logits, teacher.float(), labels, 0.5, 1.0)[0]
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_bad_input_is_refused():
    logits = torch.randn(1, 3, 5)
    labels = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="weight"):
        soft_target_loss(logits, logits, labels, 1.5)
    with pytest.raises(ValueError, match="teacher"):
        soft_target_loss(logits, None, labels, 0.5)
    with pytest.raises(ValueError, match="match"):
        soft_target_loss(logits, torch.randn(1, 3, 6), labels, 0.5)


def test_distillation_losses_give_the_composed_gradients_on_a_model(one_thread):
    """The prune stage's loss (plain text) and the masked one (prompt tokens) move the LoRA weights exactly as the
    model's own cross-entropy plus the KL did."""
    teacher = make_teacher(tiny_lora_model(seed=1).base_model.model)
    batch = random_batches(n=2, seq=10)
    prompted = batch.clone()
    prompted[:, :4] = mask_prompt(prompted[:, :4])
    for make, data in ((lambda c: distillation_loss(teacher, c), batch),
                       (lambda c: masked_distillation_loss(teacher, c), prompted)):
        fused_model, ref_model = tiny_lora_model(seed=1, random_b=True), tiny_lora_model(seed=1, random_b=True)
        make(DistillConfig(weight=0.5, temperature=2.0))(fused_model, data).backward()
        ids, labels = split_prompt_mask(data)
        with torch.no_grad():
            t_logits = teacher(input_ids=ids).logits
        _composed(ref_model(input_ids=ids).logits, t_logits, labels, 0.5, 2.0)[0].backward()
        grads = {n: p.grad for n, p in fused_model.named_parameters() if p.grad is not None}
        assert grads  # LoRA factors received gradients
        for name, param in ref_model.named_parameters():
            if param.grad is not None:
                torch.testing.assert_close(grads[name], param.grad, rtol=1e-4, atol=1e-7)
