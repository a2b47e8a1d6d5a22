"""Hardening (issue 13): every failure a user can cause ends with exit code 2 and one line on stderr
(``lorashear <cmd>: error: ...``, saying what to do), no traceback, and nothing left behind (or the
previous result intact); outputs are written atomically and locked; a killed prune resumes to the
same model, bit for bit.

The CLI cases run in-process on tiny models (the reference model's tokenizer, no weights of it);
cases that must fail before any model loads patch the loaders to fail the test if called.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lorashear.atomic import atomic_directory, output_lock
from lorashear.cli import main
from lorashear.errors import ConfigError
from lorashear.recipes import DEFAULT_RECIPE, PIPELINE_RECIPES
from tiny_models import tiny_model

#: a prune run small enough for a test: about 1% of a tiny model, a few steps
PRUNE = ["--ratio", "0.005", "--steps", "6", "--num-periods", "2", "--seq-len", "32", "--num-sequences", "8",
         "--batch-size", "2", "--lora-r", "4", "--no-progress"]
#: the checkpoint-damage cases keep the masked model to the end, so all checkpoints sit in OUT/checkpoints (the
#: default compacts when pruning ends and writes the later ones to OUT/checkpoints/compacted: same reader)
PRUNE_MASKED = [*PRUNE, "--compact-at", "end"]


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenizer():
    from lorashear.models.loading import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m-instruct")
    except Exception as exc:  # pragma: no cover - the reference model is set up by scripts/setup.sh
        pytest.skip(f"reference tokenizer unavailable: {exc}")


#: a tiny model as the test fixtures save it
SMALL = dict(size="small", tie_word_embeddings=True, vector_std=None, dtype=None)


def _spoil_model(source: Path, target: Path, name: str) -> None:
    """A copy of the model directory ``source`` damaged the way ``name`` says."""
    shutil.copytree(source, target)
    config = target / "config.json"
    if name == "emptycfg":
        config.write_text("{}")
    elif name == "mismatch":  # a config that is not the one saved with the weights
        data = json.loads(config.read_text())
        data.update(hidden_size=64, head_dim=16)
        config.write_text(json.dumps(data))
    elif name == "truncated":
        _truncate(target / "model.safetensors")
    elif name == "pickle":  # the weights only as a pickle: never loaded
        from safetensors.torch import load_file

        torch.save(load_file(str(target / "model.safetensors")), target / "pytorch_model.bin")
        (target / "model.safetensors").unlink()
    elif name == "wstok":  # a BPE tokenizer that splits on whitespace, not byte-level: GGUF export refuses it
        tok = json.loads((target / "tokenizer.json").read_text())
        tok["pre_tokenizer"] = {"type": "Whitespace"}
        (target / "tokenizer.json").write_text(json.dumps(tok))


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Model directories: ``tiny`` (a causal LM with its tokenizer), ``notok`` (no tokenizer), ``bigtok``
    (a tokenizer larger than the embedding), ``bert`` (an encoder, with a tokenizer), ``othervocab`` (a
    larger vocabulary than ``tiny``'s), and copies of ``tiny`` spoilt as :func:`_spoil_model` says."""
    from transformers import BertConfig, BertModel

    root = tmp_path_factory.mktemp("models")
    dirs = {name: root / name for name in ("tiny", "notok", "bigtok", "bert", "othervocab")}
    tiny_model("llama", vocab=len(tokenizer), **SMALL).save_pretrained(dirs["tiny"])
    tokenizer.save_pretrained(dirs["tiny"])
    tiny_model("llama", vocab=len(tokenizer), **SMALL).save_pretrained(dirs["notok"])
    tiny_model("llama", vocab=96, **SMALL).save_pretrained(dirs["bigtok"])
    tokenizer.save_pretrained(dirs["bigtok"])
    tiny_model("llama", vocab=len(tokenizer) + 64, **SMALL).save_pretrained(dirs["othervocab"])
    tokenizer.save_pretrained(dirs["othervocab"])
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=len(tokenizer))).save_pretrained(dirs["bert"])
    tokenizer.save_pretrained(dirs["bert"])
    for name in ("emptycfg", "mismatch", "truncated", "pickle", "wstok"):
        dirs[name] = root / name
        _spoil_model(dirs["tiny"], dirs[name], name)
    return dirs


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if a model or tokenizer is loaded: the case must fail before any work."""
    from lorashear.models import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the error")

    for name in ("load_model", "load_pretrained", "load_tokenizer"):
        monkeypatch.setattr(loading, name, refuse)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones included) with its bytes (``None`` for directories)."""
    return {str(p.relative_to(root)): (None if p.is_dir() else p.read_bytes()) for p in sorted(root.rglob("*"))}


def cli(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["-q", *map(str, argv)])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return code, lines


def assert_one_line(code: int, lines: list[str], command: str, *fragments: str) -> str:
    assert code == 2, lines
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith(f"lorashear {command}: error: ") and "Traceback" not in line, line
    for fragment in fragments:
        assert fragment in line, (fragment, line)
    return line


# ------------------------------------------------------------------ 2. --out checked before any work
#: command -> its argv for the tiny model and a given --out
STAGE_ARGV = {
    "analyze": lambda m, out: ["analyze", m["tiny"], "--out", out],
    "prune": lambda m, out: ["prune", m["tiny"], "--out", out, "--ratio", "0.1"],
    "eval": lambda m, out: ["eval", m["tiny"], "--out", out, "--tasks", "none", "--no-speed"],
    "recover": lambda m, out: ["recover", m["tiny"], "--teacher", m["tiny"], "--out", out],
    "run": lambda m, out: ["run", m["tiny"], "--out", out, "--eval-tasks", "none"],
}


