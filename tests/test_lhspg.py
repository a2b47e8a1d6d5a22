"""LHSPG optimizer: saliency, schedule, targets, forgetting, merge, and a short run on a tiny Llama."""

from __future__ import annotations

import math

import pytest
import torch

from lorashear.graph.groups import Group, ParamSlice, StructureGraph
from lorashear.lhspg import (
    CRITERIA,
    LHSPG,
    LHSPGConfig,
    PruningSchedule,
    SliceTable,
    TargetConfig,
    criteria,
    criteria_from_tensors,
    effective_weights,
    find_loras,
    group_statistics,
    plan_targets,
    saliency,
    split_quota,
)
from lorashear.errors import ConfigError
from lorashear.lhspg.targets import layer_rounding
from lorashear.training.optim import make_optimizer
from tiny_models import tiny_model

# ----------------------------------------------------------------------------- tiny model helpers

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_lora_model(seed: int = 0, r: int = 4, alpha: int = 8, dropout: float = 0.0, random_b: bool = False):
    """A random 2-layer GQA Llama (hidden 32, 4 heads / 2 KV heads, MLP 64, vocabulary 96, tied embeddings,
    Hugging Face's init, training mode) with LoRA on every linear."""
    from lorashear.models.lora import LoraSettings, attach_lora

    model = tiny_model("llama", seed, size="small", tie_word_embeddings=True, vector_std=None, train=True, dtype=None)
    model = attach_lora(model, LoraSettings(r=r, alpha=alpha, dropout=dropout, targets=TARGETS))
    if random_b:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model


