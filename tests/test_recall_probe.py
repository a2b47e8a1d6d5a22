"""The factual-recall probe of the eval report: its questions, its scoring, batched generation, the report."""

from __future__ import annotations

import pytest
import torch

from lorashear.evaluation.config import EvalConfig
from lorashear.evaluation.recall import RecallQuestion, RecallResult, _words, load_questions, recall_probe
from lorashear.evaluation.report import render_markdown
from lorashear.evaluation.results import EvalReport, ModelEval, ratios
from test_evaluation import EVAL_MODEL, _tiny_tokenizer
from tiny_models import tiny_model


def test_questions_are_well_formed_and_never_give_their_answer_away():
    name, questions = load_questions()
    assert name == "lorashear_recall" and len(questions) >= 40
    assert len({q.question for q in questions}) == len(questions)
    for q in questions:
        assert q.answers and all(_words(a) for a in q.answers), q
        # an echo of the question must never score
        assert not q.scores(q.question), q.question


@pytest.mark.parametrize(("reply", "expected"), [
    ("The capital city of France is Paris.", True),
    ("PARIS", True),
    ("paris, of course", True),
    ("The Parisian suburbs", False),  # a longer word is not the answer
    ("It is Lyon.", False),
    ("", False),
])
def test_an_answer_scores_as_a_whole_word(reply, expected):
    assert RecallQuestion("What is the capital city of France?", ("Paris",)).scores(reply) is expected


def test_multi_word_and_numeric_answers():
    q = RecallQuestion("How many hours are there in a day?", ("24", "twenty-four"))
    assert q.scores("There are 24 hours.") and q.scores("Twenty-four.")
    assert not q.scores("There are 240 minutes.") and not q.scores("twenty")
    assert RecallQuestion("Who painted it?", ("da Vinci",)).scores("Leonardo da Vinci painted it")
    assert not RecallQuestion("Who painted it?", ("da Vinci",)).scores("Vinci")


def test_batched_left_padded_generation_equals_one_question_at_a_time(one_thread):
    tokenizer = _tiny_tokenizer()
    model = tiny_model("llama", 0, vocab=len(tokenizer), **EVAL_MODEL)
    torch.manual_seed(0)
    batched = recall_probe(model, tokenizer, max_new_tokens=6, batch_size=16)
    single = recall_probe(model, tokenizer, max_new_tokens=6, batch_size=1)
    assert not batched.chat_template
    assert [r["reply"] for r in batched.replies] == [r["reply"] for r in single.replies]
    assert batched.num_questions == len(load_questions()[1])
    assert batched.num_correct == sum(r["correct"] for r in batched.replies)


def _recall(correct: list[bool]) -> RecallResult:
    replies = [{"question": f"Q{i}?", "answers": ["a"], "reply": "a" if c else "b", "correct": c}
               for i, c in enumerate(correct)]
    return RecallResult(probe="lorashear_recall", num_questions=len(replies), num_correct=sum(correct),
                        max_new_tokens=16, chat_template=True, replies=replies)


def test_report_shows_recall_beside_the_baseline_and_the_questions_that_changed():
    base = ModelEval(role="baseline", name="dense", recall=_recall([True, True, True, False]))
    model = ModelEval(role="model", name="pruned", recall=_recall([True, False, True, True]))
    report = EvalReport(config=EvalConfig(model="pruned", out="x", tasks=[]), models=[base, model],
                        environment={}, seconds=1.0)
    assert ratios(report)["recall"] == pytest.approx(1.0)
    text = render_markdown(report, {})
    assert "## Factual recall" in text and "3 / 4" in text
    assert "Questions whose outcome differs (2)" in text
    assert "| Q1? | ✓ a | ✗ b |" in text
    assert RecallResult.from_dict(model.recall.to_dict()).replies == model.recall.replies
