"""Integration: the real offline reference model (SmolLM2-135M-Instruct)."""

from __future__ import annotations

import json

import pytest
import torch

import lorashear
from lorashear.models.reference import MANIFEST, REFERENCE_NUM_PARAMETERS, ensure_reference_model

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def reference():
    model = lorashear.load_model("smollm2-135m-instruct")
    tokenizer = lorashear.load_tokenizer("smollm2-135m-instruct")
    return model, tokenizer


def test_converted_copy_is_verified() -> None:
    path = ensure_reference_model()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["num_parameters"] == REFERENCE_NUM_PARAMETERS
    assert len(manifest["weights_sha256"]) == 64


def test_shape_facts(reference) -> None:
    model, tokenizer = reference
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) == REFERENCE_NUM_PARAMETERS
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert cfg.intermediate_size == 1536 and cfg.vocab_size == 49152 and cfg.tie_word_embeddings


def test_structures_per_layer(reference) -> None:
    model, _ = reference
    graph = lorashear.discover(model)
    for layer in range(30):
        slots = graph.in_layer(layer, ["attention_head"])
        assert len(slots) == 3 and all(len(s.slices[0].indices) == 3 * 64 for s in slots)
        assert len(graph.in_layer(layer, ["kv_group"])) == 3
        assert len(graph.in_layer(layer, ["mlp_channel"])) == 1536


def test_heldout_perplexity_in_range(reference) -> None:
    from lorashear.data import load_texts
    from lorashear.evaluation.perplexity import perplexity, token_stream

    model, tokenizer = reference
    stream = token_stream(load_texts("builtin:heldout"), tokenizer)
    result = perplexity(model, stream, seq_len=256, max_windows=6, source="builtin:heldout")
    # measured 2026-11-24: about 18 on 32 windows of 512; short windows see less context
    assert 8.0 < result.perplexity < 40.0, result.protocol


def test_compaction_on_reference_matches_masking(reference) -> None:
    model, tokenizer = reference
    import copy

    model = copy.deepcopy(model)
    graph = lorashear.discover(model)
    gen = torch.Generator().manual_seed(0)
    mlp = [g for g in graph.prunable() if g.kind == "mlp_channel"]
    pick = torch.randperm(len(mlp), generator=gen)[:2000].tolist()
    selection = [mlp[i] for i in pick] + graph.in_layer(5, ["attention_head"])[:1] + graph.in_layer(20, ["kv_group"])[:1]
    ids = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt").input_ids
    lorashear.zero_groups(model, selection)
    with torch.no_grad():
        masked = model(ids).logits
    before = sum(p.numel() for p in model.parameters())
    small = lorashear.compact(model, selection)
    with torch.no_grad():
        assert (small(ids).logits - masked).abs().max().item() <= 1e-4
    assert before - sum(p.numel() for p in small.parameters()) == graph.removed_params(selection)


def test_recall_probe_dense_knows_its_facts(reference) -> None:
    """The probe's headroom: the dense reference model answers most questions (measured 30 / 48 on
    2026-12-05), so a pruned model's lost facts show, and every reply is recorded."""
    from lorashear.evaluation.recall import recall_probe

    model, tokenizer = reference
    result = recall_probe(model, tokenizer)
    assert result.chat_template and result.num_questions == len(result.replies) == 48
    assert 0.5 <= result.accuracy < 1.0, [r["reply"] for r in result.replies]
    paris = next(r for r in result.replies if "Japan" in r["question"])
    assert paris["correct"] and "Tokyo" in paris["reply"]