def _out_is_file(tmp: Path, monkeypatch) -> tuple[Path, tuple[str, ...]]:
    (tmp / "result").write_text("my notes\n")
    return tmp / "result", ("is a file", "give a directory")


def _out_under_file(tmp: Path, monkeypatch) -> tuple[Path, tuple[str, ...]]:
    (tmp / "result").write_text("my notes\n")
    return tmp / "result" / "sub", ("is a file, not a directory",)


def _out_holds_other_files(tmp: Path, monkeypatch) -> tuple[Path, tuple[str, ...]]:
    (tmp / "mine").mkdir()
    (tmp / "mine" / "thesis.tex").write_text("do not delete\n")
    return tmp / "mine", ("already holds other files (thesis.tex)", "choose a new or empty")


def _out_read_only(tmp: Path, monkeypatch) -> tuple[Path, tuple[str, ...]]:
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    if os.geteuid() == 0:  # root may write anyway: make os.access say what it says to everyone else
        access = os.access

        def no_write(path, mode, *args, **kwargs):
            if mode & os.W_OK and Path(path).resolve() == ro.resolve():
                return False
            return access(path, mode, *args, **kwargs)

        monkeypatch.setattr(os, "access", no_write)
    return ro / "out", ("cannot be written", "is not writable", "choose another --out")


def _out_is_the_current_directory(tmp: Path, monkeypatch) -> tuple[Path, tuple[str, ...]]:
    monkeypatch.chdir(tmp)
    return Path("."), ("is the current directory", "give a subdirectory")


OUT_CASES = {"file": _out_is_file, "under-file": _out_under_file, "foreign": _out_holds_other_files,
             "read-only": _out_read_only, "cwd": _out_is_the_current_directory}


@pytest.mark.parametrize("case", list(OUT_CASES))
@pytest.mark.parametrize("command", list(STAGE_ARGV))
def test_unusable_out_fails_before_any_work(command, case, models, tmp_path, capsys, no_loading, monkeypatch):
    if case in ("foreign", "cwd") and command == "run":
        pytest.skip("the pipeline writes beside what is in its directory; its stages check their own")
    out, fragments = OUT_CASES[case](tmp_path, monkeypatch)
    before = snapshot(tmp_path)
    try:
        code, lines = cli(capsys, *STAGE_ARGV[command](models, out))
        assert_one_line(code, lines, command, *fragments)
        assert snapshot(tmp_path) == before
    finally:
        for p in tmp_path.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)


