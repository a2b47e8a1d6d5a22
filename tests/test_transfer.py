"""Explicit transfer (least-squares compensation through the consumer) folded into LHSPG's fade."""

from __future__ import annotations

import pytest
import torch

from lorashear.compaction import compact
from lorashear.errors import ConfigError
from lorashear.graph.discover import discover
from lorashear.lhspg import LHSPG, LHSPGConfig, TargetConfig, plan_targets
from lorashear.training.optim import make_optimizer
from lorashear.lhspg.transfer import kept_columns, transfer_matrix
from lorashear.training import TrainConfig
from lorashear.lhspg.hooks import ActivationGram
from test_lhspg import base_param_count, embedding_count, lhspg_run, random_batches, tiny_lora_model


def test_transfer_matrix_is_exact_when_the_fading_columns_are_linear_in_the_kept_ones():
    g = torch.Generator().manual_seed(0)
    h_kept = torch.randn(200, 6, generator=g, dtype=torch.float64)
    mix = torch.randn(6, 2, generator=g, dtype=torch.float64)
    h = torch.zeros(200, 8, dtype=torch.float64)
    kept, fading = torch.tensor([0, 2, 3, 5, 6, 7]), torch.tensor([1, 4])
    h[:, kept] = h_kept
    h[:, fading] = h_kept @ mix
    w = torch.randn(5, 8, generator=g, dtype=torch.float64)
    t = transfer_matrix(h.t() @ h, fading, kept, damp=1e-10).double()
    compensated = w[:, kept] + w[:, fading] @ t
    torch.testing.assert_close(h_kept @ compensated.t(), h @ w.t(), atol=1e-5, rtol=1e-5)
    assert kept_columns(8, fading).tolist() == kept.tolist()


def test_transfer_matrix_without_data_compensates_nothing():
    t = transfer_matrix(torch.zeros(4, 4), torch.tensor([0]), torch.tensor([1, 2, 3]), damp=0.01)
    assert t.shape == (1, 3) and float(t.abs().max()) == 0.0


DOWN_PROJ = "base_model.model.model.layers.0.mlp.down_proj"


def _gram_and_inputs(**kw):
    """A tiny model with an ActivationGram on layer 0's down_proj, and a list that receives that layer's
    inputs of every forward pass (remove the returned handle when done)."""
    model = tiny_lora_model(seed=3)
    gram = ActivationGram(model, [DOWN_PROJ], **kw)
    seen: list[torch.Tensor] = []
    handle = dict(model.named_modules())[DOWN_PROJ].register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    return model, gram, seen, handle


def test_activation_gram_counts_training_forwards_only_and_decays():
    model, gram, seen, handle = _gram_and_inputs(decay=0.25)
    ids = random_batches(n=2, seq=8)
    model(input_ids=ids)
    with torch.no_grad():
        model(input_ids=ids)  # evaluation: not counted
    handle.remove()
    h = seen[0].reshape(-1, seen[0].shape[-1]).double()
    torch.testing.assert_close(gram.gram(DOWN_PROJ).double(), h.t() @ h, rtol=1e-5, atol=1e-5)
    gram.roll()
    torch.testing.assert_close(gram.gram(DOWN_PROJ).double(), 0.25 * h.t() @ h, rtol=1e-5, atol=1e-5)
    gram.close()


def test_activation_gram_token_stride_uses_every_nth_token():
    model, gram, seen, handle = _gram_and_inputs(token_stride=3)
    model(input_ids=random_batches(n=2, seq=8))
    handle.remove()
    h = seen[0].reshape(-1, seen[0].shape[-1]).double()[::3]
    assert h.shape[0] == 6
    torch.testing.assert_close(gram.gram(DOWN_PROJ).double(), h.t() @ h, rtol=1e-5, atol=1e-5)
    gram.close()
    with pytest.raises(ValueError):
        ActivationGram(model, [DOWN_PROJ], token_stride=0)