def hand_groups(model) -> StructureGraph:
    """MLP-channel and query-head-slot groups built by hand (stands in for lorashear.discover)."""
    cfg = model.config
    hd = cfg.head_dim
    n_rep = cfg.num_attention_heads // cfg.num_key_value_heads
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    groups: list[Group] = []
    pre = "base_model.model.model.layers"

    def add(kind, layer, index, slices, width):
        num = sum(len(s.indices) * math.prod(shapes[s.name]) // shapes[s.name][s.dim] for s in slices)
        lora = sum(len(s.indices) * math.prod(shapes[s.name]) // shapes[s.name][s.dim]
                   for s in slices if "lora_" in s.name)
        groups.append(Group(id=len(groups), kind=kind, layer=layer, index=index, slices=slices,
                            num_params=num, lora_params=lora, width=width))

    for layer in range(cfg.num_hidden_layers):
        a, m = f"{pre}.{layer}.self_attn", f"{pre}.{layer}.mlp"
        for slot in range(n_rep):
            rows = tuple(i for kv in range(cfg.num_key_value_heads)
                         for i in range((kv * n_rep + slot) * hd, (kv * n_rep + slot + 1) * hd))
            add("attention_head", layer, slot, [
                ParamSlice(f"{a}.q_proj.base_layer.weight", 0, rows),
                ParamSlice(f"{a}.q_proj.lora_B.default.weight", 0, rows),
                ParamSlice(f"{a}.o_proj.base_layer.weight", 1, rows),
                ParamSlice(f"{a}.o_proj.lora_A.default.weight", 1, rows)], hd)
        for c in range(cfg.intermediate_size):
            add("mlp_channel", layer, c, [
                ParamSlice(f"{m}.gate_proj.base_layer.weight", 0, (c,)),
                ParamSlice(f"{m}.gate_proj.lora_B.default.weight", 0, (c,)),
                ParamSlice(f"{m}.up_proj.base_layer.weight", 0, (c,)),
                ParamSlice(f"{m}.up_proj.lora_B.default.weight", 0, (c,)),
                ParamSlice(f"{m}.down_proj.base_layer.weight", 1, (c,)),
                ParamSlice(f"{m}.down_proj.lora_A.default.weight", 1, (c,))], 1)
    total = sum(p.numel() for p in model.parameters())
    return StructureGraph(groups=groups, model_type="llama", num_layers=cfg.num_hidden_layers, total_params=total,
                          param_shapes=shapes, lora=True)


def base_param_count(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


def embedding_count(model) -> int:
    return model.get_input_embeddings().weight.numel()


def group_norm(model, group) -> float:
    params = dict(model.named_parameters())
    total = 0.0
    for s in group.slices:
        if "lora_" in s.name:
            continue
        x = params[s.name].detach().index_select(s.dim, s.index_tensor())
        total += float((x.double() ** 2).sum())
    return math.sqrt(total)


def lora_part_norm(model, group) -> float:
    params = dict(model.named_parameters())
    return math.sqrt(sum(float((params[s.name].detach().index_select(s.dim, s.index_tensor()).double() ** 2).sum())
                         for s in group.slices if "lora_" in s.name))


def make_plan(model, graph, ratio=0.2, **kw):
    cfg = TargetConfig(ratio=ratio, **kw)
    return plan_targets(graph.prunable(), total_params=base_param_count(model),
                        embedding_params=embedding_count(model), config=cfg, all_groups=graph.groups)


def random_batches(n=8, seq=16, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq), generator=g)


def lhspg_run(ratio, train_config, lhspg_config, *, seed=11, dropout=0.1, data=None, **kw):
    """A tiny LoRA model pruned to ``ratio`` by ``train_lhspg``: ``(model, graph, plan, result)``;
    ``kw`` goes to ``train_lhspg`` (loss_fn, checkpoint_dir, resume, stop_after, ...)."""
    from lorashear.graph.discover import discover
    from lorashear.lhspg.train import train_lhspg

    model = tiny_lora_model(seed=seed, dropout=dropout)
    graph = discover(model)
    plan = make_plan(model, graph, ratio)
    res = train_lhspg(model, graph.groups, plan, random_batches(n=6, seq=16) if data is None else data,
                      train_config=train_config, lhspg_config=lhspg_config, **kw)
    return model, graph, plan, res


# ----------------------------------------------------------------------------- schedule


def test_split_quota_floor_and_remainder_last():
    assert split_quota(10, 3) == [3, 3, 4]
    assert split_quota(2, 4) == [0, 0, 0, 2]
    assert sum(split_quota(97, 10)) == 97


def test_schedule_positions():
    s = PruningSchedule(warmup_steps=2, num_periods=3, period_steps=4)
    assert s.position(0) is None and s.position(1) is None
    assert s.position(2) == (0, 0) and s.position(5) == (0, 3) and s.position(6) == (1, 0)
    assert s.prune_end == 14 and s.position(14) is None
    assert s.period_starting_at(10) == 2 and s.period_ending_at(13) == 2
    b = PruningSchedule.for_budget(100, 10)
    assert b.prune_end <= 70 and b.warmup_steps == 10


# ----------------------------------------------------------------------------- saliency


def test_criteria_hand_computed():
    w = torch.tensor([3.0, 4.0])  # ||w|| = 5
    u = torch.tensor([1.0, 0.0])  # <w,u> = 3, ||u|| = 1
    c = criteria_from_tensors(w, u)
    assert c["magnitude"] == pytest.approx(5.0)
    assert c["avg_magnitude"] == pytest.approx(2.5)
    assert c["cosine"] == pytest.approx(3 / 5 + 1)
    assert c["taylor_first"] == pytest.approx(3.0)
    assert c["taylor_second"] == pytest.approx(4.5)
    z = criteria_from_tensors(w, torch.zeros(2))  # no update yet: cosine defined as 0 + 1
    assert z["cosine"] == 1.0 and z["taylor_first"] == 0.0


def test_saliency_normalises_each_criterion_by_l2_norm():
    raw = {"magnitude": torch.tensor([3.0, 4.0], dtype=torch.float64),
           "avg_magnitude": torch.tensor([1.0, 0.0], dtype=torch.float64),
           "cosine": torch.tensor([0.0, 2.0], dtype=torch.float64),
           "taylor_first": torch.tensor([0.0, 0.0], dtype=torch.float64),
           "taylor_second": torch.tensor([6.0, 8.0], dtype=torch.float64)}
    s = saliency(raw, [1, 1, 1, 1, 1])
    assert torch.allclose(s, torch.tensor([0.6 + 1 + 0 + 0 + 0.6, 0.8 + 0 + 1 + 0 + 0.8], dtype=torch.float64))
    s2 = saliency(raw, {"magnitude": 2.0})
    assert torch.allclose(s2, torch.tensor([1.2, 1.6], dtype=torch.float64))
    # clusters are normalised separately
    s3 = saliency(raw, {"magnitude": 1.0}, clusters=torch.tensor([0, 1]))
    assert torch.allclose(s3, torch.tensor([1.0, 1.0], dtype=torch.float64))


def test_vectorised_statistics_match_per_group_reference():
    model = tiny_lora_model(random_b=True)
    graph = hand_groups(model)
    params = dict(model.named_parameters())
    loras = find_loras(model)
    groups = graph.groups[:3] + graph.groups[-5:]
    stats = group_statistics(SliceTable(groups, params), params, loras)
    raw = criteria(stats)
    for pos, g in enumerate(groups):
        ws, us = [], []
        for s in g.slices:
            if "lora_" in s.name:
                continue
            x = params[s.name].detach().index_select(s.dim, s.index_tensor())
            delta = loras[s.name].delta().index_select(s.dim, s.index_tensor())
            ws.append(x.flatten())
            us.append(delta.flatten())
        ref = criteria_from_tensors(torch.cat(ws), torch.cat(us))
        for name in CRITERIA:
            assert float(raw[name][pos]) == pytest.approx(ref[name], rel=1e-4, abs=1e-9), (g, name)


# ----------------------------------------------------------------------------- targets


def test_plan_targets_close_to_ratio():
    model = tiny_lora_model()
    graph = hand_groups(model)
    total = base_param_count(model)
    for ratio in (0.05, 0.1, 0.2):
        plan = make_plan(model, graph, ratio)
        assert abs(plan.expected_ratio - ratio) <= 0.005 + 1e-9, (ratio, plan.to_dict())
        assert plan.total_params == total
    plan = make_plan(model, graph, 0.2, uniform_per_layer=True, round_to=4)
    for k, per in plan.per_layer.items():
        assert len(set(per.values())) == 1
    assert (64 - plan.per_layer["mlp_channel"][0]) % 4 == 0


def test_plan_targets_cluster_ratio_and_unreachable():
    from lorashear.errors import ConfigError

    model = tiny_lora_model()
    graph = hand_groups(model)
    plan = make_plan(model, graph, None, attention_ratio=0.5, mlp_ratio=0.25)
    assert plan.counts["attention_head"] == 2 and plan.counts["mlp_channel"] == 32
    with pytest.raises(ConfigError):
        make_plan(model, graph, 0.9)


def test_layer_rounding_keeps_multiples():
    take = layer_rounding({0: 64, 1: 62}, {0: 64, 1: 62}, 10, 4,
                          {0: [0.1 * i for i in range(64)], 1: [0.05 * i for i in range(62)]})
    assert (64 - take[0]) % 4 == 0 and (62 - take[1]) % 4 == 0
    assert abs(sum(take.values()) - 10) <= 2


# ----------------------------------------------------------------------------- the optimizer


def _lhspg(model, graph, plan, **cfg):
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "adamw", lr=1e-2)
    config = LHSPGConfig(**{"warmup_steps": 1, "num_periods": 2, "period_steps": 4, **cfg})
    return LHSPG(model, graph.groups, opt, plan=plan, config=config), opt


