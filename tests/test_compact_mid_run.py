"""Compaction inside the prune stage (``compact_at=prune_end``): the small model trains on from the step pruning ends.

Zero-invariance makes the hand-over exact: the compacted LoRA model computes what the masked one does, its
optimizer state is the masked one's with the removed rows and columns cut out, and (without dropout, whose random
draws follow the tensor sizes) every later step computes what the masked run computes.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_lhspg import random_batches
from test_prune import _stage_cfg as _base_cfg
from tiny_models import plain_tiny_llama

from lorashear.compaction import compact, slice_optimizer
from lorashear.stages import prune as prune_stage

STEPS = 14  # warm-up 2, two periods of 3: pruning ends at step 8, then 6 steps of the small model


def _stage_cfg(out, **kw):
    """The prune stage's test config, cut once when pruning ends (what this module tests) unless told otherwise."""
    return _base_cfg(out, **{"compact_at": "prune_end", **kw})


def _run(out, **kw):
    return prune_stage.run(_stage_cfg(out, steps=STEPS, **kw), model=plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16))


def _weights(out):
    return load_file(str(out / "model.safetensors"))


def test_compacting_when_pruning_ends_trains_what_the_masked_model_trains(tmp_path):
    mid = _run(tmp_path / "mid")
    end = _run(tmp_path / "end", compact_at="end")
    assert mid.report["compaction"] == {"step": 8, "at": "prune_end"}
    assert end.report["compaction"] == {"step": STEPS, "at": "end"}
    # at the compaction step the small model's logits are the masked model's
    assert mid.report["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5
    assert mid.report["groups"]["selected_ids"] == end.report["groups"]["selected_ids"]
    # six more steps on the small model end where six more masked steps end (float rounding only)
    a, b = _weights(tmp_path / "mid"), _weights(tmp_path / "end")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].shape == b[name].shape, name
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    losses_mid = [r["loss"] for r in mid.report["log"]]
    losses_end = [r["loss"] for r in end.report["log"]]
    assert len(losses_mid) == STEPS and losses_mid == pytest.approx(losses_end, rel=1e-4)
    assert [r["phase"] for r in mid.report["log"][8:]] == ["compacted"] * 6
    # the small model's steps cost less: fewer FLOPs for the same tokens
    assert mid.report["compute"]["student_fwd"] == end.report["compute"]["student_fwd"] == STEPS * 2 * 16
    assert mid.report["compute"]["flops"] < end.report["compute"]["flops"]


@pytest.mark.parametrize("kill_at", [5, 8, 11])  # inside pruning, at the compaction step, after it
def test_kill_and_resume_across_the_compaction_is_bit_identical(tmp_path, kill_at):
    whole = _run(tmp_path / "whole")
    out = tmp_path / "killed"
    stopped = prune_stage.run(_stage_cfg(out, steps=STEPS), model=plain_tiny_llama(train=False),
                              data=random_batches(n=16, seq=16), stop_after=kill_at)
    assert stopped is None
    resumed = _run(out, resume=True)
    assert resumed.report["resumed_from"] == kill_at - kill_at % 2  # checkpoint every 2 steps
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]
    assert resumed.report["groups"]["selected_ids"] == whole.report["groups"]["selected_ids"]


def test_slice_optimizer_cuts_the_moments_with_the_parameters():
    lin = torch.nn.Linear(4, 6)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(3, 4)).square().sum().backward()
    opt.step()
    old_w, old_state = lin.weight, {k: v.clone() for k, v in opt.state[lin.weight].items()}
    keep_rows, keep_cols = torch.tensor([0, 2, 5]), torch.tensor([1, 3])
    new_w = torch.nn.Parameter(old_w.detach()[keep_rows][:, keep_cols].clone())
    slice_optimizer(opt, {id(old_w): (new_w, {0: keep_rows, 1: keep_cols})})
    assert opt.param_groups[0]["params"][0] is new_w and old_w not in opt.state
    state = opt.state[new_w]
    assert torch.equal(state["exp_avg"], old_state["exp_avg"][keep_rows][:, keep_cols])
    assert torch.equal(state["exp_avg_sq"], old_state["exp_avg_sq"][keep_rows][:, keep_cols])
    assert torch.equal(state["step"], old_state["step"])
    assert opt.state[lin.bias]["exp_avg"].shape == (6,)  # untouched parameters keep their state


def test_compact_reports_its_index_maps():
    from lorashear import discover

    model = plain_tiny_llama(train=False)
    graph = discover(model)
    drop = [g for g in graph.prunable() if g.kind == "mlp_channel" and g.layer == 0][:3]
    before = {n: p for n, p in model.named_parameters()}
    replacements: dict = {}
    compact(model, drop, replacements=replacements)
    gate = before["model.layers.0.mlp.gate_proj.weight"]
    new, kept = replacements[id(gate)]
    removed = {i for g in drop for i in g.slices[0].indices}
    assert set(kept) == {0} and set(kept[0].tolist()) == set(range(gate.shape[0])) - removed
    assert torch.equal(new, gate.detach()[kept[0]])