@pytest.mark.parametrize("command", list(STAGE_ARGV))
def test_a_second_run_into_the_same_out_fails_at_once(command, models, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    with output_lock(out):  # another run holds it
        before = snapshot(tmp_path)
        code, lines = cli(capsys, *STAGE_ARGV[command](models, out))
        assert_one_line(code, lines, command, "another lorashear run", f"(process {os.getpid()})",
                        "wait for it to finish or choose another --out")
        assert snapshot(tmp_path) == before
    assert list(tmp_path.iterdir()) == []  # the lock file goes with the lock


#: the directory each stage writes in a run directory
RUN_SUBDIR = {"analyze": "knowledge", "prune": "pruned", "eval": "eval", "recover": "recovered"}


@pytest.mark.parametrize("command", list(RUN_SUBDIR))
def test_a_stage_inside_a_running_run_directory_fails_at_once(command, models, tmp_path, capsys, no_loading):
    run = tmp_path / "run"
    with output_lock(run):  # a `lorashear run` (another process) holds its directory
        before = snapshot(tmp_path)
        code, lines = cli(capsys, *STAGE_ARGV[command](models, run / RUN_SUBDIR[command]))
        assert_one_line(code, lines, command, f"lies inside {run}, which another lorashear run",
                        f"(process {os.getpid()})", "choose an --out outside it")
        assert snapshot(tmp_path) == before


def test_a_run_fails_at_once_while_a_stage_writes_inside_its_directory(models, tmp_path, capsys, no_loading):
    run = tmp_path / "run"
    with output_lock(run / "pruned"):  # a `lorashear prune --out RUN/pruned` (another process)
        before = snapshot(tmp_path)
        code, lines = cli(capsys, *STAGE_ARGV["run"](models, run))
        assert_one_line(code, lines, "run", f"is writing {run / 'pruned'}, inside {run}")
        assert snapshot(tmp_path) == before


# ------------------------------------------------------------ 2./3. settings and inputs checked first
def _ppl(tmp: Path, kind: str) -> Path:
    path = tmp / f"ppl-{kind}.txt"
    if kind == "empty":
        path.write_text("\n\n  \n")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "nul":
        path.write_bytes(b"looks like text\x00\x00\x00\x01\x02 but is not")
    return path


#: id -> (argv builder, command, fragments of the one line)
EARLY_CASES = {
    "run-steps-0": (lambda m, t: ["run", m["tiny"], "--out", t / "run", "--steps", "0"], "run",
                    ("steps must be >= 1",)),
    "run-steps-too-few-for-the-schedule": (lambda m, t: ["run", m["tiny"], "--out", t / "run", "--steps", "5"],
                                           "run", ("too few for 10 pruning periods", "raise --steps")),
    "run-unknown-task": (lambda m, t: ["run", m["tiny"], "--out", t / "run", "--eval-tasks", "lorashear_bb_nope"],
                         "run", ("unknown task 'lorashear_bb_nope'", "use lorashear_bigbench")),
    "eval-unknown-task": (lambda m, t: ["eval", m["tiny"], "--out", t / "ev", "--tasks",
                                        "lorashear_bb_winowhy,lorashear_bb_nope", "--no-speed"], "eval",
                          ("unknown task 'lorashear_bb_nope'", "use lorashear_bigbench")),
    "eval-unknown-suite-name": (lambda m, t: ["eval", m["tiny"], "--out", t / "ev", "--tasks", "lorashear_bigbnech"],
                                "eval", ("unknown task 'lorashear_bigbnech'",)),
    "prune-schedule": (lambda m, t: ["prune", m["tiny"], "--out", t / "p", "--ratio", "0.1", "--steps", "8",
                                     "--warmup-steps", "4", "--period-steps", "3", "--num-periods", "2"], "prune",
                       ("pruning ends at step 10 but only 8 steps", "raise --steps")),
    "bert-groups": (lambda m, t: ["groups", m["bert"]], "groups", ("not a causal", "bidirectional encoder",
                                                                   "lorashear prunes causal LMs")),
    "bert-analyze": (lambda m, t: ["analyze", m["bert"], "--out", t / "a"], "analyze", ("not a causal",)),
    "bert-prune": (lambda m, t: ["prune", m["bert"], "--out", t / "p", "--ratio", "0.1"], "prune", ("not a causal",)),
    "bert-eval": (lambda m, t: ["eval", m["bert"], "--out", t / "e", "--tasks", "none"], "eval", ("not a causal",)),
    "bert-eval-baseline": (lambda m, t: ["eval", m["tiny"], "--baseline", m["bert"], "--out", t / "e", "--tasks",
                                         "none"], "eval", ("bert", "not a causal")),
    "bert-recover": (lambda m, t: ["recover", m["tiny"], "--teacher", m["bert"], "--out", t / "r"], "recover",
                     ("not a causal",)),
}


#: a ``lorashear run`` small enough for a test (the tiny model allows about 1%; a checkpoint every step)
RUN_ARGS = ["--ratio", "0.005", "--steps", "6", "--num-periods", "2", "--seq-len", "32", "--num-sequences", "8",
            "--batch-size", "2", "--lora-r", "4", "--analyze-num-sequences", "2", "--eval-tasks", "none",
            "--no-eval-speed", "--eval-ppl-seq-len", "32", "--eval-ppl-max-windows", "2", "--no-progress",
            "--checkpoint-every", "1"]


def _run(m, t, *more, model="tiny") -> list:
    return ["run", m[model], "--out", t / "run", *RUN_ARGS, *more]


def _file(t: Path, name: str = "notes.txt") -> Path:
    (t / name).write_text("my notes\n")
    return t / name


def _foreign_eval_dir(t: Path) -> Path:
    (t / "run" / "eval").mkdir(parents=True)
    (t / "run" / "eval" / "notes.txt").write_text("mine\n")
    return t / "run"


#: issue 25: what `lorashear run` and the stages must refuse before any model loads (model directories that
#: cannot make the model they describe, unreachable ratios, unusable teachers, tasks and outputs, and every
#: check of a later stage, which `run` makes before its first stage starts)
EARLY_CASES.update({
    "config-empty-prune": (lambda m, t: ["prune", m["emptycfg"], "--out", t / "p", "--ratio", "0.1"], "prune",
                           ("config.json names no model_type",)),
    "config-mismatch-eval": (lambda m, t: ["eval", m["mismatch"], "--out", t / "e", "--tasks", "none"], "eval",
                             ("the weights do not match config.json", "[49152, 32] in the weights but [49152, 64]")),
    "truncated-analyze": (lambda m, t: ["analyze", m["truncated"], "--out", t / "a"], "analyze",
                          ("model.safetensors is truncated or damaged", "copy or save the model again")),
    "truncated-export": (lambda m, t: ["export", m["truncated"], "--out", t / "m.gguf"], "export",
                         ("model.safetensors is truncated or damaged",)),
    "pickle-eval": (lambda m, t: ["eval", m["pickle"], "--out", t / "e", "--tasks", "none"], "eval",
                    ("only as a pickle (pytorch_model.bin)", "never loads", "convert them to safetensors")),
    "pickle-run": (lambda m, t: _run(m, t, model="pickle"), "run", ("only as a pickle",)),
    "config-empty-recover-teacher": (lambda m, t: ["recover", m["tiny"], "--teacher", m["emptycfg"], "--out",
                                                   t / "r"], "recover", ("names no model_type",)),
    "eval-registry-task-offline": (lambda m, t: ["eval", m["tiny"], "--out", t / "e", "--tasks", "hellaswag",
                                                 "--no-speed", "--ppl-source", "none"], "eval",
                                   ("task 'hellaswag' cannot load its data", "lorashear_zeroshot")),
    "recover-teacher-other-vocabulary": (lambda m, t: ["recover", m["tiny"], "--teacher", m["othervocab"], "--out",
                                                       t / "r"], "recover",
                                         ("has 49,216 token embeddings", "49,152",
                                          "give the dense model the pruned one came from")),
    "recover-teacher-smaller-than-the-tokenizer": (lambda m, t: ["recover", m["tiny"], "--teacher", m["bigtok"],
                                                                 "--out", t / "r"], "recover",
                                                   ("has 96 token embeddings",)),
    "export-out-under-a-file": (lambda m, t: ["export", m["tiny"], "--out", _file(t) / "m.gguf"], "export",
                                ("notes.txt is a file, not a directory",)),
    "run-ratio-unreachable": (lambda m, t: _run(m, t, "--ratio", "0.99"), "run",
                              ("ratio 0.99 is unreachable", "choose --ratio")),
    "run-attention-ratio-unreachable": (lambda m, t: _run(m, t, "--attention-ratio", "0.99"), "run",
                                        ("attention ratio 0.99 is unreachable: at most 0.5000",
                                         "choose --attention-ratio 0.5 or less")),
    "run-mlp-ratio-unreachable": (lambda m, t: _run(m, t, "--ratio", "0.001", "--mlp-ratio", "0.995"), "run",
                                  ("mlp ratio 0.995 is unreachable",)),
    "run-data-missing": (lambda m, t: _run(m, t, "--data", t / "missing.txt"), "run",
                         ("missing.txt does not exist",)),
    "run-ppl-source-binary": (lambda m, t: _run(m, t, "--eval-ppl-source", _ppl(t, "binary")), "run",
                              ("is not UTF-8 text",)),
    "run-recover-data-missing": (lambda m, t: _run(m, t, "--stages", "prune,recover,eval", "--recover-data",
                                                   t / "missing.txt"), "run", ("missing.txt does not exist",)),
    "run-export-tokenizer": (lambda m, t: _run(m, t, "--export", "gguf", model="wstok"), "run",
                             ("byte-level BPE", "Whitespace")),
    "run-foreign-files-in-eval": (lambda m, t: ["run", m["tiny"], "--out", _foreign_eval_dir(t), *RUN_ARGS], "run",
                                  ("eval already holds other files (notes.txt)",)),
})


@pytest.mark.parametrize("case", list(EARLY_CASES))
def test_bad_settings_and_models_fail_before_any_work(case, models, tmp_path, capsys, no_loading):
    build, command, fragments = EARLY_CASES[case]
    argv = build(models, tmp_path)
    before = snapshot(tmp_path)
    code, lines = cli(capsys, *argv)
    assert_one_line(code, lines, command, *fragments)
    assert snapshot(tmp_path) == before


#: cases that load a model or tokenizer first: id -> (argv builder, command, fragments)
INPUT_CASES = {
    "ppl-missing": (lambda m, t: ["eval", m["tiny"], "--out", t / "e", "--tasks", "none", "--no-speed",
                                  "--ppl-source", t / "missing.txt"], "eval", ("missing.txt does not exist",)),
    "ppl-empty": (lambda m, t: ["eval", m["tiny"], "--out", t / "e", "--tasks", "none", "--no-speed",
                                "--ppl-source", _ppl(t, "empty")], "eval", ("produced no text",)),
    "ppl-binary": (lambda m, t: ["eval", m["tiny"], "--out", t / "e", "--tasks", "none", "--no-speed",
                                 "--ppl-source", _ppl(t, "binary")], "eval", ("is not UTF-8 text", "binary")),
    "ppl-nul-bytes": (lambda m, t: ["eval", m["tiny"], "--out", t / "e", "--tasks", "none", "--no-speed",
                                    "--ppl-source", _ppl(t, "nul")], "eval", ("looks like a binary file",)),
    "no-tokenizer-eval": (lambda m, t: ["eval", m["notok"], "--out", t / "e", "--tasks", "none", "--no-speed",
                                        "--ppl-source", "none"], "eval", ("has no tokenizer", "save the tokenizer")),
    "no-tokenizer-prune": (lambda m, t: ["prune", m["notok"], "--out", t / "p", *PRUNE], "prune",
                           ("has no tokenizer",)),
    "no-tokenizer-analyze": (lambda m, t: ["analyze", m["notok"], "--out", t / "a"], "analyze",
                             ("has no tokenizer",)),
    "tokenizer-too-large-eval": (lambda m, t: ["eval", m["bigtok"], "--out", t / "e", "--tasks", "none",
                                               "--no-speed", "--ppl-source", "none"], "eval",
                                 ("has 49,152 tokens but the model's embedding has only 96 rows",
                                  "use the tokenizer the model was trained with")),
    "tokenizer-too-large-prune": (lambda m, t: ["prune", m["bigtok"], "--out", t / "p", *PRUNE], "prune",
                                  ("49,152 tokens", "96 rows")),
    "tokenizer-too-large-analyze": (lambda m, t: ["analyze", m["bigtok"], "--out", t / "a", "--num-sequences",
                                                  "2", "--seq-len", "32"], "analyze", ("49,152 tokens",)),
    "ratio-unreachable": (lambda m, t: ["prune", m["tiny"], "--out", t / "p", *PRUNE, "--ratio", "0.99"], "prune",
                          ("ratio 0.99 is unreachable: at most 0.0", "choose --ratio")),
    "attention-ratio-unreachable": (lambda m, t: ["prune", m["tiny"], "--out", t / "p", *PRUNE, "--attention-ratio",
                                                  "0.99"], "prune",
                                    ("attention ratio 0.99 is unreachable: at most 0.5000 of the attention",
                                     "choose --attention-ratio 0.5 or less")),
}


@pytest.mark.parametrize("case", list(INPUT_CASES))
def test_bad_inputs_fail_with_one_line_and_leave_nothing(case, models, tmp_path, capsys):
    build, command, fragments = INPUT_CASES[case]
    argv = build(models, tmp_path)
    before = snapshot(tmp_path)
    code, lines = cli(capsys, *argv)
    assert_one_line(code, lines, command, *fragments)
    assert snapshot(tmp_path) == before


def test_a_failed_run_leaves_the_previous_result_intact(models, tmp_path, capsys):
    out = tmp_path / "p"
    assert main(["-q", "prune", str(models["tiny"]), "--out", str(out), *PRUNE]) == 0
    capsys.readouterr()
    before = snapshot(tmp_path)
    code, lines = cli(capsys, "prune", models["tiny"], "--out", out, *PRUNE, "--ratio", "0.99")
    assert_one_line(code, lines, "prune", "unreachable")
    assert snapshot(tmp_path) == before
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in [out, *out.iterdir()]}
    umask = os.umask(0)
    os.umask(umask)
    assert modes == {name: (0o777 if name == "p" else 0o666) & ~umask for name in modes}, modes