def _train_steps(model, opt, n, data, start=0):
    model.train()
    for i in range(n):
        batch = data[(start + i) % data.shape[0]].unsqueeze(0)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_decay_reaches_exactly_zero_at_period_end_and_norm_falls_linearly():
    model = tiny_lora_model(seed=1)
    graph = hand_groups(model)
    plan = make_plan(model, graph, 0.15)
    # SGD with lr 0: B stays 0, so s*B*A = 0 and the decay alone acts -> exact linear fall
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr=1e-12)
    lh = LHSPG(model, graph.groups, opt, plan=plan,
               config=LHSPGConfig(warmup_steps=1, num_periods=2, period_steps=4, merge_at_period_end=True))
    data = random_batches()
    _train_steps(model, lh, 1, data)  # warm-up; selects period 0
    red = [lh.candidates[i] for i in lh.redundant]
    assert red, "period 0 selected nothing"
    norms0 = [group_norm(model, g) for g in red]
    for t in range(4):
        _train_steps(model, lh, 1, data, start=1 + t)
        for g, n0 in zip(red, norms0):
            if t < 3:
                assert group_norm(model, g) == pytest.approx(n0 * (3 - t) / 4, rel=1e-3)
            else:
                assert group_norm(model, g) == 0.0 and lora_part_norm(model, g) == 0.0
    assert lh.committed and not set(lh.committed) & set(lh.redundant)


def test_forgetting_folds_lora_update_and_zeroes_lora_parts():
    model = tiny_lora_model(seed=2, random_b=True)
    graph = hand_groups(model)
    plan = make_plan(model, graph, 0.15)
    lh, opt = _lhspg(model, graph, plan, warmup_steps=1, period_steps=5)
    data = random_batches()
    _train_steps(model, lh, 1, data)
    red = [lh.candidates[i] for i in lh.redundant]
    before = effective_weights(model)
    lh.optimizer = _NoOp()
    lh.step()  # t = 0: x~ = 0.8 x + sBA, lora parts of the group -> 0
    after = effective_weights(model)
    for g in red:
        assert lora_part_norm(model, g) == 0.0
    # outside the redundant groups the effective weights did not move
    params = dict(model.named_parameters())
    for name in before:
        mask = torch.ones_like(before[name], dtype=torch.bool)
        for g in red:
            for s in g.slices:
                if s.name == name:
                    mask.index_fill_(s.dim, s.index_tensor(), False)
        assert torch.allclose(before[name][mask], after[name][mask], atol=1e-6), name
    lh.optimizer = opt
    del params