def test_a_corrupt_newest_checkpoint_after_the_compaction_falls_back(tmp_path):
    out = tmp_path / "p"
    assert prune_stage.run(_stage_cfg(out, steps=STEPS, keep_checkpoints=2), model=plain_tiny_llama(train=False),
                           data=random_batches(n=16, seq=16), stop_after=12) is None
    small = out / "checkpoints" / prune_stage.COMPACTED_DIR
    newest = sorted(small.glob("step-*"))[-1]
    (newest / "state.json").write_text('{"step": 12, "pruning": {"selected')  # cut short
    resumed = prune_stage.run(_stage_cfg(out, steps=STEPS, keep_checkpoints=2, resume=True),
                              model=plain_tiny_llama(train=False),
                              data=random_batches(n=16, seq=16))
    _run(tmp_path / "whole")
    assert resumed.report["resumed_from"] == 10
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)


# -- the dynamic mix after pruning (post_pruning=recover) --------------------------------------------------------
@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    from test_recover import MODEL, _paragraphs, char_tokenizer
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("mix")
    words = ["the cat sat on the mat", "a dog ran to the park", "the sun is warm today", "we like to read books"]
    files = {
        "a": _paragraphs(lambda i: f"{i}: " + f"{words[i % 4]} and {words[(i + 1) % 4]}. " * 3, 40),  # unique
        "b": _paragraphs(lambda i: f"{i} + {i + 1} = {2 * i + 1}; {i * 7 % 10} * 3 = {i * 21 % 30}. " * 2, 40),
        "c": _paragraphs(lambda i: f"THE QUICK BROWN FOX {i} JUMPS OVER THE LAZY DOG! " * 2, 40),
    }
    specs = []
    for name, text in files.items():
        (root / f"{name}.txt").write_text(text)
        specs.append(str(root / f"{name}.txt"))
    tok = char_tokenizer()
    torch.manual_seed(0)
    model = tiny_model("llama", vocab=len(tok), **MODEL)
    data = torch.randint(2, len(tok), (16, 16))
    return {"specs": specs, "tok": tok, "model": model, "data": data}


def _mix_run(mix, out, **kw):
    import copy

    cfg = _stage_cfg(out, steps=STEPS, post_pruning="recover", post_sources=mix["specs"], post_rounds=2,
                     post_val_sequences=2, post_min_paragraph_tokens=8, **kw)
    return prune_stage.run(cfg, model=copy.deepcopy(mix["model"]), tokenizer=mix["tok"], data=mix["data"])


def test_recovery_after_pruning_weights_sources_by_their_validation_degradation(mix, tmp_path):
    from lorashear.recovery.mixing import degradation, sampling_weights

    result = _mix_run(mix, tmp_path / "p")
    rec = result.report["recovery"]
    assert result.report["post_pruning"] == "recover" and [r["round"] for r in rec["rounds"]] == [1, 2]
    assert [r["steps"] for r in rec["rounds"]] == [[8, 11], [11, 14]]  # the 6 steps after pruning, in two rounds
    for r in rec["rounds"]:
        deltas = degradation(r["losses_before"], rec["dense_losses"])
        assert r["deltas_before"] == pytest.approx(deltas)
        assert r["weights"] == pytest.approx(sampling_weights(deltas, 0.3))
        assert sum(r["sequences"].values()) == 3 * 2  # one pass: the round's steps x batch
    assert [x["round"] for x in result.report["log"][8:]] == [1, 1, 1, 2, 2, 2]
    assert result.report["steps"] == STEPS and result.report["compute"]["prep_fwd"] > 0


def test_recovery_never_reads_test_documents(mix, tmp_path, monkeypatch):
    from lorashear.data import load_texts
    from lorashear.recovery import sources as sources_mod

    seen: list[str] = []
    real = sources_mod.split_texts

    def spy(spec):
        train, validation, rule = real(spec)
        seen.extend(train + validation)
        return train, validation, rule

    monkeypatch.setattr(sources_mod, "split_texts", spy)
    _mix_run(mix, tmp_path / "p")
    test = {t for spec in mix["specs"] for t in load_texts(f"{spec}:split=test")}
    validation = {t for spec in mix["specs"] for t in load_texts(f"{spec}:split=validation")}
    assert test and validation and seen
    assert not test & set(seen)
    assert validation <= set(seen)