# ------------------------------------------------------------------------- 4. corrupt checkpoints
@pytest.fixture(scope="module")
def interrupted(models, tmp_path_factory) -> Path:
    """A prune stopped after step 4 of 6 with checkpoints at steps 3 and 4 (``--keep-checkpoints 2``)."""
    from lorashear.cli import build_parser
    from lorashear.commands._stage import stage_config
    from lorashear.stages import prune as prune_stage
    from lorashear.stages.prune import PruneConfig

    out = tmp_path_factory.mktemp("interrupted") / "p"
    args = build_parser().parse_args(["prune", str(models["tiny"]), "--out", str(out), *PRUNE_MASKED,
                                      "--checkpoint-every", "1", "--keep-checkpoints", "2"])
    config = stage_config(PruneConfig, args, model=args.model, out=args.out)
    assert prune_stage.run(config, stop_after=4) is None
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    return out


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_json(edit):
    """Rewrite a JSON file as valid JSON with the wrong content."""
    def spoil(path: Path) -> None:
        data = json.loads(path.read_text())
        path.write_text(json.dumps(edit(data)))
    return spoil


def _without(key: str):
    def edit(data: dict) -> dict:
        data.pop(key)
        return data
    return edit


def _emptied_parts(data: dict) -> dict:
    data["parts"] = {}
    return data


