"""Distillation from cached top-k teacher logits: the same loss as the online teacher when k is the
vocabulary, exactly the sequences the loop reads, and a prune run that resumes bit-identically."""

from __future__ import annotations

import pytest
import torch

from lorashear.config import config_from_dict
from lorashear.errors import ConfigError
from lorashear.stages import prune as prune_stage
from lorashear.stages.prune import PruneConfig
from lorashear.training import TrainConfig
from lorashear.training.loop import train
from lorashear.training.losses import DistillConfig, distillation_loss, kl_to_teacher, make_teacher, mask_prompt
from lorashear.training.teacher_cache import build_topk_cache, kl_topk, rows_used, topk_distillation_loss
from test_lhspg import random_batches
from tiny_models import plain_tiny_llama


def _model(seed: int):
    return plain_tiny_llama(seed, train=False)


def test_topk_kl_over_the_whole_vocabulary_is_the_full_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    top = teacher.topk(11, dim=-1)
    for temp in (1.0, 2.0):
        torch.testing.assert_close(kl_topk(student, top.values, top.indices, temp),
                                   kl_to_teacher(student, teacher, temp), rtol=1e-5, atol=1e-6)
    small = teacher.topk(3, dim=-1)
    assert float(kl_topk(student, small.values, small.indices)) >= 0.0


def test_cached_loss_equals_the_online_loss_at_full_k_and_caches_what_the_loop_reads():
    teacher, student = _model(1), _model(2)
    data = random_batches(n=10, seq=12, vocab=student.config.vocab_size)
    vocab = student.config.vocab_size
    online = distillation_loss(make_teacher(teacher), DistillConfig(weight=0.5))
    rows = rows_used(10, steps=4, batch_size=2, grad_accum=1, seed=3)
    cache = build_topk_cache(make_teacher(teacher), data, rows, k=vocab, batch_size=3)
    cached = topk_distillation_loss(cache, 0.5)
    batch = data[rows[:2]]
    student.eval()
    with torch.no_grad():
        torch.testing.assert_close(cached(student, batch), online(student, batch), rtol=1e-5, atol=1e-5)
    # the loop reads only cached sequences (a training run with the cached loss would raise otherwise)
    read: list[torch.Tensor] = []

    def recording(model, batch):
        read.append(batch.clone())
        return cached(model, batch)

    train(student, data, config=TrainConfig(steps=4, batch_size=2, seed=3, progress=False), loss_fn=recording)
    assert len(read) == 4 and {tuple(r.tolist()) for b in read for r in b} == {tuple(data[i].tolist()) for i in rows}
    assert len(rows) == 8  # 4 steps x 2 sequences of one epoch's permutation: two sequences are never read
    with pytest.raises(KeyError, match="another data order"):
        cache.lookup(data[[i for i in range(10) if i not in rows][:1]])
    # instruction batches: the KL counts response tokens only, like the online masked loss
    masked = batch.clone()
    masked[:, :4] = mask_prompt(masked[:, :4])
    cache2 = build_topk_cache(make_teacher(teacher), masked, [0, 1], k=vocab)
    assert torch.isfinite(topk_distillation_loss(cache2, 1.0)(student, masked))


def test_prune_with_cached_teacher_runs_and_resumes_bit_identically(tmp_path):
    data = random_batches(n=16, seq=16)

    def cfg(out, **kw):
        return config_from_dict(PruneConfig, {
            "model": "", "out": str(out), "ratio": 0.1, "steps": 10, "batch_size": 2, "lr": 1e-2, "num_periods": 2,
            "warmup_steps": 2, "period_steps": 3, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
            "checkpoint_every": 2, "progress": False, "distill_weight": 0.5, "distill_topk": 16, **kw})

    full = prune_stage.run(cfg(tmp_path / "a"), model=_model(0), data=data)
    assert prune_stage.run(cfg(tmp_path / "b"), model=_model(0), data=data, stop_after=5) is None
    resumed = prune_stage.run(cfg(tmp_path / "b", resume=True), model=_model(0), data=data)
    assert [r["loss"] for r in full.report["log"]] == [r["loss"] for r in resumed.report["log"]]
    assert full.report["groups"]["selected_ids"] == resumed.report["groups"]["selected_ids"]
    online = prune_stage.run(cfg(tmp_path / "c", distill_topk=0), model=_model(0), data=data)
    assert [r["loss"] for r in online.report["log"]] != [r["loss"] for r in full.report["log"]]  # top-16 of 96


def test_recover_refuses_a_cached_teacher():
    from lorashear.stages.recover import RecoverConfig

    with pytest.raises(ConfigError, match="prune stage only"):
        config_from_dict(RecoverConfig, {"model": "m", "teacher": "t", "distill_weight": 0.5, "distill_topk": 8})
