"""The peer baselines in benchmarks/peers (LLM-Pruner at its best, Minitron, FLAP) on tiny random Llamas:
targets, minimum widths, exactness, save/load, and each paper's importance on hand-made numbers."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from tiny_models import tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "peers"))

import _common  # noqa: E402
import flap  # noqa: E402
import llm_pruner  # noqa: E402
import minitron  # noqa: E402
from lorashear.errors import ConfigError  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LAYERS = 4
VOCAB = 97


def _model(seed: int = 0) -> torch.nn.Module:
    return tiny_model("llama", seed, layers=LAYERS)  # hidden 48, 6 query / 2 KV heads of 8, MLP 40


def _ids(n: int = 8, length: int = 24, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=gen)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


PEERS = {
    "llm_pruner": (llm_pruner.prune_llm_pruner, llm_pruner.LLMPrunerConfig,
                   {"ranking": "global", "normalizer": "none", "head_reduce": "sum", "layer_start": 0, "layer_end": 0,
                    "calib_sequences": 8, "seq_len": 24}),
    "llm_pruner_default": (llm_pruner.prune_llm_pruner, llm_pruner.LLMPrunerConfig,
                           {"layer_start": 1, "layer_end": 0, "calib_sequences": 8, "seq_len": 24}),
    "llm_pruner_mix": (llm_pruner.prune_llm_pruner, llm_pruner.LLMPrunerConfig,
                       {"importance": "param_mix", "ranking": "kind", "normalizer": "none", "head_reduce": "sum",
                        "layer_start": 1, "layer_end": 0, "calib_sequences": 8, "seq_len": 24}),
    "llm_pruner_block": (llm_pruner.prune_llm_pruner, llm_pruner.LLMPrunerConfig,
                         {"ranking": "block", "layer_start": 1, "layer_end": 0, "calib_sequences": 8,
                          "seq_len": 24}),
    "minitron": (minitron.prune_minitron, minitron.MinitronConfig,
                 {"allocation": "global", "attention_share": None, "calib_sequences": 8, "seq_len": 24}),
    "minitron_uniform": (minitron.prune_minitron, minitron.MinitronConfig,
                         {"attention_share": None, "calib_sequences": 8, "seq_len": 24}),
    "minitron_uniform_default": (minitron.prune_minitron, minitron.MinitronConfig,
                                 {"calib_sequences": 8, "seq_len": 24}),
    "flap": (flap.prune_flap, flap.FlapConfig,
             {"kinds": ("attention_head", "mlp_channel"), "calib_sequences": 8, "seq_len": 24}),
    "flap_default": (flap.prune_flap, flap.FlapConfig, {"calib_sequences": 8, "seq_len": 24}),
    "flap_kv": (flap.prune_flap, flap.FlapConfig,
                {"kinds": ("attention_head", "kv_group", "mlp_channel"), "attention_score": "head_sum",
                 "calib_sequences": 8, "seq_len": 24}),
}


@pytest.mark.parametrize("ratio", [0.2, 0.4])
@pytest.mark.parametrize("peer", list(PEERS))
def test_target_met_and_model_saves_and_loads(peer, ratio, tmp_path):
    import lorashear

    prune, cfg_cls, opts = PEERS[peer]
    model = _model()
    before = _common.count_params(model)
    chan = 3 * 48  # one MLP channel's parameters
    pruned, report = prune(model, _ids(), cfg_cls(ratio=ratio, **opts))
    after = _common.count_params(pruned)
    assert report["params"]["before"] == before and report["params"]["after"] == after
    removed = before - after
    widths = report["widths"]
    # global ranking lands within one MLP channel (half a query-head slot once no channel is left);
    # uniform widths within one channel per pruned layer
    tolerance = (chan + 2) * (LAYERS if "block" in peer or "uniform" in peer else 1)  # + FLAP's gate/up biases
    if all(w["mlp"] == 1 for w in widths.values()):
        tolerance = 2 * 8 * 48  # half a slot: 2 heads of 8 rows of q_proj and 8 columns of o_proj
    assert abs(removed - ratio * before) <= tolerance, (removed, ratio * before)
    assert widths == _common.layer_widths(pruned)
    assert all(w["q_heads"] >= w["kv_heads"] >= 1 and w["mlp"] >= 1 for w in widths.values())
    c = report["calibration"]
    assert c["sequences"] == 8 and c["tokens"] == 8 * 24 and c["forward_token_passes"] >= 8 * 24
    assert report["wall_time_s"] > 0
    ids = _ids(2, 16, seed=5)
    out = _logits(pruned, ids)
    assert torch.isfinite(out).all()
    lorashear.save_pretrained(pruned, tmp_path / "m")
    loaded = lorashear.load_pretrained(tmp_path / "m")
    assert _common.count_params(loaded) == after
    torch.testing.assert_close(_logits(loaded, ids), out, rtol=0, atol=1e-5)


@pytest.mark.parametrize("peer", ["llm_pruner", "minitron", "flap"])
def test_minimum_widths_hold(peer):
    prune, cfg_cls, opts = PEERS[peer]
    opts = {**opts, "min_slots": 2, "min_mlp": 30}
    pruned, report = prune(_model(), _ids(), cfg_cls(ratio=0.15, **opts))
    for w in report["widths"].values():
        assert w["q_heads"] // w["kv_heads"] >= 2 and w["mlp"] >= 30
    with pytest.raises(ConfigError):  # more than the minimum widths leave to remove
        prune(_model(), _ids(), cfg_cls(ratio=0.6, **opts))


def test_layer_range_is_respected():
    pruned, report = llm_pruner.prune_llm_pruner(_model(), _ids(), llm_pruner.LLMPrunerConfig(
        ratio=0.15, layer_start=1, layer_end=-1, calib_sequences=8, seq_len=24))
    assert set(report["removed_groups"]) <= {1, 2}
    assert report["widths"][0] == {"q_heads": 6, "kv_heads": 2, "mlp": 40} == report["widths"][3]


def test_head_alignment_preserves_the_function():
    model = _model()
    ids = _ids(2, 16)
    ref = _logits(model, ids)
    st = _common.structures(model)
    scores = {i: torch.randn(6, generator=torch.Generator().manual_seed(i)) for i in range(LAYERS)}
    perms = _common.align_heads(model, st, scores)
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=1e-5)
    for i, perm in perms.items():
        # heads only move inside their KV group (heads 0-2 share KV head 0, heads 3-5 KV head 1)
        assert all(h // 3 == p // 3 for p, h in enumerate(perm))
        for heads in st.layers[i].slot_heads:  # slot r holds the r-th best head of every group
            ranks = [sorted(range(3 * (h // 3), 3 * (h // 3) + 3), key=lambda x: -float(scores[i][x])).index(
                perm[h]) for h in heads]
            assert len(set(ranks)) == 1


# -- FLAP --------------------------------------------------------------------------------------------
def test_flap_fluctuation_metric_on_a_hand_made_example():
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [5.0, 2.0, -1.0]])  # 3 tokens, 3 channels
    m = flap.ChannelMoments(3)
    m.add(x[:2].unsqueeze(0))
    m.add(x[2:].unsqueeze(0))
    torch.testing.assert_close(m.mean, torch.tensor([3.0, 2.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(m.var, torch.tensor([4.0, 0.0, 1.0], dtype=torch.float64))  # sample variance
    w = torch.tensor([[1.0, 5.0, 2.0], [2.0, 5.0, 0.0]])  # (out, in): column norms^2 = 5, 50, 4
    torch.testing.assert_close(flap.channel_metric(w, m, "WIFV"), torch.tensor([20.0, 0.0, 4.0], dtype=torch.float64))
    # heads of 2 channels: head_sum sums the metric per head, then standardises over the layer's heads
    metric = torch.tensor([1.0, 2.0, 3.0, 4.0, 0.0, 0.0], dtype=torch.float64)
    sums = torch.tensor([3.0, 7.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(flap.head_scores(metric, 2, "head_sum"), (sums - sums.mean()) / sums.std())
    # official: squared channel metric standardised over channels, mean per head
    sq = metric.pow(2)
    z = (sq - sq.mean()) / sq.std()
    torch.testing.assert_close(flap.head_scores(metric, 2, "official"), z.view(3, 2).mean(1))


def test_flap_bias_compensation_is_exact_for_the_removed_channels_mean():
    model = _model()
    dense = copy.deepcopy(model)
    calib = _ids()
    cfg = flap.FlapConfig(ratio=0.3, calib_sequences=8, seq_len=24)
    pruned, report = flap.prune_flap(model, calib, cfg)
    assert report["params"]["bias_params"] > 0
    stats = flap.collect_moments(dense, calib, 4)
    hd = 8
    handles = []
    for i, layer in enumerate(dense.model.layers):
        cols = report["removed_columns"].get(str(i), {"o_proj": [], "down_proj": []})
        perm = report["head_permutations"].get(str(i), list(range(6)))
        o_cols = [perm[c // hd] * hd + c % hd for c in cols["o_proj"]]  # aligned order -> original channels
        for mod, removed, mean in ((layer.self_attn.o_proj, o_cols, stats[i]["o_proj"].mean),
                                   (layer.mlp.down_proj, cols["down_proj"], stats[i]["down_proj"].mean)):
            if not removed:
                continue
            idx = torch.tensor(removed)

            def pre(_m, args, idx=idx, mean=mean):
                x = args[0].clone()
                x[..., idx] = mean[idx].to(x.dtype)
                return (x,)

            handles.append(mod.register_forward_pre_hook(pre))
    ids = torch.full((1, 12), 7)  # the constant-input check
    expected = _logits(dense, ids)
    for h in handles:
        h.remove()
    torch.testing.assert_close(_logits(pruned, ids), expected, rtol=0, atol=1e-4)
    # and without compensation the pruned model differs (the biases carry the means)
    plain, _ = flap.prune_flap(_model(), calib, flap.FlapConfig(ratio=0.3, calib_sequences=8, seq_len=24, bias=False))
    assert (_logits(plain, ids) - expected).abs().max() > 1e-3


def test_flap_counts_its_biases_and_lora_finetuning_works(tmp_path):
    import lorashear
    from lorashear.recovery import lora_finetune

    model = _model()
    before = _common.count_params(model)
    pruned, report = flap.prune_flap(model, _ids(), flap.FlapConfig(ratio=0.3, calib_sequences=8, seq_len=24))
    assert pruned.config.attention_bias and pruned.config.mlp_bias
    assert all(lin.bias is not None for layer in pruned.model.layers
               for lin in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    assert abs(_common.count_params(pruned) - 0.7 * before) <= 3 * 48 + 2  # biases included in the count
    o_bias = pruned.model.layers[0].self_attn.o_proj.bias.detach().clone()
    tuned = lora_finetune(pruned, None, _ids(4, 16, seed=3), steps=2, batch_size=2, seq_len=16, r=2, progress=False)
    assert _common.count_params(tuned) == report["params"]["after"]
    assert torch.equal(tuned.model.layers[0].self_attn.o_proj.bias, o_bias)  # LoRA leaves the biases alone
    lorashear.save_pretrained(tuned, tmp_path / "t")
    loaded = lorashear.load_pretrained(tmp_path / "t")
    ids = _ids(1, 10, seed=9)
    torch.testing.assert_close(_logits(loaded, ids), _logits(tuned, ids), rtol=0, atol=1e-5)


# -- Minitron ----------------------------------------------------------------------------------------
def test_minitron_activation_importance_on_a_hand_made_example():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0]], [[-1.0, 4.0], [1.0, 0.0]]])  # (batch 2, seq 2, channels 2)
    imp = minitron.ActivationImportance(2)
    imp.add(x)
    # mean |x| over the sequence: [[2, 1], [1, 2]]; L2 over the batch: [sqrt(5), sqrt(5)]
    torch.testing.assert_close(imp.value, torch.tensor([5.0, 5.0], dtype=torch.float64).sqrt())
    imp = minitron.ActivationImportance(2, seq_agg="mean", batch_agg="mean")
    imp.add(x)
    torch.testing.assert_close(imp.value, torch.tensor([1.5, 1.5], dtype=torch.float64))
    channels = torch.tensor([3.0, 4.0, 0.0, 1.0])  # heads of 2 channels: L2 norms 5 and 1
    torch.testing.assert_close(minitron.head_importance(channels, 2), torch.tensor([5.0, 1.0]))


def test_minitron_importance_hooks_match_the_definition():
    model = _model()
    ids = _ids(6, 10)
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    imp = minitron.collect_importance(model, ids, batch_size=4)
    h.remove()
    x = torch.cat(seen)  # (6, 10, 40): act(gate) * up of every sequence
    expected = x.abs().mean(1).double().pow(2).sum(0).sqrt()
    torch.testing.assert_close(imp[1]["down_proj"], expected)


def test_minitron_removes_the_least_important_channels_across_layers():
    model = _model()
    ids = _ids()
    cfg = minitron.MinitronConfig(ratio=0.15, allocation="global", attention_share=0.0, calib_sequences=8,
                                  seq_len=24)
    st = _common.structures(model)
    imp = minitron.collect_importance(model, ids, 4)
    layers = list(range(LAYERS))
    cands, _ = minitron.score_groups(model, st, imp, cfg, layers)
    chosen = {g.id for g in minitron.select(st, cands, cfg.ratio * _common.count_params(model), cfg, layers)}
    removed = [float(imp[g.layer]["down_proj"][g.index]) for g in st.groups(["mlp_channel"]) if g.id in chosen]
    kept = [float(imp[g.layer]["down_proj"][g.index]) for g in st.groups(["mlp_channel"]) if g.id not in chosen]
    assert removed and max(removed) <= min(kept)


def test_flap_removes_the_lowest_standardised_scores():
    model = _model()
    cfg = flap.FlapConfig(ratio=0.1, calib_sequences=8, seq_len=24, kinds=("mlp_channel",))
    st = _common.structures(model)
    stats = flap.collect_moments(model, _ids(), 4)
    layers = list(range(LAYERS))
    cands, *_ = flap.score_groups(model, st, stats, cfg, layers)
    chosen = {g.id for g in flap._select(st, cands, cfg.ratio * _common.count_params(model) + 1024, cfg, layers)}
    key = {g.id: k for g, k in cands}
    removed = [key[i] for i in chosen]
    kept = [k for i, k in key.items() if i not in chosen]
    assert removed and max(removed) <= min(kept)
    for i in layers:  # the score is WIFV standardised within the layer
        z = flap.standardise(flap.channel_metric(model.model.layers[i].mlp.down_proj.weight,
                                                 stats[i]["down_proj"], "WIFV"))
        for g in st.layers[i].mlp:
            assert key[g.id] == pytest.approx(float(z[g.index]))


def test_minitron_distillation_full_and_lora():
    teacher = _model()
    ids = _ids(4, 16, seed=2)
    for mode in ("full", "lora"):
        student, _ = minitron.prune_minitron(_model(), _ids(), minitron.MinitronConfig(
            ratio=0.3, calib_sequences=8, seq_len=24))
        params = _common.count_params(student)
        out = minitron.distill(student, teacher, ids, minitron.DistillTrainConfig(
            mode=mode, steps=2, batch_size=2, seq_len=16, log_every=1))
        rec = out["record"]
        assert rec["mode"] == mode and rec["tokens"] == 2 * 2 * 16 == rec["teacher_forward_token_passes"]
        assert all(torch.isfinite(torch.tensor(out["losses"])))
        assert _common.count_params(out["model"]) == params
        assert rec["trainable_params"] == (params if mode == "full" else rec["trainable_params"])
        assert not hasattr(out["model"], "peft_config")


# -- LLM-Pruner ---------------------------------------------------------------------------------------
def test_llm_pruner_element_importance_on_a_hand_made_example():
    w = torch.tensor([[1.0, -2.0], [0.5, 3.0]])
    g = torch.tensor([[0.1, 0.2], [-0.4, 0.0]])
    h = torch.tensor([[1.0, 0.5], [2.0, 0.1]])
    torch.testing.assert_close(llm_pruner.element_salience(w, g, None, "param_first"),
                               torch.tensor([[0.1, 0.4], [0.2, 0.0]]))
    torch.testing.assert_close(llm_pruner.element_salience(w, g, h, "param_second"),
                               torch.tensor([[1.0, 2.0], [0.5, 0.9]]))
    # |w g - w h w / 2|: 0.1 - 0.5, -0.4 - 1.0, -0.2 - 0.25, 0 - 0.45
    torch.testing.assert_close(llm_pruner.element_salience(w, g, h, "param_mix"),
                               torch.tensor([[0.4, 1.4], [0.45, 0.45]]))


def test_llm_pruner_gradient_and_per_sample_fisher():
    model = _model()
    ids = _ids(3, 12)
    name = "model.layers.1.mlp.up_proj.weight"
    p = dict(model.named_parameters())[name]
    grad, fisher, loss, n = llm_pruner.taylor_statistics(model, ids, {name: p}, hessian=True, batch_size=2)
    per_sample = []
    for k in range(3):
        model.zero_grad()
        model(input_ids=ids[k:k + 1], labels=ids[k:k + 1]).loss.backward()
        per_sample.append(p.grad.detach().clone())
    model.zero_grad()
    g = torch.stack(per_sample)
    torch.testing.assert_close(grad[name], g.mean(0), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(fisher[name], g.pow(2).mean(0), rtol=1e-4, atol=1e-9)
    assert n == 3 and loss > 0
    grad1, none, _, _ = llm_pruner.taylor_statistics(model, ids, {name: p}, hessian=False, batch_size=2)
    assert none is None
    torch.testing.assert_close(grad1[name], g.mean(0), rtol=1e-4, atol=1e-7)


def test_llm_pruner_group_score_sums_the_group_elements():
    model = _model()
    st = _common.structures(model)
    params = dict(model.named_parameters())
    grad = {n: torch.ones_like(p) for n, p in params.items()}
    g = st.layers[2].mlp[5]
    raw = llm_pruner.group_scores(st, params, grad, None, "param_first", [g])
    m = model.model.layers[2].mlp
    expected = (m.gate_proj.weight[5].abs().sum() + m.up_proj.weight[5].abs().sum()
                + m.down_proj.weight[:, 5].abs().sum())
    assert raw[g.id] == pytest.approx(float(expected.detach()), rel=1e-6)


def test_llm_pruner_block_mode_reproduces_the_torch_pruning_peer():
    """ranking=block with channel-level head scores is the old module's recipe (Torch-Pruning's graph and
    GroupTaylorImportance, the same query heads from every KV group): the same model up to head order."""
    pytest.importorskip("torch_pruning")
    import torch_pruning_llm

    ids = _ids()
    old_cfg = torch_pruning_llm.TorchPruningConfig(ratio=0.2, layer_start=1, layer_end=-1, calib_sequences=8,
                                                   seq_len=24, calib_batch_size=2, verify=False)
    old, _ = torch_pruning_llm.prune_with_torch_pruning(tiny_model("llama", layers=6), ids, old_cfg)
    new, _ = llm_pruner.prune_llm_pruner(tiny_model("llama", layers=6), ids, llm_pruner.LLMPrunerConfig(
        ratio=0.2, ranking="block", head_reduce="mean", layer_start=1, layer_end=-1, calib_sequences=8, seq_len=24))
    assert _common.count_params(old) == _common.count_params(new)
    probe = _ids(2, 16, seed=4)
    torch.testing.assert_close(_logits(new, probe), _logits(old, probe), rtol=0, atol=1e-5)


def test_configs_validate():
    with pytest.raises(ConfigError):
        llm_pruner.LLMPrunerConfig(ratio=1.2)
    with pytest.raises(ConfigError):
        llm_pruner.LLMPrunerConfig(importance="vector")
    with pytest.raises(ConfigError):
        llm_pruner.LLMPrunerConfig(ranking="block", kinds=("attention_head", "kv_group", "mlp_channel"))
    with pytest.raises(ConfigError):
        minitron.MinitronConfig(seq_agg="max")
    with pytest.raises(ConfigError):
        minitron.MinitronConfig(attention_share=1.5)
    with pytest.raises(ConfigError):
        flap.FlapConfig(metric="L2")
    with pytest.raises(ConfigError):
        flap.FlapConfig(min_mlp=0)
    with pytest.raises(ConfigError):
        minitron.DistillTrainConfig(mode="half")
