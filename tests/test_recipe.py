"""Our additions to LHSPG: activation Fisher saliency, allocation, quotas, distillation, recipes."""

from __future__ import annotations

import pytest
import torch

from lorashear.config import config_from_dict
from lorashear.errors import ConfigError
from lorashear.graph.discover import discover
from lorashear.lhspg import LHSPGConfig
from lorashear.lhspg.optimizer import parse_saliency
from lorashear.lhspg.schedule import period_quotas, split_quota
from lorashear.stages.prune import PruneConfig
from lorashear.training import TrainConfig
from lorashear.lhspg.hooks import ActivationFisher, ActivationFluctuation
from lorashear.training.losses import DistillConfig, distillation_loss, kl_to_teacher, lm_loss, make_teacher
from test_lhspg import lhspg_run, random_batches, tiny_lora_model


pytestmark = pytest.mark.usefixtures("one_thread")


def _fisher_by_weight_gradients(model, groups, batch) -> torch.Tensor:
    """Reference: per sequence, the first-order Taylor term of removing a group is <W_eff, dL/dW_eff> over
    its consumer columns (o_proj / down_proj), squared and summed over sequences."""
    from lorashear.lhspg.tables import find_loras
    from lorashear.lhspg.hooks import consumer_columns

    params = dict(model.named_parameters())
    loras = find_loras(model)
    consumers = {name for g in groups for name, _ in consumer_columns(g)}
    weights = {m: params[f"{m}.base_layer.weight"] for m in consumers}
    for w in weights.values():
        w.requires_grad_(True)
    total = torch.zeros(len(groups), dtype=torch.float64)
    for s in range(batch.shape[0]):
        model.zero_grad(set_to_none=True)
        # the batch-mean loss restricted to sequence s: the same gradient scale the hook sees
        loss = lm_loss(model, batch[s:s + 1]) / batch.shape[0]
        loss.backward()
        for i, g in enumerate(groups):
            c = 0.0
            for module, cols in consumer_columns(g):
                w = weights[module]
                eff = w.detach() + loras[f"{module}.base_layer.weight"].delta()
                idx = torch.tensor(cols)
                c += float((eff[:, idx].double() * w.grad[:, idx].double()).sum())
            total[i] += c * c
    for w in weights.values():
        w.requires_grad_(False)
    return total


def test_activation_fisher_equals_weight_gradient_taylor_per_sequence():
    model = tiny_lora_model(seed=3, random_b=True)
    groups = [g for g in discover(model).prunable() if g.kind in ("attention_head", "kv_group", "mlp_channel")]
    batch = random_batches(n=3, seq=12, seed=5)
    fisher = ActivationFisher(model, groups, decay=0.5)
    model.zero_grad(set_to_none=True)
    lm_loss(model, batch).backward()
    got = fisher.scores(groups)
    fisher.close()
    want = _fisher_by_weight_gradients(model, groups, batch)
    assert got.shape == want.shape and torch.isfinite(got).all() and float(want.min()) > 0
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-12 * float(want.max()))
    assert {g.kind for g in groups} == {"attention_head", "kv_group", "mlp_channel"}


def test_activation_fisher_is_invariant_to_a_function_preserving_rescaling():
    """RMSNorm gain x4 with gate/up /4 leaves the function (and Fisher) unchanged; magnitudes move."""
    batch = random_batches(n=4, seq=12, seed=1)

    def scores(scale: float):
        model = tiny_lora_model(seed=4)
        layer = model.base_model.model.model.layers[0]
        with torch.no_grad():
            layer.post_attention_layernorm.weight.mul_(scale)
            layer.mlp.gate_proj.base_layer.weight.div_(scale)
            layer.mlp.up_proj.base_layer.weight.div_(scale)
        groups = [g for g in discover(model).prunable() if g.kind == "mlp_channel"]
        fisher = ActivationFisher(model, groups)
        model.zero_grad(set_to_none=True)
        lm_loss(model, batch).backward()
        fisher.close()
        return fisher.scores(groups)

    a, b = scores(1.0), scores(4.0)
    assert torch.allclose(a, b, rtol=1e-3) and float(a.max()) > 0


def test_roll_smooths_periods():
    model = tiny_lora_model(seed=2)
    groups = [g for g in discover(model).prunable() if g.kind == "mlp_channel"][:5]
    fisher = ActivationFisher(model, groups, decay=0.25)
    fisher.current[:] = torch.tensor([1.0, 2, 3, 4, 5], dtype=torch.float64)
    fisher.roll()
    fisher.current[:] = 1.0
    assert torch.allclose(fisher.scores(groups), torch.tensor([1.25, 1.5, 1.75, 2.0, 2.25], dtype=torch.float64))
    fisher.close()


