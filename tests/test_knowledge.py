"""Knowledge distribution analysis: exact restore, ranking, output files, bad input."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch

from lorashear.errors import ConfigError, DataError
from lorashear.graph.groups import StructureGraph
from lorashear.knowledge import (
    KnowledgeConfig,
    KnowledgeResult,
    NodeGroupResult,
    SliceSnapshot,
    analyze_knowledge,
    deviation,
    load_knowledge,
    magnitude_proxy,
    masked,
    mean_token_nll,
    node_groups,
    num_to_prune,
    num_unprunable,
    plot_knowledge,
    rank_scores,
)
from tiny_models import tiny_model

#: the tiny Llama of this file: hidden 32, 4 heads / 2 KV heads of width 8, MLP 24, vocabulary 64,
#: untied embeddings, Hugging Face's own init (3 layers unless a test says otherwise)
KNOWLEDGE_MODEL = dict(size="small", vocab=64, intermediate_size=24, tie_word_embeddings=False, vector_std=None,
                       dtype=None)


# ----------------------------------------------------------------------------- fixtures

def graph_of(model) -> StructureGraph:
    import lorashear

    return lorashear.discover(model)


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", 0, layers=3, **KNOWLEDGE_MODEL)


@pytest.fixture(scope="module")
def graph(model):
    return graph_of(model)


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 64, (4, 16), generator=g)


@pytest.fixture(scope="module")
def result(model, graph, tokens):
    return analyze_knowledge(model, graph, tokens, KnowledgeConfig(ratios=(0.2, 0.5), gamma=0.34, batch_size=3),
                             progress=False, model_name="tiny", data_info={"spec": "random-ids"})


# ----------------------------------------------------------------------------- exactness

def test_analysis_restores_every_weight_bit_exactly(model, graph, tokens):
    before = weights_hash(model)
    logits = model(tokens).logits
    analyze_knowledge(model, graph, tokens, KnowledgeConfig(ratios=(0.3, 0.6, 0.9), gamma=0.0), progress=False)
    assert weights_hash(model) == before
    assert torch.equal(model(tokens).logits, logits)


def test_masked_zeroes_inside_and_restores_after(model, graph, tokens):
    before = weights_hash(model)
    # overlapping groups on purpose: a KV group and the query-head slots share q/o slices
    chosen = graph.in_layer(1, ["kv_group", "attention_head"])
    full = mean_token_nll(model, tokens)
    with masked(model, chosen):
        q = dict(model.named_parameters())["model.layers.1.self_attn.q_proj.weight"]
        assert torch.count_nonzero(q) == 0
        assert mean_token_nll(model, tokens) != full
    assert weights_hash(model) == before


def test_snapshot_restores_after_exception(model, graph):
    before = weights_hash(model)
    with pytest.raises(RuntimeError):
        with masked(model, graph.in_layer(0, ["mlp_channel"])):
            raise RuntimeError("boom")
    assert weights_hash(model) == before
    snap = SliceSnapshot(dict(model.named_parameters()), graph.in_layer(0, ["mlp_channel"]))
    assert snap.numel == 3 * 24 * 32  # gate rows + up rows + down columns, nothing more


def test_analysis_with_lora_attached_restores_exactly(tokens):
    from lorashear.models.lora import LoraSettings, attach_lora

    m = attach_lora(tiny_model("llama", 5, layers=2, **KNOWLEDGE_MODEL), LoraSettings(
        r=4, alpha=8, dropout=0.1, targets=("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")))
    with torch.no_grad():  # non-zero B so LoRA slices matter
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = graph_of(m)
    before = weights_hash(m)
    res = analyze_knowledge(m, g, tokens, KnowledgeConfig(ratios=(0.5,), gamma=0.25), progress=False)
    assert weights_hash(m) == before
    groups = res.unprunable_groups(g)
    assert len(res.unprunable_node_groups()) == 1 and groups
    assert any("lora_" in s.name for grp in groups for s in grp.slices)


def test_analysis_restores_training_mode(graph, tokens):
    m = tiny_model("llama", 0, layers=3, **KNOWLEDGE_MODEL)
    m.train()
    analyze_knowledge(m, graph_of(m), tokens, KnowledgeConfig(ratios=(0.5,)), progress=False)
    assert m.training


# ----------------------------------------------------------------------------- analysis outputs

def test_result_structure(result, graph):
    assert [n.name for n in result.node_groups] == [f"layer{i}.{b}" for i in range(3) for b in ("attention", "mlp")]
    assert result.forward_passes == 1 + 6 * 2
    att, mlp = result.node_groups[0], result.node_groups[1]
    assert att.structure_kind == "attention_head" and att.num_structures == 2
    assert mlp.num_structures == 24
    assert [len(v) for v in att.pruned.values()] == [1, 1]  # 0.2*2 -> 1 (at least one), 0.5*2 -> 1
    assert [len(v) for v in mlp.pruned.values()] == [5, 12]
    for n in result.node_groups:
        assert set(n.deviation) == {"0.2", "0.5"}
        assert n.score == pytest.approx(sum(n.deviation.values()) / 2)
        for key, loss in n.loss.items():
            assert n.deviation[key] == pytest.approx(abs(math.exp(loss - result.full_loss) - 1))
    assert sorted(n.rank for n in result.node_groups) == list(range(1, 7))
    assert sum(n.unprunable for n in result.node_groups) == 2  # round(0.34 * 6)


def test_magnitude_proxy_prunes_the_smallest_channels(model, graph, tokens):
    m = tiny_model("llama", 3, layers=1, **KNOWLEDGE_MODEL)
    g = graph_of(m)
    with torch.no_grad():  # make channels 0..4 tiny so they must be the ones pruned at p=0.2
        for name in ("gate_proj", "up_proj"):
            getattr(m.model.layers[0].mlp, name).weight[:5] *= 1e-3
        m.model.layers[0].mlp.down_proj.weight[:, :5] *= 1e-3
    params = dict(m.named_parameters())
    mags = [magnitude_proxy(x, params) for x in g.by_kind("mlp_channel")]
    assert max(mags[:5]) < min(mags[5:])
    res = analyze_knowledge(m, g, tokens, KnowledgeConfig(ratios=(0.2,), gamma=0.0), progress=False)
    assert res.node_groups[1].pruned["0.2"] == [0, 1, 2, 3, 4]


def test_custom_proxy_and_kv_group_structure(model, graph, tokens):
    calls = []

    def by_index(group, params):
        calls.append(group.kind)
        return -group.index  # highest index pruned first

    res = analyze_knowledge(model, graph, tokens, KnowledgeConfig(ratios=(0.5,), attention_structure="kv_group"),
                            proxy=by_index, progress=False)
    assert res.node_groups[0].structure_kind == "kv_group"
    assert res.node_groups[0].pruned["0.5"] == [1]
    assert res.node_groups[1].pruned["0.5"] == list(range(12, 24))
    assert res.config["proxy"] == "by_index"
    assert "kv_group" in calls and "attention_head" not in calls


def test_unprunable_groups_cover_the_whole_block(result, graph):
    flagged = result.unprunable_node_groups()
    groups = result.unprunable_groups(graph)
    expected = {(n.layer, k) for n in flagged
                for k in (("attention_head", "kv_group") if n.block == "attention" else ("mlp_channel",))}
    assert {(g.layer, g.kind) for g in groups} == expected
    per_block = {"attention": 2 + 2, "mlp": 24}
    assert len(groups) == sum(per_block[n.block] for n in flagged)
    assert result.unprunable_group_ids(graph) == {g.id for g in groups}
    wrong = StructureGraph(graph.groups, "llama", 5, graph.total_params, graph.param_shapes)
    with pytest.raises(ConfigError):
        result.unprunable_groups(wrong)


def test_json_round_trip_and_png(result, tmp_path):
    path = result.save(tmp_path)
    assert path.name == "knowledge.json"
    data = json.loads(path.read_text())
    assert data["data"]["num_sequences"] == 4 and data["data"]["seq_len"] == 16
    assert data["config"]["gamma"] == pytest.approx(0.34) and "lorashear_version" in data
    assert data["unprunable"] == [n.name for n in result.unprunable_node_groups()]
    loaded = load_knowledge(tmp_path)
    assert loaded.to_dict() == result.to_dict()
    png = plot_knowledge(loaded, tmp_path / "knowledge.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_non_finite_deviation_round_trips_as_inf(tmp_path):
    node = NodeGroupResult("layer0.mlp", 0, "mlp", "mlp_channel", 4, {"0.5": [0, 1]}, {"0.5": math.inf},
                           {"0.5": math.inf}, math.inf, 1, True)
    res = KnowledgeResult([node], (0.5,), 0.5, "relative_ppl", 1.0, math.e)
    text = res.save(tmp_path / "k.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert load_knowledge(tmp_path / "k.json").node_groups[0].score == math.inf


# ----------------------------------------------------------------------------- pure logic

def test_ranking_on_a_synthetic_case():
    scores = [0.9, 0.01, 0.05, 0.02, 0.03, 0.04, 0.02, 0.05, 0.10, 1.5]  # first and last layers most sensitive
    ranks, flags = rank_scores(scores, gamma=0.2)
    assert ranks == [2, 10, 4, 8, 7, 6, 9, 5, 3, 1]  # ties keep input order
    assert flags == [True] + [False] * 8 + [True]
    assert rank_scores(scores, gamma=0.0)[1] == [False] * 10
    ranks, flags = rank_scores([0.1, float("nan"), 0.3], gamma=0.34)
    assert ranks == [3, 1, 2] and flags == [False, True, False]


def test_rounding_rules():
    assert [num_to_prune(0.2, 3), num_to_prune(0.5, 3), num_to_prune(0.9, 3)] == [1, 2, 2]
    assert [num_to_prune(0.2, 1536), num_to_prune(0.5, 1536)] == [307, 768]
    assert num_to_prune(0.01, 5) == 1 and num_to_prune(0.5, 1) == 1
    assert [num_unprunable(0.2, 60), num_unprunable(0.1, 5), num_unprunable(0.0, 60)] == [12, 1, 0]


def test_deviation_metrics():
    assert deviation(math.log(12.0), math.log(10.0)) == pytest.approx(0.2)
    assert deviation(math.log(8.0), math.log(10.0)) == pytest.approx(0.2)
    assert deviation(3.0, 2.5, "loss_increase") == pytest.approx(0.5)
    assert deviation(1e6, 1.0) == math.inf and deviation(float("nan"), 1.0) == math.inf


def test_node_groups_fall_back_to_the_other_attention_kind(graph):
    only_kv = StructureGraph([g for g in graph.groups if g.kind != "attention_head"], "llama", 3,
                             graph.total_params, graph.param_shapes)
    nodes = node_groups(only_kv, "attention_head")
    assert [n.structure_kind for n in nodes if n.block == "attention"] == ["kv_group"] * 3
    with pytest.raises(ConfigError):
        node_groups(StructureGraph([], "llama", 3, 0, {}))


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs", [
    {"ratios": (0.0,)}, {"ratios": (1.0,)}, {"ratios": (-0.2, 0.5)}, {"ratios": ()}, {"ratios": (0.2, 0.2)},
    {"ratios": (float("nan"),)}, {"gamma": 1.0}, {"gamma": -0.1}, {"num_sequences": 0}, {"seq_len": 1},
    {"batch_size": 0}, {"data": " "}, {"proxy": "taylor"}, {"metric": "bleu"},
])
def test_bad_config_is_a_one_line_config_error(kwargs):
    with pytest.raises(ConfigError) as info:
        KnowledgeConfig(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("bad", [torch.zeros(0, 16, dtype=torch.long), torch.zeros(4, 1, dtype=torch.long),
                                 torch.zeros(16, dtype=torch.long), torch.zeros(2, 8)])
def test_empty_or_malformed_data_is_a_data_error(model, graph, bad):
    with pytest.raises(DataError) as info:
        analyze_knowledge(model, graph, bad, progress=False)
    assert "\n" not in str(info.value)


def test_graph_from_another_model_is_a_config_error(tokens):
    other = graph_of(tiny_model("llama", 0, layers=4, **KNOWLEDGE_MODEL))
    with pytest.raises(ConfigError):
        analyze_knowledge(tiny_model("llama", 0, layers=2, **KNOWLEDGE_MODEL), other, tokens, progress=False)


def test_load_knowledge_bad_files(tmp_path):
    with pytest.raises(ConfigError):
        load_knowledge(tmp_path)
    (tmp_path / "knowledge.json").write_text("{not json")
    with pytest.raises(ConfigError):
        load_knowledge(tmp_path)
    (tmp_path / "knowledge.json").write_text('{"format": "something else"}')
    with pytest.raises(ConfigError):
        load_knowledge(tmp_path)


# ----------------------------------------------------------------------------- CLI

@pytest.mark.parametrize("flags", [["--ratios", "1.5"], ["--ratios", "0"], ["--gamma", "1"], ["--gamma", "-0.5"],
                                   ["--num-sequences", "0"], ["--ratios", "abc"]])
def test_cli_bad_input_exits_2(flags, tmp_path, capsys):
    from lorashear.cli import main

    try:
        code = main(["analyze", "no-such-model-dir-xyz", "--out", str(tmp_path / "out"), *flags])
    except SystemExit as exc:  # argparse rejects a malformed list itself, also with exit 2
        code = exc.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("lorashear analyze: error:")
    if flags != ["--ratios", "abc"]:  # argparse itself prints its usage above the error line
        assert len(lines) == 1
    assert not (tmp_path / "out").exists()


def _tiny_model_dir(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "<eos>"] + [f"w{i}" for i in range(62)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="<eos>",
                            pad_token="<eos>").save_pretrained(path)
    tiny_model("llama", 0, layers=2, **KNOWLEDGE_MODEL).save_pretrained(path)
    return path


def test_cli_end_to_end_on_a_tiny_model(tmp_path, capsys):
    from lorashear.cli import main

    model_dir = _tiny_model_dir(tmp_path / "tiny")
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "train.txt"
    data.write_text("\n\n".join(" ".join(f"w{int(i)}" for i in torch.randint(2, 64, (40,), generator=g))
                                for _ in range(20)))
    out = tmp_path / "out"
    code = main(["-q", "analyze", str(model_dir), "--data", str(data), "--out", str(out), "--ratios", "0.25,0.5",
                 "--gamma", "0.25", "--num-sequences", "3", "--seq-len", "16"])
    assert code == 0
    res = load_knowledge(out)
    assert [n.name for n in res.node_groups] == ["layer0.attention", "layer0.mlp", "layer1.attention", "layer1.mlp"]
    assert res.data["spec"] == str(data) and res.data["num_sequences"] == 3 and res.data["seq_len"] == 16
    assert res.ratios == (0.25, 0.5) and len(res.unprunable_node_groups()) == 1
    assert (out / "knowledge.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "unprunable" in capsys.readouterr().out


def test_cli_empty_data_exits_2(tmp_path, capsys):
    from lorashear.cli import main

    model_dir = _tiny_model_dir(tmp_path / "tiny")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    capsys.readouterr()
    code = main(["analyze", str(model_dir), "--data", str(empty), "--out", str(tmp_path / "out")])
    assert code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_new_proxy_is_one_registered_factory(model, graph, tokens):
    """The analysis' proxies are a registry: a registered factory is a name KnowledgeConfig accepts."""
    from lorashear.knowledge import proxies

    with pytest.raises(ConfigError, match="unknown proxy 'last_first'"):
        KnowledgeConfig(proxy="last_first")

    @proxies.register_proxy("last_first")
    def _last_first(context):
        assert context.tokens is not None and len(context.groups) > 0
        return lambda group, params: -group.index

    try:
        res = analyze_knowledge(model, graph, tokens, KnowledgeConfig(ratios=(0.5,), proxy="last_first"),
                                progress=False)
        assert res.node_groups[1].pruned["0.5"] == list(range(12, 24))
        assert res.config["proxy"] == "last_first"
    finally:
        del proxies.PROXIES["last_first"]
