"""Tests for lorashear.data: spec grammar, readers, packing, built-ins, hub errors.

Packing uses the reference tokenizer and the built-ins need the set-up corpora: those tests are
marked integration.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorashear.data import (
    BUILTIN_SOURCES,
    DataSpec,
    describe,
    format_instruction,
    load_conversations,
    load_texts,
    pack_texts,
    parse_data_spec,
    prepare_builtin_data,
)
from lorashear.data.builtin import BUILTIN_ALIASES, builtin_document_ids
from lorashear.data.rlazyload import unserialize
from lorashear.data.splits import document_key, split_documents, split_heldout
from lorashear.errors import ConfigError, DataError, LorashearError

PARAGRAPH = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch and "
             "wonders whether the harvest will be ready before the first autumn storms arrive.")


@pytest.fixture(scope="module")
def tokenizer():
    from lorashear.models.loading import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


# --- spec grammar --------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("notes.txt", DataSpec("local", "notes.txt")),
        ("dir/corpus.jsonl:field=content", DataSpec("local", "dir/corpus.jsonl", field="content")),
        ("data.parquet:field=text:split=validation", DataSpec("local", "data.parquet", "validation", "text")),
        ("C:/data/x.txt", DataSpec("local", "C:/data/x.txt")),
        ("a:b.txt:split=train", DataSpec("local", "a:b.txt", "train")),
        ("builtin:heldout", DataSpec("builtin", "heldout")),
        ("builtin:wikipedia:split=validation", DataSpec("builtin", "wikipedia", "validation")),
        ("hf:Salesforce/wikitext:config=wikitext-2-raw-v1:split=train:field=text",
         DataSpec("hf", "Salesforce/wikitext", "train", "text", "wikitext-2-raw-v1")),
        ("hf:Salesforce/wikitext/wikitext-2-raw-v1:split=test",
         DataSpec("hf", "Salesforce/wikitext", "test", None, "wikitext-2-raw-v1")),
        ("hf:imdb", DataSpec("hf", "imdb")),
    ],
)
def test_parse_data_spec(text, expected):
    spec = parse_data_spec(text)
    assert spec == expected
    assert parse_data_spec(str(spec)) == spec  # round trip


@pytest.mark.parametrize(
    "text",
    ["", "   ", "builtin:", "hf:", "x.txt:split=", "x.txt:split=a:split=b", "x.txt:config=c",
     "hf:a/b/c:config=d", "hf:a/b/c/d"],
)
def test_parse_data_spec_errors(text):
    with pytest.raises(DataError):
        parse_data_spec(text)


def test_data_error_is_a_lorashear_error():
    assert issubclass(DataError, LorashearError)


# --- local readers -------------------------------------------------------------------------------

def test_read_txt_paragraphs(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first paragraph\nwrapped line\n\n\nsecond paragraph\n\n  \n", encoding="utf-8")
    assert load_texts(str(path)) == ["first paragraph\nwrapped line", "second paragraph"]


def test_read_jsonl_with_field_and_default(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "one", "body": "uno"}\n\n{"text": "two", "body": "dos"}\n', encoding="utf-8")
    assert load_texts(str(path)) == ["one", "two"]
    assert load_texts(f"{path}:field=body") == ["uno", "dos"]
    with pytest.raises(DataError, match="field 'missing'"):
        load_texts(f"{path}:field=missing")


def test_read_json_list_and_instruction_records(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"data": [{"instruction": "Say hi.", "output": "Hi!"}, "plain text"]}),
                    encoding="utf-8")
    texts = load_texts(str(path))
    assert texts == [format_instruction("Say hi.", "Hi!"), "plain text"]
    assert "### Instruction:\nSay hi." in texts[0] and texts[0].endswith("### Response:\nHi!")
    with pytest.raises(DataError, match="not an instruction record"):
        load_conversations(str(path))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Say hi.", "response": "Hi!"}) + "\n", encoding="utf-8")
    assert load_conversations(str(pairs)) == [
        [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi!"}]]


def test_read_parquet(tmp_path):
    import pyarrow as pa  # a dependency of datasets, so always installed
    import pyarrow.parquet as pq

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"content": ["alpha", "beta", None]}), path)
    assert load_texts(f"{path}:field=content") == ["alpha", "beta"]
    with pytest.raises(DataError, match="no column 'text'"):
        load_texts(str(path))


def test_read_folder_sorted_and_recursive(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("from b", encoding="utf-8")
    (tmp_path / "sub" / "a.jsonl").write_text('{"text": "from a"}\n', encoding="utf-8")
    (tmp_path / "ignored.csv").write_text("x,y\n", encoding="utf-8")
    assert load_texts(str(tmp_path)) == ["from b", "from a"]  # "b.txt" sorts before "sub/a.jsonl"
    assert load_texts(str(tmp_path), max_texts=1) == ["from b"]


def test_local_split_is_disjoint_and_deterministic(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(50)), encoding="utf-8")
    train = load_texts(str(path), split="train")
    validation = load_texts(f"{path}:split=validation")
    test = load_texts(f"{path}:split=test")
    heldout = load_texts(f"{path}:split=heldout")
    # 10 % held out (5 documents), then halved: 2 test, 3 validation
    assert len(train) + len(heldout) == 50 and len(heldout) == 5
    assert (len(validation), len(test)) == (3, 2)
    assert set(validation) | set(test) == set(heldout) and not set(validation) & set(test)
    assert not set(train) & set(heldout)
    assert load_texts(str(path), split="validation") == validation


def test_split_documents_is_order_independent():
    ids = [f"doc-{i}" for i in range(30)]
    train, heldout = split_documents(ids)
    assert (train, heldout) == split_documents(list(reversed(ids)))
    assert train.isdisjoint(heldout) and train | heldout == set(ids)
    validation, test = split_heldout(sorted(heldout))
    assert (validation, test) == split_heldout(sorted(heldout, reverse=True))
    assert validation.isdisjoint(test) and validation | test == heldout and len(test) == len(heldout) // 2


def test_heldout_halves_rank_by_a_second_hash():
    """The test half is the first ``floor(n / 2)`` ids in the order of SHA-256("test/" + id)."""
    ids = [f"doc-{i}" for i in range(41)]
    order = sorted(ids, key=lambda i: document_key(i, "test/"))
    validation, test = split_heldout(ids)
    assert test == set(order[:20]) and validation == set(order[20:])
    assert split_heldout(["only"]) == ({"only"}, set())


def test_missing_file_error(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_texts(str(tmp_path / "nope.jsonl"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("name", "content"), [("empty.txt", "\n\n  \n"), ("empty.jsonl", ""), ("e.json", "[]")])
def test_empty_data_error(tmp_path, name, content):
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="no text"):
        load_texts(str(tmp_path / name))


def test_invalid_json_error(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_texts(str(tmp_path / "bad.jsonl"))


def test_describe_local(tmp_path):
    (tmp_path / "a.txt").write_text("one two\n\nthree", encoding="utf-8")
    info = describe(str(tmp_path / "a.txt"))
    assert info["kind"] == "local" and info["num_texts"] == 2 and info["num_words"] == 3
    assert info["split"] == "all" and len(info["sha256"]) == 64
    assert json.loads(json.dumps(info)) == info  # JSON-ready as it is


# --- hub ----------------------------------------------------------------------------------------

def test_hub_spec_offline_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="could not load hub data set") as info:
        load_texts("hf:lorashear-test/does-not-exist:split=train")
    assert "builtin:calibration" in str(info.value)


# --- packing -------------------------------------------------------------------------------------

def _documents(n: int = 12) -> list[str]:
    return [f"Document number {i}. {PARAGRAPH}" for i in range(n)]


@pytest.mark.integration
def test_pack_shape_and_dtype(tokenizer):
    packed = pack_texts(_documents(), tokenizer, seq_len=32, num_sequences=5)
    assert packed.shape == (5, 32) and packed.dtype == torch.long


@pytest.mark.integration
def test_pack_same_seed_same_tensor(tokenizer):
    a = pack_texts(_documents(), tokenizer, seq_len=16, seed=3)
    b = pack_texts(_documents(), tokenizer, seq_len=16, seed=3)
    assert torch.equal(a, b)


@pytest.mark.integration
def test_pack_different_seed_different_order(tokenizer):
    a = pack_texts(_documents(), tokenizer, seq_len=16, seed=0)
    b = pack_texts(_documents(), tokenizer, seq_len=16, seed=1)
    assert a.shape == b.shape and not torch.equal(a, b)
    # both hold whole documents joined by EOS, the same documents in a different order
    encoded = [tuple(tokenizer(d, add_special_tokens=False)["input_ids"]) for d in _documents()]

    def documents_in(packed):  # the documents that end inside the packed tokens, in order
        documents, current = [], []
        for token in packed.flatten().tolist():
            if token == tokenizer.eos_token_id:
                documents.append(tuple(current))
                current = []
            else:
                current.append(token)
        return documents

    order_a, order_b = documents_in(a), documents_in(b)
    assert len(order_a) >= 2 and len(order_b) >= 2
    assert set(order_a) <= set(encoded) and set(order_b) <= set(encoded)
    assert order_a != order_b


@pytest.mark.integration
def test_pack_joins_documents_with_eos(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon"]
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    packed = pack_texts(docs, tokenizer, seq_len=total)
    assert packed.shape == (1, total)
    assert packed[0].tolist().count(tokenizer.eos_token_id) == 2 and packed[0, -1] == tokenizer.eos_token_id
    no_eos = pack_texts(docs, tokenizer, seq_len=total - 2, add_eos=False)
    assert tokenizer.eos_token_id not in no_eos[0].tolist()


@pytest.mark.integration
def test_pack_returns_what_fits_when_short(tokenizer):
    packed = pack_texts(_documents(2), tokenizer, seq_len=16, num_sequences=1000)
    assert 0 < packed.shape[0] < 1000


@pytest.mark.integration
def test_pack_errors(tokenizer):
    with pytest.raises(DataError, match="no text"):
        pack_texts([], tokenizer, seq_len=8)
    with pytest.raises(DataError, match="no text"):
        pack_texts(["", "  "], tokenizer, seq_len=8)
    with pytest.raises(DataError, match="not enough text"):
        pack_texts(["hi"], tokenizer, seq_len=4096)
    with pytest.raises(ConfigError):
        pack_texts(["hi"], tokenizer, seq_len=0)


@pytest.mark.integration
def test_format_instruction_uses_chat_template(tokenizer):
    text = format_instruction("Name a colour.", "Blue.", tokenizer)
    assert "Name a colour." in text and "Blue." in text and "### Instruction" not in text


# --- R lazy-load reader ----------------------------------------------------------------------------

def test_unserialize_character_vector():
    import struct

    def ints(*values):
        return b"".join(struct.pack(">i", v) for v in values)

    charsxp = lambda s: ints(0x00040009, len(s)) + s  # noqa: E731 - CHARSXP, UTF-8 flag
    payload = b"X\n" + ints(2, 0x040200, 0x020300) + ints(16, 3) + charsxp(b"one") + ints(9, -1) + charsxp(b"")
    assert unserialize(payload) == ["one", None, ""]


# --- built-ins (need the set-up packages: r-cran-janeaustenr, debian-handbook, gensim, chatterbot-corpus) ---

@pytest.fixture(scope="module")
def builtins_ready():
    return prepare_builtin_data()  # idempotent: a no-op once the set-up script has run it


@pytest.mark.integration
def test_builtin_sources_have_origin(builtins_ready):
    assert {"austen", "wikipedia", "debian-handbook", "chatterbot"} <= set(BUILTIN_SOURCES)
    # evaluation-only sources are optional at set-up (prepare_builtin_data() only warns about them)
    assert {n for n, s in BUILTIN_SOURCES.items() if not s.evaluation_only} <= set(builtins_ready)
    for name, directory in builtins_ready.items():
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["origin"]["package"] and manifest["origin"]["licence"]
        if BUILTIN_SOURCES[name].evaluation_only:
            assert manifest["splits"]["train"]["documents"] == 0 < manifest["splits"]["heldout"]["documents"]
        else:
            assert manifest["splits"]["train"]["documents"] > manifest["splits"]["heldout"]["documents"] > 0
        halves = manifest["splits"]["validation"]["documents"] + manifest["splits"]["test"]["documents"]
        assert halves == manifest["splits"]["heldout"]["documents"] and manifest["splits"]["test"]["documents"] > 0


@pytest.mark.integration
def test_calibration_and_heldout_are_disjoint(builtins_ready):
    calibration = set(builtin_document_ids("calibration"))
    heldout = set(builtin_document_ids("heldout"))
    assert calibration and heldout and calibration.isdisjoint(heldout)
    calibration_texts = set(load_texts("builtin:calibration"))
    heldout_texts = load_texts("builtin:heldout")
    assert not calibration_texts & set(heldout_texts)
    # the two halves: disjoint, together the whole held-out set, the same documents in the same order
    validation, test = load_texts("builtin:heldout-validation"), load_texts("builtin:heldout-test")
    assert validation and test and not set(validation) & set(test)
    assert sorted(validation + test) == sorted(heldout_texts)
    assert set(builtin_document_ids("heldout-validation")) | set(builtin_document_ids("heldout-test")) == heldout
    # no held-out paragraph of substance appears verbatim in the calibration text
    calibration_paragraphs = {p for t in calibration_texts for p in t.split("\n\n")}
    long_heldout = [p for t in heldout_texts for p in t.split("\n\n") if len(p.split()) > 30]
    assert long_heldout and not calibration_paragraphs & set(long_heldout)


@pytest.mark.integration
def test_builtin_texts_are_prose(builtins_ready):
    for name in ("austen", "wikipedia", "debian-handbook"):
        texts = load_texts(f"builtin:{name}", split="validation")
        words = sum(len(t.split()) for t in texts)
        assert words / len(texts) > 500, name  # long documents, not fragments


@pytest.mark.integration
def test_builtin_aliases_fix_their_split(builtins_ready):
    with pytest.raises(DataError, match="always the train split"):
        load_texts("builtin:calibration:split=validation")
    with pytest.raises(DataError, match="unknown built-in"):
        load_texts("builtin:nope")
    with pytest.raises(DataError, match="use builtin:heldout-test"):
        load_texts("builtin:heldout:split=test")
    info = describe("builtin:heldout", max_texts=3)
    assert info["num_texts"] == 3 and info["split"] == "heldout"
    assert describe("builtin:heldout-test", max_texts=1)["split"] == "test"
    assert {o["package"] for o in info["origin"]} == {"r-cran-janeaustenr", "gensim"}


@pytest.mark.integration
def test_builtin_instructions(builtins_ready, tokenizer):
    texts = load_texts("builtin:instructions", max_texts=5)
    assert len(texts) == 5 and all(t.startswith("### Instruction:\n") for t in texts)
    conversations = load_conversations("builtin:instructions", max_items=5)
    assert conversations[0][0]["role"] == "user" and conversations[0][1]["role"] == "assistant"
    with pytest.raises(DataError, match="not instruction data"):
        load_conversations("builtin:austen")


@pytest.mark.integration
def test_pack_builtin_calibration(builtins_ready, tokenizer):
    texts = load_texts("builtin:calibration", max_texts=20)
    packed = pack_texts(texts, tokenizer, seq_len=128, num_sequences=8, seed=0)
    assert packed.shape == (8, 128)
    assert torch.equal(packed, pack_texts(texts, tokenizer, seq_len=128, num_sequences=8, seed=0))


# --- evaluation-only held-out source (needs the Debian package python3.11-doc) ----------------------

_SPHINX_MARKUP = re.compile(r"</(p|div|span|a|code|pre|em|strong|section|li|dd|dt|aside|table)>"
                            r"|<(p|div|span|a|code|pre|section|aside|table)\s+(class|href|id|role)="
                            r"|¶|&(lt|gt|amp|nbsp);")


def _normalized_paragraphs(texts):
    return {" ".join(p.split()).casefold() for t in texts for p in t.split("\n\n") if p.strip()}


@pytest.fixture(scope="module")
def heldout_docs():
    prepare_builtin_data(["python-docs"])  # a DataError here names the package to install
    return load_texts("builtin:heldout-docs")


def test_evaluation_only_sources_stay_out_of_training_aliases():
    evaluation_only = {n for n, s in BUILTIN_SOURCES.items() if s.evaluation_only}
    assert "python-docs" in evaluation_only
    for alias, (sources, split) in BUILTIN_ALIASES.items():
        if split == "train":
            assert not evaluation_only & set(sources), alias
    assert BUILTIN_ALIASES["heldout-docs"] == (("python-docs",), "heldout")
    assert BUILTIN_ALIASES["heldout"] == (("austen", "wikipedia"), "heldout")  # the same documents as before
    for name in ("heldout", "heldout-docs"):
        sources, _ = BUILTIN_ALIASES[name]
        assert BUILTIN_ALIASES[f"{name}-validation"] == (sources, "validation")
        assert BUILTIN_ALIASES[f"{name}-test"] == (sources, "test")


@pytest.mark.integration
def test_heldout_docs_is_prose(heldout_docs):
    assert len(heldout_docs) >= 30
    assert sum(len(t.split()) for t in heldout_docs) > 50_000
    for text in heldout_docs:
        assert not _SPHINX_MARKUP.search(text), text[:200]
        for line in text.splitlines():
            assert not line.lstrip().startswith((">>>", "... ", "$ ")), line[:200]
    assert load_texts("builtin:python-docs") == heldout_docs  # the source is all held out
    halves = load_texts("builtin:heldout-docs-validation"), load_texts("builtin:heldout-docs-test")
    assert all(halves) and sorted(halves[0] + halves[1]) == sorted(heldout_docs)
    assert load_texts("builtin:python-docs:split=test") == halves[1]
    with pytest.raises(DataError, match="evaluation-only"):
        load_texts("builtin:python-docs:split=train")
    with pytest.raises(DataError, match="always the heldout split"):
        load_texts("builtin:heldout-docs:split=train")
    info = describe("builtin:heldout-docs", max_texts=2)
    assert info["split"] == "heldout" and info["origin"][0]["package"] == "python3.11-doc"
    assert info["origin"][0]["licence"].startswith("PSF-2.0")


@pytest.mark.integration
def test_heldout_docs_disjoint_from_calibration(builtins_ready, heldout_docs):
    calibration = load_texts("builtin:calibration")
    assert len(calibration) == 442  # adding an evaluation-only source leaves calibration unchanged
    assert not {d.split("/")[0] for d in builtin_document_ids("calibration")} & {"python-docs"}
    shared = _normalized_paragraphs(heldout_docs) & _normalized_paragraphs(calibration)
    assert not shared, sorted(shared)[:3]


def test_missing_evaluation_only_package_does_not_block_setup(monkeypatch, tmp_path, caplog):
    import dataclasses

    from lorashear.data import builtin

    monkeypatch.setenv("LORASHEAR_CACHE", str(tmp_path))
    source = BUILTIN_SOURCES["python-docs"]
    missing = dataclasses.replace(source, package=dataclasses.replace(source.package, path=str(tmp_path / "nope")))
    monkeypatch.setitem(BUILTIN_SOURCES, "python-docs", missing)
    real_prepare = builtin._prepare_source

    def prepare(src, force):  # only the evaluation-only source is really prepared (and fails)
        return real_prepare(src, force) if src.evaluation_only else tmp_path / src.name

    monkeypatch.setattr(builtin, "_prepare_source", prepare)
    with caplog.at_level("WARNING", logger="lorashear.data.builtin"):
        ready = prepare_builtin_data()  # set-up: the training sources go on, the missing one is a warning
    assert "python-docs" not in ready and {"austen", "wikipedia", "debian-handbook", "chatterbot"} <= set(ready)
    assert "python3.11-doc" in caplog.text
    with pytest.raises(DataError, match="python3.11-doc"):
        prepare_builtin_data(["heldout-docs"])  # asked for by name: an error naming the package
    with pytest.raises(DataError, match="python3.11-doc"):
        load_texts("builtin:heldout-docs")


@pytest.mark.integration
def test_documents_the_v1_protocol_scored_are_all_in_validation(builtins_ready):
    """The figures before 2026-12-04 (and every recipe choice made on them) scored 16 x 256 tokens from the head
    of ``builtin:heldout`` and ``builtin:heldout-docs``: Emma chapter 2, the start of "Alabama", and the first
    Python tutorial pages. All of them fall in ``validation``, so ``test`` is untouched by those choices."""
    from lorashear.data.builtin import load_builtin_documents

    for source, first in (("austen", 1), ("wikipedia", 1), ("python-docs", 3)):
        heldout = [d["id"] for d in load_builtin_documents(source, "heldout")]
        validation = {d["id"] for d in load_builtin_documents(source, "validation")}
        assert set(heldout[:first]) <= validation, source
