"""The main job: analyze -> prune -> eval as one recipe through the stage functions, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lorashear.cli import main
from lorashear.config import config_from_dict
from lorashear.stages import pipeline
from tiny_models import tiny_model

pytestmark = pytest.mark.integration  # the reference model's tokenizer


@pytest.fixture()
def tiny_dir(tmp_path):
    from lorashear.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    path = tmp_path / "tiny"
    tiny_model("llama", vocab=len(tok), size="small", max_position_embeddings=256, tie_word_embeddings=True,
               vector_std=None, dtype=None).save_pretrained(path)
    tok.save_pretrained(path)
    return path


ARGS = ["--ratio", "0.005", "--steps", "12", "--seq-len", "32", "--batch-size", "2", "--analyze-num-sequences", "2",
        "--eval-tasks", "none", "--no-eval-speed", "--eval-ppl-seq-len", "32", "--eval-ppl-max-windows", "2",
        "--no-progress"]


def test_run_pipeline_end_to_end(tiny_dir, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    argv = ["-q", "run", str(tiny_dir), "--out", str(out), *ARGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"pruned model: {out / 'pruned'}" in printed and f"report: {out / 'eval' / 'report.md'}" in printed
    knowledge = json.loads((out / "knowledge" / "knowledge.json").read_text())
    assert knowledge["node_groups"] and any(n["unprunable"] for n in knowledge["node_groups"])
    report = json.loads((out / "pruned" / "prune_report.json").read_text())
    p = report["params"]
    assert p["after"] < p["before"] and abs(p["ratio_removed"] - 0.005) < 0.005
    assert report["settings"]["knowledge"] == str(out / "knowledge" / "knowledge.json")
    assert report["steps"] == 12
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    roles = {m["role"]: m for m in evaluation["models"]}
    assert set(roles) == {"baseline", "model"}
    assert roles["model"]["name"] == str(out / "pruned")
    for role in roles.values():
        assert role["perplexity"]["perplexity"] > 1 and not role["errors"]
    assert (out / "eval" / "report.md").read_text().count("|") > 10
    result = json.loads((out / pipeline.RESULT_FILE).read_text())
    assert set(result["seconds"]) == {"analyze", "prune", "eval"}
    assert result["model_dir"] == str(out / "pruned")
    # the saved config reproduces the run's settings when read back with --config
    saved = yaml.safe_load((out / pipeline.CONFIG_FILE).read_text())
    again = config_from_dict(pipeline.PipelineConfig, saved)
    assert again.target.ratio == 0.005 and again.train.steps == 12 and again.knowledge.num_sequences == 2
    # a second run finds every stage's output and skips it
    assert main([*argv, "--stages", "analyze,prune"]) == 0
    result = json.loads((out / pipeline.RESULT_FILE).read_text())
    assert result["seconds"] == {} and result["stages_skipped"] == ["analyze", "prune"]


def test_pipeline_from_python_in_five_lines(tiny_dir, tmp_path) -> None:
    from lorashear.stages.pipeline import PipelineConfig, run

    config = config_from_dict(PipelineConfig, {"model": str(tiny_dir), "out": str(tmp_path / "py"),
                                               "stages": ["prune"], "ratio": 0.005, "steps": 12, "seq_len": 32,
                                               "batch_size": 2, "progress": False})
    result = run(config)
    assert result.stages_run == ["prune"] and result.prune["params_after"] < result.prune["params_before"]


def test_run_rejects_unknown_stage(tmp_path, capsys) -> None:
    assert main(["run", "--stages", "prune,dance", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dance" in err[0]
    assert not (tmp_path / "x").exists()


def test_run_with_recovery_evaluates_the_recovered_model(tiny_dir, tmp_path) -> None:
    out = tmp_path / "rec"
    argv = ["-q", "run", str(tiny_dir), "--out", str(out), *ARGS, "--stages", "prune,recover,eval",
            "--recover-tokens", "128", "--recover-max-rounds", "1", "--recover-instruct-data", "none",
            "--recover-seq-len", "32", "--recover-val-sequences", "2", "--recover-min-paragraph-tokens", "8"]
    assert main(argv) == 0
    report = json.loads((out / "recovered" / "recover_report.json").read_text())
    assert report["stages"] and (out / "recovered" / "config.json").is_file()
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert {m["role"]: m["name"] for m in evaluation["models"]}["model"] == str(out / "recovered")
    result = json.loads((out / pipeline.RESULT_FILE).read_text())
    assert set(result["seconds"]) == {"prune", "recover", "eval"} and result["model_dir"] == str(out / "recovered")