def _mlp_output_error(transfer: bool) -> float:
    """Prune layer 1's MLP channels (only) over one period; the layer's MLP output error on the
    warm-up data, against the unpruned model, at the end."""
    model = tiny_lora_model(seed=5)
    graph = discover(model)
    plan = plan_targets(graph.prunable(), total_params=base_param_count(model),
                        embedding_params=embedding_count(model),
                        config=TargetConfig(ratio=0.03, kinds=("mlp_channel",)), all_groups=graph.groups)
    excluded = [g.id for g in graph.groups if not (g.kind == "mlp_channel" and g.layer == 1)]
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr=1e-12)  # LoRA stays 0
    config = LHSPGConfig(warmup_steps=3, num_periods=1, period_steps=4, transfer=transfer)
    pruned = [g for g in graph.groups if g.id not in set(excluded) and g.prunable]
    grams = ActivationGram.for_groups(model, pruned) if transfer else None
    lh = LHSPG(model, graph.groups, opt, plan=plan, config=config, exclude=excluded, grams=grams)
    data = random_batches(n=3, seq=16, seed=2)
    mlp = dict(model.named_modules())["base_model.model.model.layers.1.mlp"]
    outputs: list[torch.Tensor] = []
    handle = mlp.register_forward_hook(lambda m, a, o: outputs.append(o.detach()))
    model.eval()  # no dropout; gradients stay on, so the Gram hooks count these forwards
    for step in range(7):
        batch = data[step % 3].unsqueeze(0)
        model(input_ids=batch, labels=batch).loss.backward()
        lh.step()
        lh.zero_grad()
    assert len(lh.committed) == plan.counts["mlp_channel"] > 0
    with torch.no_grad():
        outputs.clear()
        model(input_ids=data)
        after = outputs[-1]
    handle.remove()
    reference = tiny_lora_model(seed=5)
    ref_mlp = dict(reference.named_modules())["base_model.model.model.layers.1.mlp"]
    ref_out: list[torch.Tensor] = []
    ref_mlp.register_forward_hook(lambda m, a, o: ref_out.append(o.detach()))
    with torch.no_grad():
        reference.eval()(input_ids=data)
    return float((after - ref_out[-1]).pow(2).sum())


def test_transfer_moves_the_fading_channels_into_the_kept_ones():
    """On the data it was fitted on, the compensated layer is never further from the unpruned one (ridge
    least squares), and here it is much closer."""
    plain, moved = _mlp_output_error(False), _mlp_output_error(True)
    assert moved < 0.5 * plain


def _transfer_run(tmp_path, stop_after=None, resume=False):
    model, graph, _, res = lhspg_run(
        0.15, TrainConfig(steps=12, batch_size=2, progress=False, lr=5e-3, checkpoint_every=3),
        LHSPGConfig(num_periods=3, saliency=("fisher",), quota="front", prune_end=0.5, merge_at_period_end=False,
                    transfer=True),
        checkpoint_dir=tmp_path / "ckpt", resume=resume, stop_after=stop_after)
    return model, graph, res


def test_transfer_run_prunes_exactly_compacts_and_resumes_bit_identically(tmp_path):
    model, graph, res = _transfer_run(tmp_path / "a")
    selected = res.lhspg.committed_groups
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = random_batches(n=2, seq=12, seed=3)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        assert torch.allclose(compact(model, selected, merge_lora=True)(input_ids=ids).logits, masked, atol=1e-5)
    _, _, stopped = _transfer_run(tmp_path / "b", stop_after=7)  # mid-period: the transfer maps are saved
    assert stopped.stopped_early
    resumed, _, res2 = _transfer_run(tmp_path / "b", resume=True)
    assert [r["loss"] for r in res.log] == [r["loss"] for r in res2.log]
    for n, q in resumed.named_parameters():
        assert torch.equal(trained[n], q), n


def test_transfer_needs_statistics_and_a_positive_damping():
    model = tiny_lora_model(seed=1)
    graph = discover(model)
    plan = plan_targets(graph.prunable(), total_params=base_param_count(model),
                        embedding_params=embedding_count(model), config=TargetConfig(ratio=0.1),
                        all_groups=graph.groups)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr=1e-3)
    with pytest.raises(ConfigError, match="grams"):
        LHSPG(model, graph.groups, opt, plan=plan, config=LHSPGConfig(warmup_steps=1, period_steps=2, transfer=True))
    with pytest.raises(ConfigError, match="transfer_damp"):
        LHSPGConfig(transfer=True, transfer_damp=0.0)
    with pytest.raises(ConfigError, match="transfer_token_stride"):
        LHSPGConfig(transfer=True, transfer_token_stride=0)