def _cut_rng(data: dict) -> dict:
    data["torch"] = data["torch"][:100]
    return data


DAMAGE = {
    "truncated-params": ("params.safetensors", _truncate, "params.safetensors is corrupt or truncated"),
    "bad-state-json": ("state.json", lambda p: p.write_text('{"step": 4, "run_sett'), "state.json is corrupt"),
    "missing-rng": ("rng_0.json", lambda p: p.unlink(), "rng_0.json is missing"),
    "missing-state-json": ("state.json", lambda p: p.unlink(), "state.json is missing"),
    # issue 25: valid JSON with the wrong content is as corrupt as a truncated file
    "rng-wrong-content": ("rng_0.json", lambda p: p.write_text('{"python": 5}'),
                          "rng_0.json is corrupt (not the RNG state of a run)"),
    "state-without-step": ("state.json", _edit_json(_without("step")), "state.json is corrupt (no step)"),
    "emptied-parts": ("state.json", _edit_json(_emptied_parts), "state.json is corrupt (no state for 'optimizer')"),
    "cut-rng-list": ("rng_0.json", _edit_json(_cut_rng), "rng_0.json is corrupt (not the RNG state of a run)"),
}
#: damage to a checkpoint that an earlier checkpoint makes up for
FALLBACK = ("truncated-params", "rng-wrong-content", "state-without-step", "emptied-parts", "cut-rng-list")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_corrupt_checkpoint_without_an_earlier_one_is_one_line(damage, models, interrupted, tmp_path, capsys):
    out = tmp_path / "p"
    shutil.copytree(interrupted, out)
    shutil.rmtree(out / "checkpoints" / "step-00000003")  # nothing to fall back to
    name, spoil, fragment = DAMAGE[damage]
    spoil(out / "checkpoints" / "step-00000004" / name)
    before = snapshot(tmp_path)
    code, lines = cli(capsys, "prune", models["tiny"], "--out", out, *PRUNE_MASKED, "--checkpoint-every", "1",
                      "--keep-checkpoints", "2", "--resume")
    assert_one_line(code, lines, "prune", fragment, "no usable checkpoint left", "--force")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage", FALLBACK)
def test_a_corrupt_checkpoint_falls_back_to_the_previous_one(damage, models, interrupted, tmp_path, capsys, caplog):
    out = tmp_path / "p"
    shutil.copytree(interrupted, out)
    name, spoil, fragment = DAMAGE[damage]
    spoil(out / "checkpoints" / "step-00000004" / name)
    argv = ["-q", "prune", str(models["tiny"]), "--out", str(out), *PRUNE_MASKED, "--checkpoint-every", "1",
            "--keep-checkpoints", "2", "--resume"]
    with caplog.at_level("WARNING", logger="lorashear"):
        assert main(argv) == 0
    assert f"step-00000004/{fragment}" in caplog.text
    assert "trying an earlier checkpoint" in caplog.text and "resuming from" in caplog.text
    report = json.loads((out / "prune_report.json").read_text())
    assert report["resumed_from"] == 3 and report["steps"] == 6
    assert not (out / "checkpoints").exists()


def test_a_checkpoint_of_another_run_is_still_refused(models, interrupted, tmp_path, capsys):
    out = tmp_path / "p"
    shutil.copytree(interrupted, out)
    code, lines = cli(capsys, "prune", models["tiny"], "--out", out, *PRUNE_MASKED, "--lr", "0.001",
                      "--checkpoint-every", "1", "--keep-checkpoints", "2", "--resume")
    assert_one_line(code, lines, "prune", "belongs to another run", "lr", "--force")