@pytest.mark.parametrize("kill_at", [9, 12])  # inside the first round, inside the second
def test_kill_and_resume_inside_a_recovery_round_is_bit_identical(mix, tmp_path, kill_at):
    import copy

    whole = _mix_run(mix, tmp_path / "whole")
    out = tmp_path / "killed"
    cfg = _stage_cfg(out, steps=STEPS, post_pruning="recover", post_sources=mix["specs"], post_rounds=2,
                     post_val_sequences=2, post_min_paragraph_tokens=8)
    assert prune_stage.run(cfg, model=copy.deepcopy(mix["model"]), tokenizer=mix["tok"], data=mix["data"],
                           stop_after=kill_at) is None
    resumed = _mix_run(mix, out, resume=True)
    assert resumed.report["resumed_from"] == kill_at - kill_at % 2
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert resumed.report["recovery"]["rounds"] == whole.report["recovery"]["rounds"]
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]


def test_recovery_after_pruning_needs_the_compaction():
    from lorashear.errors import ConfigError

    with pytest.raises(ConfigError, match="compact-at prune_end"):
        _stage_cfg("x", post_pruning="recover", compact_at="end")


def test_the_log_keeps_cross_entropy_and_kl_apart(tmp_path):
    """The mixed objective 0.5 CE + 0.5 KL jumps to CE when pruning ends; the log keeps CE comparable throughout."""
    result = _run(tmp_path / "p", distill_weight=0.5, distill_after_pruning=0.0)
    log = result.report["log"]
    end = result.report["schedule"]["prune_end"]
    for r in log[:end]:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kl"], rel=1e-5)
    assert all("kl" not in r for r in log[end:])  # no teacher after pruning: the loss is the cross-entropy


def test_every_weight_trains_after_the_compaction_with_post_pruning_full(tmp_path):
    """``post_pruning=full``: the pruning phase is the LoRA one; after the compaction LoRA is merged and every weight
    of the small model trains (embeddings and norms too), at full-training cost."""
    lora = _run(tmp_path / "lora")
    full = _run(tmp_path / "full", post_pruning="full", post_lr=1e-3)
    assert full.report["compaction"] == {"step": 8, "at": "prune_end"}
    assert full.report["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5
    assert full.report["groups"]["selected_ids"] == lora.report["groups"]["selected_ids"]
    losses_lora = [r["loss"] for r in lora.report["log"]]
    losses_full = [r["loss"] for r in full.report["log"]]
    assert losses_full[:9] == losses_lora[:9]  # the same up to the first step of the small model
    assert losses_full[9:] != losses_lora[9:]
    dense = plain_tiny_llama(train=False).state_dict()
    a, b = _weights(tmp_path / "lora"), _weights(tmp_path / "full")
    assert a.keys() == b.keys() and all(a[n].shape == b[n].shape for n in a)
    emb = "model.embed_tokens.weight"
    assert torch.equal(a[emb], dense[emb])  # LoRA never touches the embedding (no channel of it was removed)
    assert not torch.equal(b[emb], dense[emb])  # every weight trains after the compaction
    norms = [n for n in b if n.endswith("norm.weight")]
    assert norms and any(not torch.equal(b[n], a[n]) for n in norms)
    # the steps after the compaction pay a full backward (2x forward) instead of LoRA's (1x)
    cl, cf = lora.report["compute"], full.report["compute"]
    assert cf["student_fwd"] == cl["student_fwd"] and cf["flops"] > cl["flops"]
    assert full.report["post_pruning"] == "full" and full.report["settings"]["post_lr"] == 1e-3


@pytest.mark.parametrize("kill_at", [8, 11])  # at the compaction step, after it
def test_kill_and_resume_with_every_weight_training_is_bit_identical(tmp_path, kill_at):
    whole = _run(tmp_path / "whole", post_pruning="full", post_lr=1e-3)
    out = tmp_path / "killed"
    stopped = prune_stage.run(_stage_cfg(out, steps=STEPS, post_pruning="full", post_lr=1e-3),
                              model=plain_tiny_llama(train=False), data=random_batches(n=16, seq=16),
                              stop_after=kill_at)
    assert stopped is None
    resumed = _run(out, resume=True, post_pruning="full", post_lr=1e-3)
    assert resumed.report["resumed_from"] == kill_at - kill_at % 2
    a, b = _weights(tmp_path / "whole"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert [r["loss"] for r in resumed.report["log"]] == [r["loss"] for r in whole.report["log"]]


def test_training_every_weight_needs_the_compaction_and_a_positive_rate():
    from lorashear.errors import ConfigError

    with pytest.raises(ConfigError, match="compact-at prune_end"):
        _stage_cfg("x", post_pruning="full", compact_at="end")
    with pytest.raises(ConfigError, match="post_lr"):
        _stage_cfg("x", post_pruning="full", post_lr=0.0)
