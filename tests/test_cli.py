"""The console script: subcommands listed, planned ones refuse honestly, bad input exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lorashear.cli import COMMANDS, main


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in ("run", "groups", "analyze", "prune", "recover", "eval"):
        assert name in out
    assert set(COMMANDS) >= {"run", "groups", "analyze", "prune", "recover", "eval"}


def test_planned_subcommand_says_not_implemented(capsys) -> None:
    assert main(["recover", "smollm2-135m-instruct"]) == 2
    err = capsys.readouterr().err
    assert "not implemented yet" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["groups", "./no/such/model/dir"],
    ["groups", "/tmp/definitely-missing-model-dir"],
])
def test_unknown_model_is_one_line_exit_2(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


def test_missing_data_file_is_one_line_exit_2(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "lorashear", "-q", "analyze", "smollm2-135m-instruct", "--data",
         str(tmp_path / "missing.txt"), "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if "error" in line]
    assert len(lines) == 1 and "missing.txt" in lines[0]


def test_module_entry_point_runs() -> None:
    proc = subprocess.run([sys.executable, "-m", "lorashear", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and "lorashear" in proc.stdout


def test_groups_json_and_table(tmp_path, capsys) -> None:
    import json

    from tiny_models import tiny_model

    tiny_model("qwen3").save_pretrained(tmp_path / "m")
    assert main(["-q", "groups", str(tmp_path / "m"), "--json", "--lora-rank", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model_type"] == "qwen3" and data["lora"] is True
    kinds = {g["kind"] for g in data["groups"]}
    assert kinds == {"attention_head", "kv_group", "mlp_channel"}
    mlp = next(g for g in data["groups"] if g["kind"] == "mlp_channel")
    assert any("lora_B" in s[0] for s in mlp["slices"]) and mlp["layer"] == 0
    assert main(["-q", "groups", str(tmp_path / "m"), "--per-layer"]) == 0
    table = capsys.readouterr().out
    assert "mlp_channel" in table and "query-head slots" in table