def test_a_standalone_prune_knows_its_model_by_content(models, tmp_path, capsys, monkeypatch):
    """The same model named another way resumes; other weights at the same path are another run."""
    from safetensors.torch import load_file, save_file

    model_dir = tmp_path / "m"
    shutil.copytree(models["tiny"], model_dir)
    out = tmp_path / "p"
    args = [*PRUNE_MASKED, "--checkpoint-every", "1", "--keep-checkpoints", "2"]
    from lorashear.cli import build_parser
    from lorashear.commands._stage import stage_config
    from lorashear.stages import prune as prune_stage
    from lorashear.stages.prune import PruneConfig

    parsed = build_parser().parse_args(["prune", str(model_dir), "--out", str(out), *args])
    assert prune_stage.run(stage_config(PruneConfig, parsed, model=parsed.model, out=parsed.out), stop_after=4) is None
    spare = tmp_path / "spare"
    shutil.copytree(out, spare)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "prune", "./m/", "--out", str(out), *args, "--resume"]) == 0  # another spelling: resumes
    assert json.loads((out / "prune_report.json").read_text())["resumed_from"] == 4
    shutil.rmtree(out)
    shutil.copytree(spare, out)
    weights = load_file(str(model_dir / "model.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(model_dir / "model.safetensors"))  # other weights
    code, lines = cli(capsys, "prune", model_dir, "--out", out, *args, "--resume")
    assert_one_line(code, lines, "prune", "belongs to another run", "model", "--force")


@pytest.mark.parametrize("damage", ["bad-state-json", "missing-state-json", "truncated-params", "state-without-step",
                                    "rng-wrong-content", "cut-rng-list"])
def test_a_corrupt_recover_checkpoint_is_one_line(damage, tmp_path):
    from lorashear.errors import CheckpointError
    from lorashear.stages.recover import _fresh_state, _load_round, _save_round

    model = tiny_model("llama", size="small")
    root = tmp_path / "checkpoints"
    _save_round(root, model, {**_fresh_state(), "round": 1}, {"lr": 0.1}, None)
    name, spoil, fragment = DAMAGE[damage]
    spoil(root / "step-00000001" / name)
    with pytest.raises(CheckpointError, match=re.escape(fragment)) as exc:
        _load_round(root, model, {"lr": 0.1}, lambda base, stage: pytest.fail("no LoRA was open"))
    assert "\n" not in str(exc.value) and str(exc.value).endswith("run without --resume to start over")


# ------------------------------------------------- issue 25: a run reuses a stage only when it matches
def _stop_prune_after(step: int):
    """The prune stage stopped after ``step`` steps, then Ctrl-C: its checkpoints stay, as after a kill."""
    from lorashear.stages import prune as prune_stage

    real = prune_stage.run

    def stopped(config, **kwargs):
        assert real(config, stop_after=step) is None
        raise KeyboardInterrupt
    return stopped


def _interrupt_a_run(model: Path, out: Path) -> None:
    from lorashear.stages import prune as prune_stage

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prune_stage, "run", _stop_prune_after(4))
        assert main(["-q", "run", str(model), "--out", str(out), *RUN_ARGS]) == 130


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[str, Path]:
    """``model`` (a copy of the tiny model), ``complete`` (a finished run of it) and ``interrupted`` (one stopped
    in its prune stage, with checkpoints)."""
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(models["tiny"], root / "model")
    assert main(["-q", "run", str(root / "model"), "--out", str(root / "complete"), *RUN_ARGS]) == 0
    _interrupt_a_run(root / "model", root / "interrupted")
    return {"model": root / "model", "complete": root / "complete", "interrupted": root / "interrupted"}


def _put_other_weights(model: Path) -> None:
    """Another model's weights (same config) saved over ``model``'s."""
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tiny_model("llama", vocab=vocab, seed=7, **SMALL).save_pretrained(model)


def _other_weights(model: Path, tmp: Path) -> Path:
    """A copy of ``model`` whose weights are another model's (same config, same path for every run after)."""
    copy = tmp / "model"
    shutil.copytree(model, copy)
    _put_other_weights(copy)
    return copy


#: a run into a finished or interrupted run directory with other settings, other weights at the model's path,
#: or from before the records (no ``records/prune.started.json``): id -> (which run, change, flags, fragments)
RERUN_CASES = {
    "other-ratio-finished": ("complete", None, ["--ratio", "0.008", "--no-rerun"],
                             ("prune: its output was made with other settings", "ratio: 0.005 -> 0.008",
                              "without --no-rerun")),
    "other-weights-finished": ("complete", "weights", ["--no-rerun"],
                               ("analyze: its output was made with other settings or inputs", "model: another input")),
    "other-lr-interrupted": ("interrupted", None, ["--lr", "0.001", "--no-rerun"],
                             ("prune: its checkpoints are of a run with other settings",
                              f"lr: {PIPELINE_RECIPES[DEFAULT_RECIPE]['lr']} -> 0.001")),
    "other-weights-interrupted": ("interrupted", "weights", ["--no-rerun"], ("model: another input",)),
    "refused-resume-keeps-config-yaml": ("interrupted", "no-record", ["--lr", "0.001"],
                                         ("belongs to another run", "start over with --force")),
}


@pytest.mark.parametrize("case", list(RERUN_CASES))
def test_a_run_with_other_settings_or_inputs_is_refused_with_no_rerun(case, runs, tmp_path, capsys):
    which, change, flags, fragments = RERUN_CASES[case]
    out = tmp_path / "run"
    shutil.copytree(runs[which], out)
    model = _other_weights(runs["model"], tmp_path) if change == "weights" else runs["model"]
    if change == "no-record":  # a run interrupted before this version wrote records
        (out / "records" / "prune.started.json").unlink(missing_ok=True)
    before = snapshot(tmp_path)
    code, lines = cli(capsys, "run", model, "--out", out, *RUN_ARGS, *flags)
    assert_one_line(code, lines, "run", *fragments)
    assert snapshot(tmp_path) == before  # config.yaml, records and results as they were


def test_a_run_with_another_ratio_re_runs_prune_and_what_follows(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["complete"], out)
    assert main(["-q", "run", str(runs["model"]), "--out", str(out), *RUN_ARGS, "--ratio", "0.008"]) == 0
    result = json.loads((out / "pipeline_result.json").read_text())
    assert result["stages_skipped"] == ["analyze"] and result["stages_run"] == ["prune", "eval"]
    params = json.loads((out / "pruned" / "prune_report.json").read_text())["params"]
    assert params["target_ratio"] == 0.008 and abs(params["ratio_removed"] - 0.008) < 0.002
    report = (out / "report.md").read_text()
    assert "| target ratio | `0.008` |" in report and f"({100 * params['ratio_removed']:.2f}%)" in report
    # the stage records now hold the new settings: the same run again reuses every stage
    assert main(["-q", "run", str(runs["model"]), "--out", str(out), *RUN_ARGS, "--ratio", "0.008"]) == 0
    assert json.loads((out / "pipeline_result.json").read_text())["stages_run"] == []


def test_other_weights_at_the_same_path_start_the_interrupted_run_over(runs, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(runs["interrupted"], out)
    model = _other_weights(runs["model"], tmp_path)
    assert main(["-q", "run", str(model), "--out", str(out), *RUN_ARGS, "--stages", "analyze,prune"]) == 0
    result = json.loads((out / "pipeline_result.json").read_text())
    assert result["stages_run"] == ["analyze", "prune"]
    assert json.loads((out / "pruned" / "prune_report.json").read_text())["resumed_from"] is None  # not mixed
    assert not (out / "records" / "prune.started.json").exists()


@pytest.mark.parametrize("spelling", ["./model/", "model/"])
def test_the_same_model_by_another_path_resumes_the_interrupted_run(spelling, models, tmp_path, capsys,
                                                                    monkeypatch):
    shutil.copytree(models["tiny"], tmp_path / "model")
    out = tmp_path / "run"
    _interrupt_a_run(tmp_path / "model", out)
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "run", spelling, "--out", str(out), *RUN_ARGS]) == 0
    result = json.loads((out / "pipeline_result.json").read_text())
    assert result["stages_skipped"] == ["analyze"] and result["stages_run"] == ["prune", "eval"]
    assert json.loads((out / "pruned" / "prune_report.json").read_text())["resumed_from"] == 4


