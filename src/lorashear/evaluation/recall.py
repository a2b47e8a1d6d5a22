"""A factual-recall probe: does the model still answer simple questions of fact?

Perplexity on running text can stay close to dense while a pruned model has lost facts (asked "the
capital of France", a pruned model named an invented city). The probe asks the questions in
``resources/probes/recall.json`` (written for lorashear, one-word answers), each once, greedily,
through the tokenizer's chat template when it has one, and scores a question when one of its accepted
answers appears as a word in the first ``max_new_tokens`` tokens of the reply.

Evaluation only: nothing trains or calibrates on these questions.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..errors import DataError
from ..models.generation import generate_replies, has_chat_template, prompt_for

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

PROBE_RESOURCE = "probes/recall.json"


@dataclass(frozen=True)
class RecallQuestion:
    question: str
    answers: tuple[str, ...]  #: accepted answers, any one counts

    def scores(self, reply: str) -> bool:
        """An accepted answer appears in ``reply`` as a whole word (case and punctuation ignored)."""
        words = _words(reply)
        return any(phrase and _contains(words, phrase) for phrase in map(_words, self.answers))


def _words(text: str) -> list[str]:
    return re.findall(r"[0-9a-z]+(?:-[0-9a-z]+)*", text.lower())


def _contains(words: list[str], phrase: list[str]) -> bool:
    n = len(phrase)
    return any(words[i:i + n] == phrase for i in range(len(words) - n + 1))


@dataclass
class RecallResult:
    """The probe's outcome for one model."""

    probe: str
    num_questions: int
    num_correct: int
    max_new_tokens: int
    chat_template: bool  #: questions were put through the tokenizer's chat template
    replies: list[dict[str, Any]] = field(default_factory=list)  #: question, reply, correct

    @property
    def accuracy(self) -> float:
        return self.num_correct / self.num_questions if self.num_questions else math.nan

    @property
    def stderr(self) -> float:
        p, n = self.accuracy, self.num_questions
        return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {"probe": self.probe, "num_questions": self.num_questions, "num_correct": self.num_correct,
                "accuracy": self.accuracy, "stderr": self.stderr, "max_new_tokens": self.max_new_tokens,
                "chat_template": self.chat_template, "replies": list(self.replies)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecallResult:
        return cls(probe=d["probe"], num_questions=int(d["num_questions"]), num_correct=int(d["num_correct"]),
                   max_new_tokens=int(d["max_new_tokens"]), chat_template=bool(d["chat_template"]),
                   replies=list(d.get("replies", [])))


def load_questions() -> tuple[str, list[RecallQuestion]]:
    """The probe's name and questions, from the package's resources."""
    text = resources.files("lorashear.resources").joinpath(PROBE_RESOURCE).read_text(encoding="utf-8")
    data = json.loads(text)
    questions = [RecallQuestion(q["q"], tuple(q["a"])) for q in data["questions"]]
    if not questions:
        raise DataError(f"the recall probe {PROBE_RESOURCE} has no questions")
    return data["name"], questions


def recall_probe(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_new_tokens: int = 16,
                 batch_size: int = 16) -> RecallResult:
    """Ask every question of the probe greedily and score the replies (batched, left-padded)."""
    name, questions = load_questions()
    texts = generate_replies(model, tokenizer, [q.question for q in questions], max_new_tokens=max_new_tokens,
                             batch_size=batch_size)
    replies = [{"question": q.question, "answers": list(q.answers), "reply": reply, "correct": q.scores(reply)}
               for q, reply in zip(questions, texts)]
    correct = sum(r["correct"] for r in replies)
    logger.info("recall probe: %d / %d questions answered", correct, len(replies))
    return RecallResult(probe=name, num_questions=len(replies), num_correct=correct, max_new_tokens=max_new_tokens,
                        chat_template=has_chat_template(tokenizer), replies=replies)


__all__ = ["RecallQuestion", "RecallResult", "load_questions", "prompt_for", "recall_probe"]