class _NoOp:
    param_groups: list = []

    def step(self, closure=None):
        return None

    def zero_grad(self, set_to_none=True):
        pass


def test_merge_at_period_end_keeps_effective_weights():
    model = tiny_lora_model(seed=3, random_b=True)
    graph = hand_groups(model)
    plan = make_plan(model, graph, 0.1)
    lh, _ = _lhspg(model, graph, plan)
    before = effective_weights(model)
    lh.merge_lora()
    after = effective_weights(model)
    for name in before:
        assert torch.allclose(before[name], after[name], atol=1e-6), name
    for lora in find_loras(model).values():
        assert torch.count_nonzero(lora.B) == 0


def test_half_space_projection_zeroes_groups_below_epsilon():
    model = tiny_lora_model(seed=4)
    graph = hand_groups(model)
    plan = make_plan(model, graph, 0.15)
    # epsilon 0.9: at t = 0 the decayed group has <x~,x> = 0.75 ||x||^2 < 0.9 ||x||^2 -> zero at once
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], "sgd", lr=1e-12)
    lh = LHSPG(model, graph.groups, opt, plan=plan,
               config=LHSPGConfig(warmup_steps=1, num_periods=2, period_steps=4, epsilon=0.9))
    data = random_batches()
    _train_steps(model, lh, 2, data)
    red = [lh.candidates[i] for i in lh.redundant]
    assert red and all(group_norm(model, g) == 0.0 for g in red)
    assert lh.last_zeroed == len(red)


def test_full_run_zeroes_exactly_the_selected_groups_and_respects_unprunable():
    model = tiny_lora_model(seed=5, dropout=0.05)
    graph = hand_groups(model)
    excluded = {g.id for g in graph.groups if g.layer == 0 and g.kind == "mlp_channel"}
    cands = [g for g in graph.prunable() if g.id not in excluded]
    plan = plan_targets(cands, total_params=base_param_count(model), embedding_params=embedding_count(model),
                        config=TargetConfig(ratio=0.1), all_groups=graph.groups)
    lh, _ = _lhspg(model, graph, plan, warmup_steps=2, num_periods=3, period_steps=3)
    lh2 = LHSPG(model, graph.groups, lh.optimizer, plan=plan, config=lh.config, exclude=excluded)
    data = random_batches()
    _train_steps(model, lh2, 12, data)
    committed = {g.id for g in lh2.committed_groups}
    assert len(committed) == sum(plan.counts.values())
    assert not committed & excluded
    for g in graph.groups:
        if g.id in committed:
            assert group_norm(model, g) == 0.0 and lora_part_norm(model, g) == 0.0
        elif g.kind == "mlp_channel":
            assert group_norm(model, g) > 0.0
    removed = sum(g.base_params for g in lh2.committed_groups)
    assert abs(removed / plan.total_params - 0.1) <= 0.005


def test_uniform_per_layer_run():
    model = tiny_lora_model(seed=6)
    graph = hand_groups(model)
    plan = make_plan(model, graph, 0.1, uniform_per_layer=True, round_to=2)
    lh, _ = _lhspg(model, graph, plan, warmup_steps=1, num_periods=2, period_steps=2)
    _train_steps(model, lh, 5, random_batches())
    per_layer = {}
    for g in lh.committed_groups:
        per_layer.setdefault((g.kind, g.layer), 0)
        per_layer[(g.kind, g.layer)] += 1
    for kind, layers in plan.per_layer.items():
        counts = {per_layer.get((kind, layer), 0) for layer in layers}
        assert counts == set(layers.values())


@pytest.mark.parametrize("uniform", [False, True])
def test_round_to_rounds_channels_only_so_heads_are_still_pruned(uniform):
    """round_to keeps every layer's MLP width a multiple of it; head counts are not rounded, so with a
    multiple larger than a layer's head count heads are still removed."""
    model = tiny_lora_model(seed=7)
    graph = hand_groups(model)
    heads = {g.layer: 0 for g in graph.groups if g.kind == "attention_head"}
    for g in graph.groups:
        if g.kind == "attention_head":
            heads[g.layer] += 1
    assert max(heads.values()) < 8  # the multiple below would forbid pruning any head if it applied to heads
    plan = make_plan(model, graph, 0.3, round_to=8, uniform_per_layer=uniform)
    assert plan.counts["attention_head"] > 0 and plan.counts["mlp_channel"] > 0
    lh, _ = _lhspg(model, graph, plan, warmup_steps=1, num_periods=2, period_steps=2)
    _train_steps(model, lh, 5, random_batches())
    removed = {}
    for g in lh.committed_groups:
        removed[(g.kind, g.layer)] = removed.get((g.kind, g.layer), 0) + 1
    assert sum(n for (k, _), n in removed.items() if k == "attention_head") > 0
    for layer in heads:
        assert (64 - removed.get(("mlp_channel", layer), 0)) % 8 == 0, removed
    assert abs(sum(g.base_params for g in lh.committed_groups) / plan.total_params - 0.3) <= 0.03