def test_lorashear_prune_that_fails_early_leaves_nothing(models, tmp_path, no_loading):
    import lorashear

    out = tmp_path / "api"
    with pytest.raises(ConfigError, match="ratio 0.99 is unreachable") as exc:
        lorashear.prune(str(models["tiny"]), ratio=0.99, out=str(out), steps=6, num_periods=2, progress=False)
    assert "\n" not in str(exc.value)
    assert list(tmp_path.iterdir()) == []  # no config.yaml, no directory


def test_a_recover_resume_knows_its_models_by_content(models, tmp_path):
    from lorashear.errors import CheckpointError
    from lorashear.stages.recover import RecoverConfig, _fresh_state, _load_round, _save_round, _settings

    model_dir = tmp_path / "model"
    shutil.copytree(models["tiny"], model_dir)
    config = RecoverConfig(model=str(model_dir), teacher=str(models["tiny"]), out=str(tmp_path / "r"))
    model, root = tiny_model("llama", size="small"), tmp_path / "checkpoints"
    _save_round(root, model, {**_fresh_state(), "round": 1}, _settings(config), None)
    no_lora = lambda base, stage: pytest.fail("no LoRA was open")  # noqa: E731
    spelled = RecoverConfig(model=f"{model_dir}/", teacher=str(models["tiny"]), out=str(tmp_path / "r"))
    assert _load_round(root, model, _settings(spelled), no_lora)[0]["round"] == 1  # the same model
    _put_other_weights(model_dir)  # other weights at the same path
    with pytest.raises(CheckpointError, match=re.escape("written with other settings (model)")):
        _load_round(root, model, _settings(config), no_lora)


# --------------------------------------------------------------- 4. OSError on a user path is one line
@pytest.mark.parametrize("error", [PermissionError, IsADirectoryError, NotADirectoryError])
def test_an_os_error_on_the_users_out_is_one_line(error, models, tmp_path, capsys, monkeypatch):
    from lorashear.stages import analyze

    out = tmp_path / "out"

    def fail(config, **kwargs):
        raise error(13, "Permission denied", str(out / "knowledge.json"))

    monkeypatch.setattr(analyze, "run", fail)
    code, lines = cli(capsys, "analyze", models["tiny"], "--out", out)
    assert_one_line(code, lines, "analyze", f"cannot use {out / 'knowledge.json'}", "check the path")


def test_an_os_error_elsewhere_keeps_its_traceback(models, tmp_path, monkeypatch):
    from lorashear.stages import analyze

    def fail(config, **kwargs):
        raise PermissionError(13, "Permission denied", "/usr/lib/something-internal")

    monkeypatch.setattr(analyze, "run", fail)
    with pytest.raises(PermissionError):
        main(["-q", "analyze", str(models["tiny"]), "--out", str(tmp_path / "out")])


# ------------------------------------------------------------------------ 3. the Python API refuses too
def _discovered(**overrides):
    from lorashear.graph.discover import discover

    model = tiny_model("llama", size="small", **overrides)
    return model, discover(model)


