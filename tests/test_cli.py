"""The console script: subcommands listed, planned ones refuse honestly, bad input exits 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from lorashear import __version__
from lorashear.cli import COMMANDS, main
from tiny_models import tiny_model

STAGES = ("run", "groups", "analyze", "prune", "recover", "eval")


def _help_rows(text: str) -> list[str]:
    """The subcommand names listed under COMMAND in a ``--help`` text, in order."""
    return re.findall(r"^ {4}([a-z][\w-]*)(?: {2,}|$)", text, flags=re.MULTILINE)


def test_help_lists_every_subcommand(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: lorashear ")
    assert _help_rows(out) == list(COMMANDS)  # every registered subcommand is listed, in order
    assert set(STAGES) <= set(COMMANDS)
    for name in COMMANDS:  # and each one parses its own --help
        with pytest.raises(SystemExit) as sub:
            main([name, "--help"])
        assert sub.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: lorashear {name} ")


def test_no_subcommand_prints_help_and_exits_2(capsys) -> None:
    assert main([]) == 2
    assert _help_rows(capsys.readouterr().out) == list(COMMANDS)


def test_unknown_subcommand_is_an_argparse_error(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["dance"])
    assert exc.value.code == 2
    assert "invalid choice: 'dance'" in capsys.readouterr().err


def test_recover_without_teacher_is_one_line_exit_2(tmp_path, capsys) -> None:
    assert main(["recover", "smollm2-135m-instruct", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--teacher" in err[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [
    ["groups", "./no/such/model/dir"],
    ["groups", "/tmp/definitely-missing-model-dir"],
])
def test_unknown_model_is_one_line_exit_2(argv, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error:" in err[0]


@pytest.mark.integration  # analyze loads the reference tokenizer before it reads --data
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
    assert proc.returncode == 0 and proc.stdout.strip() == f"lorashear {__version__}"


def test_groups_json_and_table(tmp_path, capsys) -> None:
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
