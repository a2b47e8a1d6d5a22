"""Zero-invariance and exact compaction for every supported family, with and without LoRA."""

from __future__ import annotations

import random

import pytest
import torch

import lorashear
from lorashear.graph.groups import zero_groups
from tiny_models import tiny_model, with_lora

IDS = torch.tensor([[3, 17, 42, 8, 91, 5, 60, 33, 2, 77, 14]])


def _zero_then_remove(model, selection):
    """The logits of ``model`` with ``selection`` zeroed, and the model with it removed."""
    zero_groups(model, selection)
    with torch.no_grad():
        masked = model(IDS).logits
    return masked, lorashear.compact(model, selection)


def _max_diff(model, logits) -> float:
    with torch.no_grad():
        return (model(IDS).logits - logits).abs().max().item()


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
    masked, small = _zero_then_remove(model, selection)
    n_after = sum(p.numel() for p in small.parameters())
    assert _max_diff(small, masked) <= 1e-5
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
    masked, small = _zero_then_remove(model, selection)
    assert _max_diff(small, masked) <= 1e-5
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
    masked, small = _zero_then_remove(model, selection)
    assert _max_diff(small, masked) <= 1e-4
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


# ----------------------------------------------------------------------------- reductions over channels

class _QNorm(torch.nn.Module):
    """Stands in for OLMo 2's ``q_norm`` (a norm over the whole q projection): ``fn(x, weight)``."""

    def __init__(self, weight: torch.nn.Parameter, fn) -> None:
        super().__init__()
        self.weight = weight
        self.fn = fn

    def forward(self, x):
        return self.fn(x, self.weight)


#: reductions over the q projection that couple every head: removing one is not zeroing it
_MIXING = {
    "layer_norm": lambda x, w: torch.nn.functional.layer_norm(x, (x.shape[-1],), w),
    "mean": lambda x, w: (x - x.mean(-1, keepdim=True)) * w,
    "std": lambda x, w: x / x.std(-1, keepdim=True) * w,
    "softmax": lambda x, w: x * torch.softmax(x, -1) * w,
    "logsumexp": lambda x, w: (x - torch.logsumexp(x, -1, keepdim=True)) * w,
    "sum": lambda x, w: x / (1 + x.exp().sum(-1, keepdim=True)) * w,  # exp(0) = 1: zeroed channels still count
}
#: reductions that removal keeps exact: a sum of zeros, RMS norms (their scale rescaled by sqrt(n / n_kept))
_EXACT = {
    "sum of squares": lambda x, w: x * torch.rsqrt(1 + x.pow(2).sum(-1, keepdim=True)) * w,
    "rms_norm": lambda x, w: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, 1e-12),
    "rms with offset": lambda x, w: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-12) * (1.0 + w),
}


def _olmo2_with_q_norm(fn):
    model = tiny_model("olmo2")
    for layer in model.model.layers:
        layer.self_attn.q_norm = _QNorm(layer.self_attn.q_norm.weight, fn)
    return model


@pytest.mark.parametrize("op", sorted(_MIXING))
def test_reduction_mixing_head_channels_makes_heads_unprunable(op: str, caplog) -> None:
    model = _olmo2_with_q_norm(_MIXING[op])
    with caplog.at_level("WARNING", logger="lorashear.graph.discover"):
        graph = lorashear.discover(model)
    heads = graph.by_kind("attention_head") + graph.by_kind("kv_group")
    assert heads and not any(g.prunable for g in heads)
    assert all(any(f"'{op}'" in r for r in g.meta["reasons"]) for g in heads)
    assert any(f"'{op}'" in r.getMessage() and "not prunable" in r.getMessage() for r in caplog.records)
    assert all(g.prunable for g in graph.by_kind("mlp_channel"))


@pytest.mark.parametrize("op", sorted(_EXACT))
def test_reduction_kept_exact_on_removal(op: str) -> None:
    model = _olmo2_with_q_norm(_EXACT[op])
    graph = lorashear.discover(model)
    selection = [graph.in_layer(0, ["kv_group"])[1], graph.in_layer(1, ["attention_head"])[0]]
    assert all(g.prunable for g in selection)
    masked, small = _zero_then_remove(model, selection)
    assert _max_diff(small, masked) <= 1e-5


def test_rms_rescale_is_exact_up_to_eps() -> None:
    """OLMo 2 with its real eps: removing a KV group multiplies q_norm and k_norm weights by sqrt(n / n_kept);
    the result is the masked model with those norms' eps multiplied by n_kept / n (exact up to eps)."""
    import copy

    model = tiny_model("olmo2", rms_norm_eps=1e-5)
    graph = lorashear.discover(model)
    group = graph.in_layer(0, ["kv_group"])[1]
    attn = "model.layers.0.self_attn."
    assert {s.name for s in group.rms_scales} == {attn + "q_norm.weight", attn + "k_norm.weight"}
    zero_groups(model, [group])
    eps_scaled = copy.deepcopy(model)
    for norm in (eps_scaled.model.layers[0].self_attn.q_norm, eps_scaled.model.layers[0].self_attn.k_norm):
        norm.variance_epsilon *= 0.5  # q: 24 of 48 channels kept, k: 8 of 16
    q_before = model.model.layers[0].self_attn.q_norm.weight.detach().clone()
    small = lorashear.compact(model, [group])
    kept = [i for i in range(48) if i not in group.slices[0].indices]
    torch.testing.assert_close(small.model.layers[0].self_attn.q_norm.weight.detach(), q_before[kept] * 2 ** 0.5)
    with torch.no_grad():
        assert _max_diff(small, eps_scaled(IDS).logits) <= 1e-5


def test_family_without_adapter_is_self_checked(monkeypatch) -> None:
    """OLMo 2 has no dedicated adapter: discovery first checks zero-invariance on a tiny copy, and refuses
    in one line naming the family and the group kind when removal differs from zeroing."""
    from lorashear import compaction
    from lorashear.errors import ConfigError
    from lorashear.graph import selfcheck
    from lorashear.models.adapters import adapter_for
    from tiny_models import tiny_config

    assert not adapter_for(tiny_config("olmo2")).dedicated and adapter_for(tiny_config("llama")).dedicated
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(compaction, "_rescale_rms_scales", lambda *args: None)  # the compensation forgotten
    with pytest.raises(ConfigError, match=r"^model type 'olmo2' .*removing (kv_group|attention_head) groups") as err:
        lorashear.discover(tiny_model("olmo2"))
    assert "\n" not in str(err.value)
    lorashear.discover(tiny_model("llama"))  # a dedicated adapter: no self-check


def test_self_check_skips_a_config_it_cannot_shrink(caplog) -> None:
    from types import SimpleNamespace

    from lorashear.graph.selfcheck import check_zero_invariance

    model = torch.nn.Linear(2, 2)
    model.config = SimpleNamespace(model_type="oddnet")
    with caplog.at_level("WARNING", logger="lorashear.graph.selfcheck"):
        check_zero_invariance(model, lorashear.discover)
    assert "no zero-invariance self-check" in caplog.text