@pytest.mark.parametrize("case", ["another-model", "twice", "unknown-parameter"])
def test_compact_refuses_groups_that_are_not_this_models(case):
    from lorashear.compaction import compact

    model, graph = _discovered()
    mlp = [g for g in graph.groups if g.kind == "mlp_channel"]
    if case == "another-model":  # a wider model: its channel indices run past this model's MLP
        _, wider = _discovered(intermediate_size=96)
        groups = [g for g in wider.groups if g.kind == "mlp_channel" and g.index >= 64][:2]
        fragment = "comes from another model"
    elif case == "twice":
        groups = [mlp[0], mlp[1], mlp[0]]
        fragment = "is given twice"
    else:
        _, deeper = _discovered(num_hidden_layers=3)
        groups = [g for g in deeper.groups if g.layer == 2][:1]
        fragment = "names a parameter this model does not have"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=fragment) as exc:
        compact(model, groups)
    assert "\n" not in str(exc.value)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # untouched


def test_save_pretrained_onto_a_file_is_refused_and_the_file_left_alone(tmp_path):
    from lorashear.models.saving import save_pretrained

    target = tmp_path / "model"
    target.write_text("not a model\n")
    with pytest.raises(ConfigError, match="is a file") as exc:
        save_pretrained(tiny_model("llama", size="small"), target)
    assert "\n" not in str(exc.value)
    assert target.read_text() == "not a model\n" and [p.name for p in tmp_path.iterdir()] == ["model"]


# ------------------------------------------------------------------------ 1. atomic directory swaps
def test_atomic_directory_replaces_the_whole_directory_and_carries_what_it_is_told(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"):
        (out / name).write_text("old shard")
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "step-1").write_text("state")
    with atomic_directory(out, carry=("checkpoints",)) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "model.safetensors"]  # no old shard survives
    assert (out / "checkpoints" / "step-1").read_text() == "state"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_an_interrupted_save_leaves_the_old_result_complete(interruption, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_text("old")
    (out / "checkpoints").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(interruption):
        with atomic_directory(out, carry=("checkpoints",)) as tmp:
            (tmp / "model.safetensors").write_text("half of the new one")
            raise interruption()
    assert snapshot(tmp_path) == before


def test_a_killed_swap_is_repaired_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    old = tmp_path / ".out.old-12345"  # killed between the two renames: the old result was moved aside
    old.mkdir()
    (old / "prune_report.json").write_text("{}")
    (tmp_path / ".out.tmp-abc").mkdir()  # and the new one was not yet in place
    with output_lock(out):
        assert (out / "prune_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# -------------------------------------------------------------- 5. a killed prune resumes bit for bit
_DRIVER = r"""
import os, signal, sys
point = os.environ["LORASHEAR_TEST_KILL_AT"]

def die():
    os.kill(os.getpid(), signal.SIGKILL)

if point.startswith("checkpoint:"):  # while writing checkpoint N: its params are on disk, its state is not
    import safetensors.torch as st
    step, save_file = int(point.split(":")[1]), st.save_file
    def killing_save_file(tensors, filename, *args, **kwargs):
        save_file(tensors, filename, *args, **kwargs)
        if f".step-{step:08d}.partial" in str(filename) and str(filename).endswith("params.safetensors"):
            die()
    st.save_file = killing_save_file
elif point == "final-save":  # the new model is written into the temporary directory, not yet swapped in
    import lorashear.stages.prune as prune
    prune.plot_prune = lambda *args, **kwargs: die()
elif point == "swap":  # between the two renames: the old result moved aside, the new one not yet in place
    replace = os.replace
    def killing_replace(src, dst):
        replace(src, dst)
        if os.path.basename(str(dst)).startswith(".p.old-"):
            die()
    os.replace = killing_replace
from lorashear.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.integration
def test_a_killed_prune_resumes_to_the_same_model_bit_for_bit(models, tmp_path):
    argv = ["-q", "prune", str(models["tiny"]), *PRUNE, "--steps", "8", "--checkpoint-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    rng = random.Random(int(time.time()))
    seed_note = f"(random seed {rng.random():.6f})"

    def launch(point: str, out: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _DRIVER, *argv, "--out", str(out), "--resume"],
                                env={**env, "LORASHEAR_TEST_KILL_AT": point}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)

    out = tmp_path / "p"
    # 1. killed while writing the checkpoint of a random step
    step = rng.randint(2, 6)
    proc = launch(f"checkpoint:{step}", out)
    assert proc.wait(timeout=120) == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    # (under checkpoints/compacted once the model is compacted, when pruning ends)
    assert list((out / "checkpoints").rglob(f".step-{step:08d}.partial/params.safetensors")), seed_note
    # 2. killed from outside at a random moment once it has made progress
    proc = launch("none", out)
    deadline = time.time() + 120

    def progressed() -> bool:
        return any(int(p.name[5:]) >= step for p in (out / "checkpoints").glob("step-*"))

    while time.time() < deadline and proc.poll() is None and not progressed():
        time.sleep(0.02)
    time.sleep(rng.uniform(0.0, 1.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # 3. killed while saving the result, then 4. between the renames that swap it in
    for point in ("final-save", "swap"):
        proc = launch(point, out)
        code = proc.wait(timeout=120)
        assert code == -signal.SIGKILL, (point, code, proc.stderr.read().decode()[-2000:], seed_note)
    assert not out.exists() and list(tmp_path.glob(".p.old-*")), seed_note  # the swap was cut in half
    # 5. resumed to the end, here; and one uninterrupted run to compare with
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--out", str(out), "--resume"]) == 0
        assert main([*argv, "--out", str(tmp_path / "straight")]) == 0
    finally:
        torch.set_num_threads(threads)
    got = (out / "model.safetensors").read_bytes()
    assert got == (tmp_path / "straight" / "model.safetensors").read_bytes(), seed_note
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p", "straight"]  # no temporary or old directory left
    assert not (out / "checkpoints").exists()
