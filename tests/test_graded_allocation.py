"""Knowledge-graded allocation: per-layer counts follow the knowledge analysis instead of being equal."""

from __future__ import annotations

import math

import pytest

from lorashear.errors import ConfigError
from lorashear.knowledge.result import KnowledgeResult, NodeGroupResult
from lorashear.lhspg import LHSPGConfig, TargetConfig
from lorashear.lhspg.targets import graded_counts
from lorashear.models.lora import LoraSettings
from lorashear.stages import prune as prune_stage
from lorashear.stages.prune import PruneConfig
from lorashear.training import TrainConfig
from test_lhspg import random_batches
from tiny_models import plain_tiny_llama


def test_equal_weights_give_equal_counts_and_the_total_is_kept():
    caps = {0: 60, 1: 60, 2: 60}
    counts = graded_counts(30, caps, {0: 1.0, 1: 1.0, 2: 1.0}, {0: 64, 1: 64, 2: 64})
    assert counts == {0: 10, 1: 10, 2: 10}


def test_counts_follow_the_weights():
    counts = graded_counts(40, {0: 60, 1: 60, 2: 60}, {0: 1.0, 1: 2.0, 2: 1.0}, {0: 64, 1: 64, 2: 64})
    assert sum(counts.values()) == 40
    assert counts == {0: 10, 1: 20, 2: 10}


def test_a_capped_layer_passes_its_excess_to_the_others():
    counts = graded_counts(40, {0: 5, 1: 60, 2: 60}, {0: 10.0, 1: 1.0, 2: 1.0}, {0: 64, 1: 64, 2: 64})
    assert counts[0] == 5 and sum(counts.values()) == 40 and abs(counts[1] - counts[2]) <= 1
    # zero weight: nothing from that layer
    counts = graded_counts(20, {0: 60, 1: 60}, {0: 0.0, 1: 1.0}, {0: 64, 1: 64})
    assert counts == {0: 0, 1: 20}


def test_multiples_are_kept_and_the_total_is_the_closest_reachable():
    counts = graded_counts(50, {0: 56, 1: 56, 2: 56}, {0: 1.0, 1: 3.0, 2: 1.0}, {0: 64, 1: 64, 2: 64}, m=8)
    assert all((64 - q) % 8 == 0 for q in counts.values())
    assert abs(sum(counts.values()) - 50) <= 4
    assert counts[1] > counts[0] and counts[1] > counts[2]


def _node(layer: int, block: str, score: float, unprunable: bool = False) -> NodeGroupResult:
    kind = "attention_head" if block == "attention" else "mlp_channel"
    return NodeGroupResult(name=f"layer{layer}.{block}", layer=layer, block=block, structure_kind=kind,
                           num_structures=4, pruned={}, loss={}, deviation={"0.5": score}, score=score, rank=0,
                           unprunable=unprunable)


def _knowledge(mlp_scores: list[float], attention_scores: list[float], unprunable=()) -> KnowledgeResult:
    nodes = [_node(i, "mlp", s, ("mlp", i) in unprunable) for i, s in enumerate(mlp_scores)]
    nodes += [_node(i, "attention", s, ("attention", i) in unprunable) for i, s in enumerate(attention_scores)]
    return KnowledgeResult(node_groups=nodes, ratios=(0.5,), gamma=0.0, metric="relative_ppl", full_loss=1.0,
                           full_perplexity=math.e, model={"num_layers": len(mlp_scores)})


def test_layer_weights_formula():
    k = _knowledge([0.1, 0.4, 0.1, math.inf], [0.2, 0.2, 0.0, 0.2], unprunable=[("attention", 3)])
    w = k.layer_weights(1.0)
    mean_mlp = (0.1 + 0.4 + 0.1) / 3
    assert w[("mlp_channel", 0)] == pytest.approx(mean_mlp / 0.1)
    assert w[("mlp_channel", 1)] == pytest.approx(mean_mlp / 0.4)
    assert w[("mlp_channel", 3)] == 0.0  # removing it broke the model
    mean_att = 0.4 / 3
    assert w[("attention_head", 0)] == pytest.approx(mean_att / 0.2)
    assert w[("kv_group", 0)] == w[("attention_head", 0)]
    assert w[("attention_head", 2)] == pytest.approx(1 / 0.05)  # raised to 5% of the mean
    assert ("attention_head", 3) not in w  # unprunable: not pruned at all
    assert k.layer_weights(2.0)[("mlp_channel", 1)] == pytest.approx((mean_mlp / 0.4) ** 2)
    assert k.layer_weights(0.0)[("mlp_channel", 1)] == 1.0


def _prune(tmp_path, name: str, grading: float, knowledge) -> dict:
    cfg = PruneConfig(model="", out=str(tmp_path / name), knowledge=str(knowledge),
                      lhspg=LHSPGConfig(num_periods=2, warmup_steps=1, period_steps=2),
                      lora=LoraSettings(r=4, alpha=8, dropout=0.0),
                      target=TargetConfig(ratio=0.2, uniform_per_layer=True, knowledge_grading=grading),
                      train=TrainConfig(steps=6, batch_size=2, progress=False, lr=1e-2))
    return prune_stage.run(cfg, model=plain_tiny_llama(layers=4), data=random_batches(n=8, seq=16)).report


def test_prune_stage_grades_the_per_layer_counts(tmp_path):
    knowledge = _knowledge([0.1, 0.8, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]).save(tmp_path / "knowledge.json")
    flat = _prune(tmp_path, "flat", 0.0, knowledge)
    graded = _prune(tmp_path, "graded", 1.0, knowledge)
    assert flat["plan"]["counts"] == graded["plan"]["counts"]  # the same totals, spread differently
    assert graded["params"]["ratio_removed"] == pytest.approx(flat["params"]["ratio_removed"])
    kept = {layer: v["kept"] for layer, v in graded["kept_per_layer"]["mlp_channel"].items()}
    flat_kept = {layer: v["kept"] for layer, v in flat["kept_per_layer"]["mlp_channel"].items()}
    assert len(set(flat_kept.values())) == 1
    assert kept["1"] > flat_kept["1"] and kept["1"] > max(kept["0"], kept["2"], kept["3"])
    assert graded["verify"]["compacted_vs_masked_max_abs_logit_diff"] < 1e-5


def test_grading_needs_knowledge_and_uniform_per_layer(tmp_path):
    with pytest.raises(ConfigError, match="--knowledge"):
        PruneConfig(model="m", out=str(tmp_path), target=TargetConfig(ratio=0.2, knowledge_grading=1.0,
                                                                      uniform_per_layer=True))
    with pytest.raises(ConfigError, match="uniform-per-layer"):
        PruneConfig(model="m", out=str(tmp_path), knowledge="k.json",
                    target=TargetConfig(ratio=0.2, knowledge_grading=1.0))
    with pytest.raises(ConfigError, match="knowledge_grading"):
        TargetConfig(ratio=0.2, knowledge_grading=-1.0)
