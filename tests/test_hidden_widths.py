"""Pruned residual widths the family's config accepts: LLaMA's config wants a multiple of its attention heads."""

from __future__ import annotations

import json

import pytest
from test_lhspg import random_batches
from test_prune import _stage_cfg
from tiny_models import tiny_config, tiny_model

import lorashear
from lorashear.lhspg.targets import kind_multiple
from lorashear.models.widths import hidden_size_multiple
from lorashear.stages import prune as prune_stage


@pytest.mark.parametrize(("family", "multiple"), [("llama", 6), ("qwen3", 1)])
def test_the_config_class_says_which_hidden_sizes_it_accepts(family, multiple):
    config = tiny_config(family)  # 48 channels, 6 attention heads
    assert config.hidden_size == 48 and config.num_attention_heads == 6
    assert hidden_size_multiple(config) == multiple


def test_the_residual_width_rounds_to_round_to_and_the_config_multiple():
    assert kind_multiple("hidden_channel", 1, 6) == 6
    assert kind_multiple("hidden_channel", 32, 9) == 288
    assert kind_multiple("mlp_channel", 32, 9) == 32
    assert kind_multiple("attention_head", 32, 9) == 1


@pytest.mark.parametrize("compact_at", ["end", "period_end"])
def test_a_llama_with_pruned_hidden_channels_is_saved_and_loads(tmp_path, compact_at):
    """Before the rounding the tiny Llama kept 37 of 48 channels and transformers refused to save its config."""
    out = tmp_path / "p"
    cfg = _stage_cfg(out, steps=14, ratio=0.3, kinds=("mlp_channel", "hidden_channel"), compact_at=compact_at,
                     compact_min_gain=0.0)
    result = prune_stage.run(cfg, model=tiny_model("llama", train=False), data=random_batches(n=16, seq=16))
    saved = json.loads((out / "config.json").read_text())
    assert saved["hidden_size"] < 48 and saved["hidden_size"] % 6 == 0
    assert result.report["plan"]["hidden_multiple"] == 6
    model = lorashear.load_pretrained(out)
    assert model.config.hidden_size == saved["hidden_size"]


def test_a_config_that_accepts_no_other_hidden_size_is_refused_before_training(tmp_path, monkeypatch):
    import lorashear.models.widths as widths
    from lorashear.errors import ConfigError

    monkeypatch.setattr(widths, "hidden_size_multiple", lambda config: 0)
    out = tmp_path / "p"
    cfg = _stage_cfg(out, steps=14, ratio=0.3, kinds=("mlp_channel", "hidden_channel"))
    with pytest.raises(ConfigError, match="accepts no other hidden size.*drop hidden_channel"):
        prune_stage.run(cfg, model=tiny_model("llama", train=False), data=random_batches(n=16, seq=16))
    assert not out.exists()  # refused before anything was written