def test_activation_fluctuation_equals_flap_metric_of_the_consumer_inputs():
    """Var over tokens of each consumer input column times its weight column's squared norm, summed per group
    (FLAP's fluctuation), from two micro-batches; forward passes under no_grad are not counted."""
    from lorashear.lhspg.hooks import consumer_slices

    model = tiny_lora_model(seed=3, random_b=True)
    groups = [g for g in discover(model).prunable() if g.kind in ("attention_head", "kv_group", "mlp_channel")]
    batches = [random_batches(n=2, seq=12, seed=s) for s in (5, 6)]
    modules = dict(model.named_modules())
    inputs: dict[str, list[torch.Tensor]] = {}
    handles = [modules[m].register_forward_hook(lambda mod, args, out, m=m: inputs.setdefault(m, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for m in {m for g in groups for m, _, _ in consumer_slices(g)}]
    fluct = ActivationFluctuation(model, groups, decay=0.5)
    for b in batches:
        lm_loss(model, b).backward()
    with torch.no_grad():
        model(input_ids=batches[0])  # not a training step: ignored by the scorer, seen by the reference hooks
    got = fluct.scores(groups)
    fluct.close()
    for h in handles:
        h.remove()
    params = dict(model.named_parameters())
    want = torch.zeros(len(groups), dtype=torch.float64)
    for i, g in enumerate(groups):
        for module, weight, cols in consumer_slices(g):
            h = torch.cat(inputs[module][:2])  # the two training micro-batches
            var = h.var(dim=0, unbiased=False)[list(cols)]
            want[i] += float((var * params[weight].detach().double()[:, list(cols)].pow(2).sum(0)).sum())
    assert torch.isfinite(got).all() and float(want.min()) > 0
    assert torch.allclose(got, want, rtol=1e-6)


def test_activation_statistics_pass_over_an_embedding_that_takes_token_ids():
    """A hidden channel's slices include the input embedding's column; the embedding's input is token ids, which
    are not activations: the fluctuation and Gram hooks leave it out (they used to fail on its shape)."""
    from lorashear.lhspg.hooks import ActivationGram

    model = tiny_lora_model(seed=3, random_b=True)
    groups = [g for g in discover(model, hidden=True).prunable() if g.kind == "hidden_channel"]
    fluct = ActivationFluctuation(model, groups, decay=0.5)
    grams = ActivationGram.for_groups(model, groups)
    lm_loss(model, random_batches(n=2, seq=12, seed=5)).backward()
    scores = fluct.scores(groups)
    embed = next(m for m in fluct._maps if m.endswith("embed_tokens"))
    assert torch.isfinite(scores).all() and float(scores.min()) > 0
    assert float(fluct.current[embed].abs().sum()) == 0.0 and embed not in grams.grams
    fluct.close()
    grams.close()


def test_fluctuation_saliency_prunes_exactly_and_resumes_bit_identically(tmp_path):
    """The fluctuation criterion alone and mixed with the Fisher: the plan is reached exactly, the selection
    differs from the Fisher's, and kill + resume reproduces the run (its moments are in the checkpoint)."""
    def run(out, saliency, **kw):
        return lhspg_run(0.15, TrainConfig(steps=12, batch_size=2, progress=False, lr=5e-3, checkpoint_every=3),
                         LHSPGConfig(num_periods=3, saliency=saliency, quota="front", prune_end=0.5,
                                     merge_at_period_end=False),
                         checkpoint_dir=out, **kw)

    _, _, plan, res = run(tmp_path / "f", ("fluctuation",))
    assert len(res.lhspg.committed_groups) == sum(plan.counts.values())
    _, _, _, fisher = run(tmp_path / "fisher", ("fisher",))
    assert {g.id for g in res.lhspg.committed_groups} != {g.id for g in fisher.lhspg.committed_groups}
    _, _, _, mixed = run(tmp_path / "m", ("fisher", "fluctuation=0.5"))
    assert set(mixed.lhspg.data_scores) == {"fisher", "fluctuation"}
    run(tmp_path / "r", ("fluctuation",), stop_after=5)
    _, _, _, resumed = run(tmp_path / "r", ("fluctuation",), resume=True)
    assert resumed.resumed_from == 3
    assert [r["loss"] for r in res.log] == [r["loss"] for r in resumed.log]
    assert [g.id for g in res.lhspg.committed_groups] == [g.id for g in resumed.lhspg.committed_groups]


@pytest.mark.parametrize("total, periods", [(0, 3), (7, 10), (12497, 10), (24, 10), (5, 1)])
def test_front_loaded_quotas_sum_to_total_and_do_not_grow(total, periods):
    q = period_quotas(total, periods, "front")
    assert sum(q) == total and len(q) == periods and min(q) >= 0
    assert all(a >= b - 1 for a, b in zip(q, q[1:]))  # non-increasing up to rounding
    assert period_quotas(total, periods, "even") == split_quota(total, periods)


def test_saliency_by_name():
    assert parse_saliency(["fisher", "magnitude=0.5"]) == {"fisher": 1.0, "magnitude": 0.5}
    for bad in (["fishr"], ["magnitude=x"], ["magnitude=-1"], ["magnitude=0"]):
        with pytest.raises(ConfigError):
            parse_saliency(bad)
    with pytest.raises(ConfigError, match="fisher"):
        LHSPGConfig(saliency=("nope",))


def test_recipes_fill_only_what_is_not_given():
    from lorashear.recipes import DEFAULT_RECIPE

    default = config_from_dict(PruneConfig, {"model": "m", "out": "o", "ratio": 0.2})
    assert default.recipe == DEFAULT_RECIPE == "lorashear" and default.lhspg.saliency == ("fisher",)
    assert default.lhspg.prune_end == 0.5 and default.distill.weight == 0.5
    # ranked across all layers (the paper's allocation): layers keep different widths
    assert default.lhspg.allocation == "global" and not default.target.uniform_per_layer
    assert default.distill.after_pruning == 0.0  # KL only while pruning
    # serve-ready widths where layers are wide enough; a user's --round-to wins
    assert default.target.round_to == 32 and default.target.round_min_width == 512
    exact = config_from_dict(PruneConfig, {"model": "m", "out": "o", "ratio": 0.2, "round_to": 1})
    assert exact.target.round_to == 1
    paper = config_from_dict(PruneConfig, {"model": "m", "out": "o", "ratio": 0.2, "recipe": "paper"})
    assert paper.recipe == "paper" and paper.lhspg.saliency == LHSPGConfig().saliency
    assert paper.target.round_to == 1
    assert paper.distill.weight == 0.0 and paper.distill.after_pruning is None and paper.lhspg.merge_at_period_end
    ours = config_from_dict(PruneConfig, {"model": "m", "out": "o", "ratio": 0.2, "recipe": "lorashear",
                                          "distill_weight": 0.25})
    assert ours.lhspg.saliency == ("fisher",) and ours.lhspg.quota == "front"
    assert ours.distill.weight == 0.25  # given explicitly: the recipe does not override it
    with pytest.raises(ConfigError, match="recipe"):
        config_from_dict(PruneConfig, {"recipe": "magic"})


def test_the_recipe_chooses_the_knowledge_proxy_unless_it_is_given():
    from lorashear.recipes import ANALYZE_RECIPES
    from lorashear.stages import pipeline
    from lorashear.stages.analyze import AnalyzeConfig

    assert ANALYZE_RECIPES["paper"]["proxy"] == "magnitude"  # the paper's analysis
    assert ANALYZE_RECIPES["lorashear"]["proxy"] == "fisher"  # ours: the saliency its pruning uses
    for name, preset in ANALYZE_RECIPES.items():
        alone = config_from_dict(AnalyzeConfig, {"model": "m", "out": "o", "recipe": name})
        assert alone.knowledge.proxy == preset["proxy"]
        in_run = pipeline.stage_configs(config_from_dict(pipeline.PipelineConfig, {"recipe": name}))[0]
        assert in_run.knowledge.proxy == preset["proxy"] and in_run.recipe == name
    assert config_from_dict(AnalyzeConfig, {"model": "m", "out": "o", "proxy": "random"}).knowledge.proxy == "random"
    given = config_from_dict(pipeline.PipelineConfig, {"recipe": "paper", "analyze_proxy": "fisher"})
    assert pipeline.stage_configs(given)[0].knowledge.proxy == "fisher"


def test_kl_is_zero_against_itself_and_distillation_mixes():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    assert float(kl_to_teacher(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(kl_to_teacher(logits, torch.randn(2, 5, 11))) > 0
    model = tiny_lora_model(seed=1)
    batch = random_batches(n=2, seq=10)
    teacher = make_teacher(tiny_lora_model(seed=1).base_model.model)
    with torch.no_grad():
        ce = float(lm_loss(model, batch))
        assert float(distillation_loss(teacher, DistillConfig(weight=0.0))(model, batch)) == pytest.approx(ce)
        # LoRA B = 0: the student is the teacher, so the KL part is 0
        assert float(distillation_loss(teacher, DistillConfig(weight=1.0))(model, batch)) == pytest.approx(0, abs=1e-5)
    with pytest.raises(ConfigError):
        DistillConfig(weight=1.5)


class _CountingTeacher(torch.nn.Module):
    """A teacher that counts its forward passes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, **kw):
        self.calls += 1
        return self.model(**kw)


def test_kl_share_is_read_at_every_call_and_a_zero_share_skips_the_teacher():
    from lorashear.training.hooks import KLShareSwitch
    from lorashear.training.losses import KLShare

    model = tiny_lora_model(seed=1, random_b=True)
    batch = random_batches(n=2, seq=10)
    teacher = _CountingTeacher(make_teacher(tiny_lora_model(seed=1).base_model.model))
    share = KLShare(0.5)
    loss = distillation_loss(teacher, DistillConfig(weight=0.5), share)
    switch = KLShareSwitch(share, DistillConfig(weight=0.5, after_pruning=0.0).shares(0, 3))
    with torch.no_grad():
        ce = float(lm_loss(model, batch))
        kl = float(distillation_loss(make_teacher(tiny_lora_model(seed=1).base_model.model),
                                     DistillConfig(weight=1.0))(model, batch))
        assert kl > 1e-4  # random B: the student differs from the teacher
        seen = []
        for step in range(5):
            switch.before_micro_batch(step, 0)
            seen.append((share.value, float(loss(model, batch)), teacher.calls))
    assert [s for s, _, _ in seen] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert seen[0][1] == pytest.approx(0.5 * ce + 0.5 * kl, rel=1e-5)
    assert seen[4][1] == pytest.approx(ce, rel=1e-6)
    assert [c for _, _, c in seen] == [1, 2, 3, 3, 3]  # no teacher pass once the share is 0
    assert DistillConfig(weight=0.0, after_pruning=0.5).enabled and not DistillConfig(after_pruning=0.0).enabled
    assert DistillConfig(weight=0.0, before_pruning=0.5).enabled
    with pytest.raises(ConfigError, match="after_pruning"):
        DistillConfig(after_pruning=2.0)
    with pytest.raises(ConfigError, match="before_pruning"):
        DistillConfig(before_pruning=-0.1)
    with pytest.raises(ValueError, match="step 0"):
        KLShareSwitch(share, [(1, 0.5)])


def _new_recipe_run(tmp_path, stop_after=None, resume=False):
    teacher = make_teacher(tiny_lora_model(seed=11).base_model.model)
    return lhspg_run(0.15, TrainConfig(steps=12, batch_size=2, progress=False, lr=5e-3, checkpoint_every=3),
                     LHSPGConfig(num_periods=3, saliency=("fisher",), allocation="layer", quota="front",
                                 prune_end=0.5, merge_at_period_end=False, min_keep=0.25),
                     loss_fn=distillation_loss(teacher, DistillConfig(weight=0.5)),
                     checkpoint_dir=tmp_path / "ckpt", resume=resume, stop_after=stop_after)


def test_new_recipe_run_prunes_exactly_keeps_min_width_and_resumes_bit_identically(tmp_path):
    from lorashear.compaction import compact

    model, graph, plan, res = _new_recipe_run(tmp_path / "a")
    selected = res.lhspg.committed_groups
    assert len(selected) == sum(plan.counts.values())
    named = dict(model.named_parameters())
    for g in selected:
        for s in g.slices:
            assert float(named[s.name].detach().index_select(s.dim, s.index_tensor()).abs().max()) == 0.0
    for layer in range(2):  # min_keep=0.25 of 64 channels per layer
        kept = sum(1 for g in graph.groups if g.kind == "mlp_channel" and g.layer == layer and g not in selected)
        assert kept >= 16
    ids = random_batches(n=2, seq=12, seed=3)
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=ids).logits
        assert torch.allclose(compact(model, selected, merge_lora=True)(input_ids=ids).logits, masked, atol=1e-5)
    _, _, _, stopped = _new_recipe_run(tmp_path / "b", stop_after=7)
    assert stopped.stopped_early
    resumed, _, _, res2 = _new_recipe_run(tmp_path / "b", resume=True)
    assert res2.resumed_from == 6
    assert [r["loss"] for r in res.log] == [r["loss"] for r in res2.log]
    assert [g.id for g in res.lhspg.committed_groups] == [g.id for g in res2.lhspg.committed_groups]


def test_fisher_proxy_of_the_knowledge_analysis_leaves_the_model_as_it_was():
    from lorashear.knowledge.analysis import analyze_knowledge
    from lorashear.knowledge.proxies import fisher_proxy
    from lorashear.knowledge.config import KnowledgeConfig
    from tiny_models import tiny_model

    model = tiny_model("llama", seed=2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    graph = discover(model)
    tokens = random_batches(n=4, seq=12, vocab=model.config.vocab_size, seed=1)
    groups = [g for g in graph.prunable() if g.kind == "mlp_channel"]
    proxy = fisher_proxy(model, groups, tokens, batch_size=2)
    values = [proxy(g, {}) for g in groups]
    assert min(values) > 0 and len(set(values)) == len(values)
    result = analyze_knowledge(model, graph, tokens, KnowledgeConfig(proxy="fisher", ratios=(0.5,), gamma=0.25,
                                                                     batch_size=2), progress=False)
    assert result.config["proxy"] == "fisher" and len(result.node_groups) == 4
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad == flags[n] and p.grad is None
