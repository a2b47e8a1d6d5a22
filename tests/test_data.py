"""Tests for lorashear.data: spec grammar, readers, packing, built-ins, hub errors."""

from __future__ import annotations

import json

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
from lorashear.data.builtin import builtin_document_ids
from lorashear.data.rlazyload import unserialize
from lorashear.data.splits import split_documents
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
    pa = pytest.importorskip("pyarrow")
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
    assert len(train) + len(validation) == 50 and len(validation) == 5
    assert not set(train) & set(validation)
    assert load_texts(str(path), split="validation") == validation


def test_split_documents_is_order_independent():
    ids = [f"doc-{i}" for i in range(30)]
    train, validation = split_documents(ids)
    assert (train, validation) == split_documents(list(reversed(ids)))
    assert train.isdisjoint(validation) and train | validation == set(ids)


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
    json.dumps(info)


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


def test_pack_shape_and_dtype(tokenizer):
    packed = pack_texts(_documents(), tokenizer, seq_len=32, num_sequences=5)
    assert packed.shape == (5, 32) and packed.dtype == torch.long


def test_pack_same_seed_same_tensor(tokenizer):
    a = pack_texts(_documents(), tokenizer, seq_len=16, seed=3)
    b = pack_texts(_documents(), tokenizer, seq_len=16, seed=3)
    assert torch.equal(a, b)


def test_pack_different_seed_different_order(tokenizer):
    a = pack_texts(_documents(), tokenizer, seq_len=16, seed=0)
    b = pack_texts(_documents(), tokenizer, seq_len=16, seed=1)
    assert a.shape == b.shape and not torch.equal(a, b)
    assert sorted(a.flatten().tolist()) != [] and a.numel() == b.numel()


def test_pack_joins_documents_with_eos(tokenizer):
    docs = ["alpha beta gamma", "delta epsilon"]
    total = sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    packed = pack_texts(docs, tokenizer, seq_len=total)
    assert packed.shape == (1, total)
    assert packed[0].tolist().count(tokenizer.eos_token_id) == 2 and packed[0, -1] == tokenizer.eos_token_id
    no_eos = pack_texts(docs, tokenizer, seq_len=total - 2, add_eos=False)
    assert tokenizer.eos_token_id not in no_eos[0].tolist()


def test_pack_returns_what_fits_when_short(tokenizer):
    packed = pack_texts(_documents(2), tokenizer, seq_len=16, num_sequences=1000)
    assert 0 < packed.shape[0] < 1000


def test_pack_errors(tokenizer):
    with pytest.raises(DataError, match="no text"):
        pack_texts([], tokenizer, seq_len=8)
    with pytest.raises(DataError, match="no text"):
        pack_texts(["", "  "], tokenizer, seq_len=8)
    with pytest.raises(DataError, match="not enough text"):
        pack_texts(["hi"], tokenizer, seq_len=4096)
    with pytest.raises(ConfigError):
        pack_texts(["hi"], tokenizer, seq_len=0)


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


def test_builtin_sources_have_origin(builtins_ready):
    assert {"austen", "wikipedia", "debian-handbook", "chatterbot"} <= set(BUILTIN_SOURCES)
    for name in BUILTIN_SOURCES:
        manifest = json.loads((builtins_ready[name] / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["origin"]["package"] and manifest["origin"]["licence"]
        assert manifest["splits"]["train"]["documents"] > manifest["splits"]["validation"]["documents"] > 0


def test_calibration_and_heldout_are_disjoint(builtins_ready):
    calibration = set(builtin_document_ids("calibration"))
    heldout = set(builtin_document_ids("heldout"))
    assert calibration and heldout and calibration.isdisjoint(heldout)
    calibration_texts = set(load_texts("builtin:calibration"))
    heldout_texts = load_texts("builtin:heldout")
    assert not calibration_texts & set(heldout_texts)
    # no held-out paragraph of substance appears verbatim in the calibration text
    calibration_paragraphs = {p for t in calibration_texts for p in t.split("\n\n")}
    long_heldout = [p for t in heldout_texts for p in t.split("\n\n") if len(p.split()) > 30]
    assert long_heldout and not calibration_paragraphs & set(long_heldout)


def test_builtin_texts_are_prose(builtins_ready):
    for name in ("austen", "wikipedia", "debian-handbook"):
        texts = load_texts(f"builtin:{name}", split="validation")
        words = sum(len(t.split()) for t in texts)
        assert words / len(texts) > 500, name  # long documents, not fragments


def test_builtin_aliases_fix_their_split(builtins_ready):
    with pytest.raises(DataError, match="always the train split"):
        load_texts("builtin:calibration:split=validation")
    with pytest.raises(DataError, match="unknown built-in"):
        load_texts("builtin:nope")
    info = describe("builtin:heldout", max_texts=3)
    assert info["num_texts"] == 3 and info["split"] == "validation"
    assert {o["package"] for o in info["origin"]} == {"r-cran-janeaustenr", "gensim"}


def test_builtin_instructions(builtins_ready, tokenizer):
    texts = load_texts("builtin:instructions", max_texts=5)
    assert len(texts) == 5 and all(t.startswith("### Instruction:\n") for t in texts)
    conversations = load_conversations("builtin:instructions", max_items=5)
    assert conversations[0][0]["role"] == "user" and conversations[0][1]["role"] == "assistant"
    with pytest.raises(DataError, match="not instruction data"):
        load_conversations("builtin:austen")


def test_pack_builtin_calibration(builtins_ready, tokenizer):
    texts = load_texts("builtin:calibration", max_texts=20)
    packed = pack_texts(texts, tokenizer, seq_len=128, num_sequences=8, seed=0)
    assert packed.shape == (8, 128)
    assert torch.equal(packed, pack_texts(texts, tokenizer, seq_len=128, num_sequences=8, seed=0))