def test_rounded_global_pruning_lands_on_the_planned_count():
    """With global allocation the last period rounds every layer's kept width down to a multiple of m; the
    periods before leave it room, so the channels removed match the plan within half a block (not the plan
    plus every layer's remainder)."""
    model = tiny_lora_model(seed=7)
    graph = hand_groups(model)
    m = 16
    plan = make_plan(model, graph, 0.3, round_to=m)
    lh, _ = _lhspg(model, graph, plan, warmup_steps=1, num_periods=4, period_steps=2, quota="front")
    _train_steps(model, lh, 10, random_batches())
    mlp = [g for g in lh.committed_groups if g.kind == "mlp_channel"]
    assert abs(len(mlp) - plan.counts["mlp_channel"]) <= m // 2, (len(mlp), plan.counts)
    for layer in {g.layer for g in graph.groups if g.kind == "mlp_channel"}:
        assert (64 - sum(1 for g in mlp if g.layer == layer)) % m == 0

def test_max_removable_rounds_channels_only():
    from lorashear.stages.prune import max_removable

    model = tiny_lora_model()
    graph = hand_groups(model)
    cands = graph.prunable()
    one = max_removable(cands, graph.groups, TargetConfig(ratio=0.1))
    eight = max_removable(cands, graph.groups, TargetConfig(ratio=0.1, round_to=8))
    mlp = [g for g in cands if g.kind == "mlp_channel"]
    layers = {g.layer for g in mlp}
    # only the MLP keeps 8 channels instead of 1 per layer; heads keep one slot either way
    assert one - eight == pytest.approx(7 * len(layers) * mlp[0].base_params)



def test_round_min_width_leaves_narrow_models_exact():
    """round_to applies only where every layer of a rounded kind is at least round_min_width wide: a 64-channel
    toy keeps exact counts (with a note), and its reachability check agrees with the plan."""
    from lorashear.stages.prune import max_removable

    model = tiny_lora_model(seed=7)
    graph = hand_groups(model)
    exact = make_plan(model, graph, 0.3)
    skipped = make_plan(model, graph, 0.3, round_to=32, round_min_width=512)
    assert skipped.round_to == 1 and skipped.counts == exact.counts
    assert any("round_min_width 512" in n for n in skipped.notes)
    applied = make_plan(model, graph, 0.3, round_to=8, round_min_width=64)  # every layer is 64 wide
    assert applied.round_to == 8 and not any("round_min_width" in n for n in applied.notes)
    cands = graph.prunable()
    assert max_removable(cands, graph.groups, TargetConfig(ratio=0.1, round_to=32, round_min_width=512)) == \
        max_removable(cands, graph.groups, TargetConfig(ratio=0.1))
    with pytest.raises(ConfigError):
        TargetConfig(ratio=0.1, round_min_width=-1)

def test_a_new_weight_criterion_is_one_registered_function():
    """The saliency criteria are a registry: registering one makes it a name LHSPG's config accepts and
    saliency sums, with no other change."""
    import importlib

    from lorashear.lhspg.optimizer import parse_saliency

    sal = importlib.import_module("lorashear.lhspg.saliency")  # the package exports a function of that name

    with pytest.raises(ConfigError, match="unknown saliency criterion 'update_norm'"):
        parse_saliency(["update_norm"])
    sal.weight_criterion("update_norm")(lambda stats: stats.update_norm_sq.sqrt())
    try:
        assert parse_saliency(["update_norm=2"]) == {"update_norm": 2.0}
        w, u = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0])
        assert criteria_from_tensors(w, u)["update_norm"] == pytest.approx(2.0)
        raw = {"update_norm": torch.tensor([1.0, 3.0], dtype=torch.float64)}
        assert torch.allclose(saliency(raw, {"update_norm": 1.0}),
                              torch.tensor([1.0, 3.0], dtype=torch.float64) / 10 ** 0.5)
    finally:
        del sal.WEIGHT_CRITERIA["update_norm"]
    assert "update_norm" not in sal.known_criteria() and "fisher" in sal.known_criteria()
