"""Zero-invariance and exact compaction for every supported family, with and without LoRA."""

from __future__ import annotations

import random

import pytest
import torch

import lorashear
from lorashear.graph.groups import zero_groups
from tiny_models import tiny_model, with_lora

IDS = torch.tensor([[3, 17, 42, 8, 91, 5, 60, 33, 2, 77, 14]])


def _select(graph, seed: int, k: int, *, overlap: bool):
    rng = random.Random(seed)
    pool = graph.prunable()
    chosen = []
    used: set[tuple[str, int]] = set()
    for g in rng.sample(pool, len(pool)):
        if len(chosen) >= k:
            break
        if g.layer is not None and g.kind in ("attention_head", "kv_group"):
            # keep at least one KV group and one query-head slot per layer
            same = [c for c in chosen if c.layer == g.layer and c.kind == g.kind]
            total = len([x for x in pool if x.layer == g.layer and x.kind == g.kind])
            if len(same) + 1 >= total:
                continue
        keys = {(s.name, i) for s in g.slices for i in s.indices if s.dim == 0}
        if not overlap and keys & used:
            continue
        used |= keys
        chosen.append(g)
    return chosen


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("seed", [0, 1])
def test_zeroing_equals_removing(family: str, lora: bool, seed: int) -> None:  # family: every FAMILIES entry
    model = tiny_model(family, seed)
    if lora:
        model = with_lora(model)
    graph = lorashear.discover(model)
    kinds = {g.kind for g in graph.prunable()}
    assert "mlp_channel" in kinds
    assert kinds & {"attention_head", "kv_group"}
    selection = _select(graph, seed, 14, overlap=False)
    assert selection
    n_before = sum(p.numel() for p in model.parameters())
    zero_groups(model, selection)
    with torch.no_grad():
        masked = model(IDS).logits
    small = lorashear.compact(model, selection)
    with torch.no_grad():
        compacted = small(IDS).logits
    n_after = sum(p.numel() for p in small.parameters())
    assert (masked - compacted).abs().max().item() <= 1e-5
    assert n_before - n_after == sum(g.num_params for g in selection)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3"])
def test_overlapping_selection_removes_union(family: str) -> None:
    model = with_lora(tiny_model(family))
    graph = lorashear.discover(model)
    layer0_heads = [g for g in graph.prunable() if g.layer == 0 and g.kind == "attention_head"]
    layer0_kv = [g for g in graph.prunable() if g.layer == 0 and g.kind == "kv_group"]
    selection = [layer0_heads[0], layer0_kv[0]] + [g for g in graph.prunable() if g.kind == "mlp_channel"][:5]
    n_before = sum(p.numel() for p in model.parameters())
    expected = graph.removed_params(selection)
    assert expected < sum(g.num_params for g in selection)  # they overlap at one head
    zero_groups(model, selection)
    with torch.no_grad():
        masked = model(IDS).logits
    small = lorashear.compact(model, selection)
    with torch.no_grad():
        assert (small(IDS).logits - masked).abs().max().item() <= 1e-5
    assert n_before - sum(p.numel() for p in small.parameters()) == expected


def test_llama_structure_counts(tiny_llama) -> None:
    graph = lorashear.discover(tiny_llama)
    for layer in range(2):
        assert len(graph.in_layer(layer, ["attention_head"])) == 3  # slots: 6 heads / 2 KV groups
        assert len(graph.in_layer(layer, ["kv_group"])) == 2
        assert len(graph.in_layer(layer, ["mlp_channel"])) == 40
    slot = graph.in_layer(0, ["attention_head"])[1]
    q = next(s for s in slot.slices if s.name.endswith("q_proj.weight"))
    # slot 1 = head 1 of KV group 0 and head 4 of KV group 1 (head_dim 8)
    assert q.indices == tuple(range(8, 16)) + tuple(range(32, 40))
    assert all(g.layer is not None for g in graph.groups)


def test_lora_slices_follow_base(tiny_llama) -> None:
    model = with_lora(tiny_llama)
    graph = lorashear.discover(model)
    ch = graph.in_layer(1, ["mlp_channel"])[7]
    names = {(s.name.split("layers.1.")[1], s.dim) for s in ch.slices}
    assert ("mlp.gate_proj.lora_B.default.weight", 0) in names
    assert ("mlp.up_proj.lora_B.default.weight", 0) in names
    assert ("mlp.down_proj.lora_A.default.weight", 1) in names
    assert not any("lora_A" in n and d == 0 for n, d in names)  # rank never pruned
    assert ch.lora_params == 4 + 4 + 4


