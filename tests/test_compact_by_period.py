"""Cutting each pruning period's structures out as the period ends (``compact_at=period_end``).

Every cut removes structures that are exactly zero and held there, so the smaller model computes what the masked
model computes: the same groups are selected, the same losses are logged, and the final weights agree to float
rounding. A resume replays the cuts before the checkpoint's parameters load and continues bit-identically.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_lhspg import random_batches
from test_prune import _stage_cfg
from tiny_models import plain_tiny_llama, tiny_model

from lorashear.compaction import Compactions, compact
from lorashear.errors import ConfigError
from lorashear.stages import prune as prune_stage

STEPS = 14  # warm-up 2, two periods of 3: the first cut after step 5, the second as pruning ends at step 8


def _cfg(out, **kw):
    """The stage config of these tests: every period cuts (``compact_min_gain`` 0) unless a test says otherwise."""
    return _stage_cfg(out, steps=STEPS, **{"compact_min_gain": 0.0, **kw})


def _run(out, model=None, **kw):
    return prune_stage.run(_cfg(out, **kw), model=model or plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16))


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def _assert_same_training(a, b, out_a, out_b, *, rtol=1e-4, atol=1e-5):
    assert a.report["groups"]["selected_ids"] == b.report["groups"]["selected_ids"]
    losses_a = [r["loss"] for r in a.report["log"]]
    losses_b = [r["loss"] for r in b.report["log"]]
    assert len(losses_a) == STEPS and losses_a == pytest.approx(losses_b, rel=rtol)
    wa, wb = _weights(out_a), _weights(out_b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert wa[name].shape == wb[name].shape, name
        torch.testing.assert_close(wa[name], wb[name], rtol=rtol, atol=atol, msg=name)


def test_cutting_each_period_trains_what_the_masked_model_trains(tmp_path):
    per = _run(tmp_path / "per", compact_at="period_end")
    once = _run(tmp_path / "once", compact_at="prune_end")
    end = _run(tmp_path / "end", compact_at="end")
    cut = per.report["compaction"]
    assert cut["at"] == "period_end" and cut["step"] == 8
    assert [r["step"] for r in cut["rounds"]] == [5, 8]
    assert sum(r["groups"] for r in cut["rounds"]) == per.report["groups"]["selected"]
    # at every cut the smaller model's logits are the masked model's, and what was cut was exactly zero
    assert all(r["logit_diff"] < 1e-5 for r in cut["rounds"])
    assert per.report["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5
    assert per.report["groups"]["max_abs_selected"] == 0.0
    _assert_same_training(per, end, tmp_path / "per", tmp_path / "end")
    # the first period's steps after its cut run at the smaller width: fewer FLOPs than one cut at prune end
    flops = [r["flops_per_token"] for r in cut["rounds"]]
    assert flops[0] > flops[1]
    assert per.report["compute"]["student_fwd"] == end.report["compute"]["student_fwd"] == STEPS * 2 * 16
    assert per.report["compute"]["flops"] < once.report["compute"]["flops"] < end.report["compute"]["flops"]
    assert per.report["params"] == once.report["params"]


def test_a_cut_that_would_not_pay_waits_for_a_later_one(tmp_path):
    """With a gain threshold the first period's structures (worth 3 steps x their share) wait, exactly zero, and
    the last period's cut takes them along; the training is still the masked model's."""
    per = _run(tmp_path / "per", compact_at="period_end", compact_min_gain=0.5)
    end = _run(tmp_path / "end", compact_at="end")
    rounds = per.report["compaction"]["rounds"]
    assert [r["step"] for r in rounds] == [8]
    assert rounds[0]["groups"] == per.report["groups"]["selected"]
    _assert_same_training(per, end, tmp_path / "per", tmp_path / "end")
    cheap = _run(tmp_path / "cheap", compact_at="period_end", compact_min_gain=0.01)
    assert [r["step"] for r in cheap.report["compaction"]["rounds"]] == [5, 8]


def test_the_paper_recipe_cut_by_period_matches_its_masked_run(tmp_path):
    """The paper's recipe merges s*B*A into the base weights and restarts LoRA at every period end: after the cut,
    on the smaller weights."""
    per = _run(tmp_path / "per", recipe="paper", compact_at="period_end")
    end = _run(tmp_path / "end", recipe="paper", compact_at="end")
    assert len(per.report["compaction"]["rounds"]) == 2
    _assert_same_training(per, end, tmp_path / "per", tmp_path / "end")


@pytest.mark.parametrize("family", ["llama_mha", "qwen3", "phi3", "gemma", "olmo2"])
def test_cutting_each_period_matches_the_masked_model_on_every_family(tmp_path, family):
    """Overlapping kinds (a query-head slot loses the rows of a KV group cut before it), and every statistic that
    follows the cuts: the activation Fisher, FLAP's fluctuation, explicit transfer's Gram matrices."""
    kw = {"ratio": 0.3, "kinds": ("attention_head", "kv_group", "mlp_channel"),
          "saliency": ("fisher", "fluctuation", "magnitude"), "transfer": True}
    per = _run(tmp_path / "per", model=tiny_model(family, train=False), compact_at="period_end", **kw)
    end = _run(tmp_path / "end", model=tiny_model(family, train=False), compact_at="end", **kw)
    assert len(per.report["compaction"]["rounds"]) == 2
    atol = 1e-3 if family == "olmo2" else 1e-5  # q_norm / k_norm: exact up to their eps (RmsScale)
    _assert_same_training(per, end, tmp_path / "per", tmp_path / "end", rtol=1e-3, atol=atol)


def test_hidden_channels_cut_by_period_match_the_masked_model(tmp_path):
    kw = {"ratio": 0.3, "kinds": ("mlp_channel", "hidden_channel")}
    per = _run(tmp_path / "per", model=tiny_model("qwen3", train=False), compact_at="period_end", **kw)
    end = _run(tmp_path / "end", model=tiny_model("qwen3", train=False), compact_at="end", **kw)
    _assert_same_training(per, end, tmp_path / "per", tmp_path / "end")


@pytest.mark.parametrize("kill_at", [4, 6, 8, 11])  # before the first cut, between the cuts, at the last, after
def test_kill_and_resume_across_the_cuts_is_bit_identical(tmp_path, kill_at):
    whole = _run(tmp_path / "whole", compact_at="period_end")
    out = tmp_path / "killed"
    assert prune_stage.run(_cfg(out, compact_at="period_end"), model=plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16), stop_after=kill_at) is None
    resumed = _run(out, compact_at="period_end", resume=True)
    assert resumed.report["resumed_from"] == kill_at - kill_at % 2  # checkpoint every 2 steps
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]
    assert resumed.report["compaction"] == whole.report["compaction"]
    assert resumed.report["groups"]["selected_ids"] == whole.report["groups"]["selected_ids"]


@pytest.mark.parametrize("kill_at", [6, 11])
def test_every_weight_training_after_the_cuts_resumes_bit_identically(tmp_path, kill_at):
    kw = {"compact_at": "period_end", "post_pruning": "full", "post_lr": 1e-3}
    whole = _run(tmp_path / "whole", **kw)
    out = tmp_path / "killed"
    assert prune_stage.run(_cfg(out, **kw), model=plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16), stop_after=kill_at) is None
    resumed = _run(out, resume=True, **kw)
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]


def test_a_checkpoint_of_the_other_compaction_is_refused(tmp_path):
    from lorashear.errors import CheckpointError

    out = tmp_path / "p"
    assert prune_stage.run(_cfg(out, compact_at="prune_end"), model=plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16), stop_after=6) is None
    with pytest.raises(CheckpointError, match="compact_at"):
        _run(out, compact_at="period_end", resume=True)


def test_cuts_replayed_in_order_rebuild_the_same_model():
    from lorashear import discover

    model = plain_tiny_llama(train=False)
    graph = discover(model)
    heads = [g for g in graph.prunable() if g.kind == "attention_head"]
    mlp = [g for g in graph.prunable() if g.kind == "mlp_channel"]
    first = [mlp[0].id, mlp[5].id, heads[0].id]
    second = [mlp[3].id, mlp[40].id, heads[-1].id]
    steps = Compactions(graph.groups)
    steps.apply(model, first)
    later = steps.current(mlp[40])
    assert later is not None and steps.current(mlp[0]) is None
    assert later.slices[0].indices == (38,)  # channel 40 after channels 0 and 5 are gone
    steps.apply(model, second)
    assert steps.rounds == [first, second]
    at_once = plain_tiny_llama(train=False)
    compact(at_once, [graph.groups[i] for i in first + second])
    ids = torch.randint(0, 96, (2, 12))
    a, b = dict(model.named_parameters()), dict(at_once.named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    torch.testing.assert_close(model(input_ids=ids).logits, at_once(input_ids=ids).logits)
    with pytest.raises(ConfigError, match="not in the model"):
        steps.apply(model, [first[0]])
