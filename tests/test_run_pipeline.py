"""The main job: analyze -> prune -> eval as one recipe, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorashear.cli import main


@pytest.fixture()
def tiny_dir(tmp_path):
    from lorashear.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=256, tie_word_embeddings=True)
    path = tmp_path / "tiny"
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_run_pipeline_end_to_end(tiny_dir, tmp_path) -> None:
    out = tmp_path / "run"
    argv = ["-q", "run", str(tiny_dir), "--out", str(out), "--ratio", "0.005", "--steps", "12", "--seq-len", "32",
            "--batch-size", "2", "--analyze-sequences", "2", "--tasks", "none", "--no-speed"]
    assert main(argv) == 0
    knowledge = json.loads((out / "knowledge" / "knowledge.json").read_text())
    assert knowledge
    report = json.loads((out / "pruned" / "prune_report.json").read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert (out / "eval" / "report.md").is_file() and (out / "eval" / "eval.json").is_file()
    summary = json.loads((out / "run.json").read_text())
    assert set(summary["seconds"]) == {"analyze", "prune", "eval"}
    # a second run finds every stage's output and only re-evaluates
    assert main([*argv, "--stages", "analyze,prune"]) == 0
    assert set(json.loads((out / "run.json").read_text())["seconds"]) == set()


def test_run_rejects_unknown_stage(tmp_path, capsys) -> None:
    assert main(["run", "--stages", "prune,dance", "--out", str(tmp_path)]) == 2
    assert "dance" in capsys.readouterr().err
