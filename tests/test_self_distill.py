"""Self-distilled chat data: prompts from training splits only (never the recall probe's questions), the dense
model's replies cached by content, the share of mixed rows, and a prune run that reads them."""

from __future__ import annotations

import json
import re

import pytest
import torch

from lorashear.data.config import DataConfig
from lorashear.data.self_distill import mix_in, self_chat_prompts, self_distilled_texts
from lorashear.errors import ConfigError
from lorashear.evaluation.recall import load_questions


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[0-9a-z]+", text.lower()))


def test_prompts_come_from_training_splits_never_from_the_recall_probe():
    from lorashear.data.builtin import load_builtin_documents

    every = self_chat_prompts(10_000)
    assert len(every) == len(set(every)) > 700  # 680 distinct chatterbot questions + 90 article titles
    assert self_chat_prompts(50, seed=1) == self_chat_prompts(50, seed=1) != self_chat_prompts(50, seed=2)
    probe = {_norm(q.question) for q in load_questions()[1]}
    assert not probe & {_norm(p) for p in every}
    held_out = {_norm(m["content"]) for split in ("validation", "test")
                for doc in load_builtin_documents("chatterbot", split) for m in doc["messages"]}
    # a held-out conversation's question may repeat a training one word for word; none is only held out
    train_turns = {_norm(m["content"]) for doc in load_builtin_documents("chatterbot", "train") for m in doc["messages"]}
    titles = {_norm(f"Tell me about {d['id']}.") for d in load_builtin_documents("wikipedia", "train")}
    assert all(_norm(p) in train_turns or _norm(p) in titles for p in every)
    assert held_out  # the held-out halves exist and were read
    with pytest.raises(ConfigError):
        self_chat_prompts(0)


def test_mix_in_replaces_an_even_share_of_rows():
    base = torch.arange(100).reshape(100, 1).repeat(1, 4)
    extra = -torch.arange(1, 8).reshape(7, 1).repeat(1, 4)
    mixed = mix_in(base, extra, 0.2)
    chat_rows = (mixed[:, 0] < 0).nonzero().flatten()
    assert chat_rows.numel() == 20 and mixed.shape == base.shape
    assert torch.equal(mixed[chat_rows, 0], -torch.tensor([1 + i % 7 for i in range(20)]))
    assert int(chat_rows.diff().min()) == int(chat_rows.diff().max()) == 5  # evenly spaced
    untouched = (mixed[:, 0] >= 0)
    assert torch.equal(mixed[untouched], base[untouched])
    assert mix_in(base, extra, 0.0) is base
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError):
            mix_in(base, extra, bad)
    with pytest.raises(ConfigError):
        mix_in(base, extra[:, :3], 0.2)
    with pytest.raises(ConfigError):
        DataConfig(chat_share=1.5)


def test_replies_are_the_models_greedy_answers_and_are_cached(tmp_path, monkeypatch, one_thread):
    from lorashear.models.generation import generate_replies
    from test_evaluation import EVAL_MODEL, _tiny_tokenizer
    from tiny_models import tiny_model

    import lorashear.data.self_distill as self_distill

    monkeypatch.setattr(self_distill, "cache_root", lambda: tmp_path / "cache")
    tokenizer = _tiny_tokenizer()
    model = tiny_model("llama", 0, vocab=len(tokenizer), **EVAL_MODEL)
    prompts = self_chat_prompts(5)
    texts = self_distilled_texts(model, tokenizer, prompts, max_new_tokens=5, model_id="sha256:x")
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=5)
    assert len(texts) == sum(1 for r in replies if r) > 0
    for text, prompt, reply in zip(texts, prompts, [r for r in replies if r]):
        assert prompt in text and reply in text  # the plain template: this tokenizer has no chat template
    cached = list((tmp_path / "cache" / "self_chat").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["model"] == "sha256:x"

    class Refuses(torch.nn.Module):  # a cached set is read back without asking the model again
        def parameters(self, recurse=True):
            raise AssertionError("the model was asked again")

    assert self_distilled_texts(Refuses(), tokenizer, prompts, max_new_tokens=5, model_id="sha256:x") == texts
    other = self_distilled_texts(model, tokenizer, prompts, max_new_tokens=4, model_id="sha256:x")
    assert len(list((tmp_path / "cache" / "self_chat").glob("*.json"))) == 2 and other != texts


def test_a_prune_run_with_a_chat_share_reads_the_dense_models_replies(tmp_path, monkeypatch, one_thread):
    import lorashear.data.self_distill as self_distill
    from lorashear.cli import main
    from lorashear.models.loading import load_tokenizer
    from test_prune import CLI_ARGS
    from tiny_models import tiny_model

    monkeypatch.setattr(self_distill, "cache_root", lambda: tmp_path / "cache")
    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except Exception as exc:  # pragma: no cover - the reference model is set up by scripts/setup.sh
        pytest.skip(f"reference tokenizer unavailable: {exc}")
    src = tmp_path / "tiny"
    # untied embeddings: a tied random model only repeats the prompt's last token (a newline: an empty reply)
    tiny_model("llama", 0, size="small", layers=2, vocab=len(tok), vector_std=None, dtype=None,
               tie_word_embeddings=False).save_pretrained(src)
    tok.save_pretrained(src)
    out = tmp_path / "out"
    assert main(["-q", "prune", str(src), "--out", str(out), *CLI_ARGS, "--chat-share", "0.25",
                 "--chat-prompts", "6", "--chat-max-new-tokens", "4"]) == 0
    report = json.loads((out / "prune_report.json").read_text())
    assert report["settings"]["data"]["chat_share"] == 0.25
    assert report["compute"]["prep_fwd"] > 0  # the dense model's passes over the conversations
    assert len(list((tmp_path / "cache" / "self_chat").glob("*.json"))) == 1
    plain = tmp_path / "plain"
    assert main(["-q", "prune", str(src), "--out", str(plain), *CLI_ARGS]) == 0
    assert json.loads((plain / "prune_report.json").read_text())["compute"]["prep_fwd"] == 0


def test_a_model_that_never_answers_is_a_one_line_error(tmp_path, monkeypatch, one_thread):
    import lorashear.data.self_distill as self_distill
    from lorashear.errors import DataError
    from lorashear.models.loading import load_tokenizer
    from tiny_models import plain_tiny_llama

    monkeypatch.setattr(self_distill, "cache_root", lambda: tmp_path / "cache")
    try:
        tok = load_tokenizer("smollm2-135m-instruct")
    except Exception as exc:  # pragma: no cover
        pytest.skip(f"reference tokenizer unavailable: {exc}")
    with pytest.raises(DataError, match="no non-empty reply"):  # it only repeats the prompt's closing newline
        self_distilled_texts(plain_tiny_llama(vocab=len(tok)), tok, self_chat_prompts(3), max_new_tokens=3,
                             model_id="sha256:y")
    assert not (tmp_path / "cache" / "self_chat").exists()  # nothing cached