def test_merged_lora_still_slices_lora_factors(tiny_llama) -> None:
    model = with_lora(tiny_llama)
    model.merge_adapter()
    graph = lorashear.discover(model)
    ch = graph.in_layer(0, ["mlp_channel"])[0]
    assert any("lora_B" in s.name for s in ch.slices)


def test_hidden_channels_reported_unprunable_where_not_exact() -> None:
    graph = lorashear.discover(tiny_model("phi3"), hidden=True)
    hidden = [g for g in graph.groups if g.kind == "hidden_channel"]
    assert len(hidden) == 48 and not any(g.prunable for g in hidden)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_hidden_channels_zero_invariant(family: str) -> None:
    model = tiny_model(family)
    graph = lorashear.discover(model, hidden=True)
    hidden = [g for g in graph.groups if g.kind == "hidden_channel"]
    assert len(hidden) == 48 and all(g.prunable for g in hidden)
    selection = hidden[5:9] + graph.in_layer(0, ["mlp_channel"])[:3]
    zero_groups(model, selection)
    with torch.no_grad():
        masked = model(IDS).logits
    small = lorashear.compact(model, selection)
    with torch.no_grad():
        assert (small(IDS).logits - masked).abs().max().item() <= 1e-4
    assert small.config.hidden_size == 44


def test_unsupported_model_raises_clear_error() -> None:
    class Weird(torch.nn.Module):
        config = None

    with pytest.raises(lorashear.LorashearError, match="config"):
        lorashear.discover(Weird())


def test_compact_refuses_to_remove_every_head(tiny_llama) -> None:
    graph = lorashear.discover(tiny_llama)
    with pytest.raises(lorashear.LorashearError, match="every attention head"):
        lorashear.compact(tiny_llama, graph.in_layer(0, ["kv_group"]))


def _greedy(model, ids):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("family", ["llama", "qwen3", "phi3", "gemma2"])
@pytest.mark.parametrize("uniform", [True, False], ids=["uniform", "per_layer"])
def test_save_reload_round_trip(tmp_path, family: str, uniform: bool) -> None:
    from transformers import AutoModelForCausalLM

    model = with_lora(tiny_model(family))
    graph = lorashear.discover(model)
    if uniform:
        selection = [g for g in graph.prunable() if g.kind == "mlp_channel" and g.index < 8]
        selection += [g for g in graph.prunable() if g.kind == "attention_head" and g.index == 2]
    else:
        selection = [g for g in graph.prunable() if g.kind == "mlp_channel" and g.layer == 1 and g.index < 5]
        selection += [g for g in graph.prunable() if g.kind == "kv_group" and g.layer == 0 and g.index == 1]
    small = lorashear.compact(model, selection, merge_lora=True)
    ids = IDS[:, :6]
    with torch.no_grad():
        expected = small(IDS).logits
    lorashear.save_pretrained(small, tmp_path / "pruned")
    if uniform:
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned", dtype=torch.float32).eval()
        assert not reloaded.config.is_heterogeneous
    else:
        reloaded = lorashear.load_pretrained(tmp_path / "pruned").eval()
        assert reloaded.config.is_heterogeneous
    with torch.no_grad():
        assert (reloaded(IDS).logits - expected).abs().max().item() <= 1e-5
    assert torch.equal(_greedy(reloaded, ids), _greedy(small, ids))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in small.parameters())


def test_load_pretrained_accepts_plain_directory(tmp_path, tiny_llama) -> None:
    model = tiny_llama
    model.save_pretrained(tmp_path / "plain")
    again = lorashear.load_pretrained(tmp_path / "plain")
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_unhandled_operator_error_names_model_type_and_operator() -> None:
    from types import SimpleNamespace

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            h = torch.fft.fft(self.up(x)).real  # an operator with no channel rule
            return x + self.down(h)

    class Odd(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = SimpleNamespace(model_type="oddnet", num_hidden_layers=1, num_attention_heads=1,
                                          hidden_size=8, vocab_size=11)
            self.embed = torch.nn.Embedding(11, 8)
            self.layers = torch.nn.ModuleList([Block()])
            self.head = torch.nn.Linear(8, 11)

        def forward(self, input_ids, attention_mask=None, use_cache=False):
            h = self.embed(input_ids)
            for layer in self.layers:
                h = layer(h)
            return SimpleNamespace(logits=self.head(h))

    with pytest.raises(lorashear.LorashearError, match=r"oddnet.*fft"):
        lorashear.discover(Odd())
