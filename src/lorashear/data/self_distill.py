"""Self-distilled chat data: the dense model's own replies to chat prompts, mixed into the training stream.

A pruned instruct model trained on plain text drifts from its chat behaviour (it loops, or answers with
invented facts) although its perplexity on running text stays close. Self-data distillation (Thangarasa et
al., 2024, "Self-Data Distilled Fine-Tuning") keeps it: the model before pruning answers a set of prompts,
and those conversations, rendered with the tokenizer's chat template, become part of what the pruned model
trains on, so it learns its own former replies rather than someone else's.

Prompts come from the training splits only: the first user turn of every ``chatterbot`` conversation
(``train``) and "Tell me about TITLE." for every ``wikipedia`` ``train`` article. Nothing is taken from the
held-out documents or from the recall probe (``tests/test_self_distill.py`` checks that no prompt is one of
its questions). Replies are greedy; they are cached under ``$LORASHEAR_CACHE/self_chat`` by the model's
content, the prompts and the reply length, so benchmark rows and resumed runs generate them once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from typing import TYPE_CHECKING

import torch

from ..atomic import atomic_write_json
from ..errors import ConfigError, DataError
from ..paths import cache_root
from .builtin import load_builtin_documents
from .instructions import format_conversation

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

CACHE_DIR = "self_chat"
#: bump when the prompts or the rendering change, so cached conversations are not reused
FORMAT_VERSION = 1


def self_chat_prompts(num: int, seed: int = 0) -> list[str]:
    """``num`` prompts (all of them if fewer exist), drawn with ``seed`` from the training splits."""
    if num < 1:
        raise ConfigError(f"chat_prompts must be >= 1, got {num}")
    prompts: list[str] = []
    seen: set[str] = set()
    for doc in load_builtin_documents("chatterbot", "train"):
        first = next((m["content"].strip() for m in doc["messages"] if m["role"] == "user"), "")
        if first and first.lower() not in seen:
            seen.add(first.lower())
            prompts.append(first)
    for doc in load_builtin_documents("wikipedia", "train"):
        prompts.append(f"Tell me about {doc['id']}.")
    random.Random(seed).shuffle(prompts)
    return prompts[:num]


def cache_key(model_id: str, prompts: list[str], max_new_tokens: int) -> str:
    blob = json.dumps({"v": FORMAT_VERSION, "model": model_id, "prompts": prompts, "max_new_tokens": max_new_tokens})
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def self_distilled_texts(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: list[str], *,
                         max_new_tokens: int, model_id: str | None = None, batch_size: int = 16) -> list[str]:
    """The conversations (prompt, the model's greedy reply) rendered as training texts.

    With ``model_id`` (the model's content identity) they are cached and read back on the next call.
    Replies that come back empty are dropped.
    """
    from ..models.generation import generate_replies

    path = cache_root() / CACHE_DIR / f"{cache_key(model_id, prompts, max_new_tokens)}.json" if model_id else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text(encoding="utf-8"))
            conversations = cached["conversations"]
            logger.info("self-distilled chat: %d conversations from %s", len(conversations), path)
            return [format_conversation(c, tokenizer) for c in conversations]
        except (OSError, ValueError, KeyError) as exc:
            logger.warning("self-distilled chat cache %s unreadable (%s); generating again", path, exc)
    logger.info("self-distilled chat: the dense model answers %d prompts (at most %d tokens each)",
                len(prompts), max_new_tokens)
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(prompts, replies) if r]
    if not conversations:
        raise DataError(f"the model gave no non-empty reply to {len(prompts)} chat prompts; --chat-share needs a "
                        "model that answers chat prompts (an instruct model), or --chat-share 0")
    if path is not None:
        atomic_write_json(path, {"model": model_id, "max_new_tokens": max_new_tokens, "version": FORMAT_VERSION,
                                 "conversations": conversations})
    return [format_conversation(c, tokenizer) for c in conversations]


def mix_in(base: torch.Tensor, extra: torch.Tensor, share: float) -> torch.Tensor:
    """``base`` with ``round(share * N)`` evenly spaced rows replaced by rows of ``extra`` (cycled in order).

    The training loop draws rows through a seeded permutation of all ``N``, so about ``share`` of the rows
    any run reads are ``extra``'s. ``share`` 0 returns ``base`` unchanged.
    """
    if not 0.0 <= share < 1.0:
        raise ConfigError(f"chat_share must be in [0, 1), got {share}")
    n = base.shape[0]
    m = round(share * n)
    if m == 0:
        return base
    if extra.shape[0] == 0 or extra.shape[1] != base.shape[1]:
        raise ConfigError(f"the chat sequences must be (M > 0, {base.shape[1]}), got {tuple(extra.shape)}")
    out = base.clone()
    positions = torch.tensor([(i * n) // m for i in range(m)], dtype=torch.long)
    out[positions] = extra[torch.arange(m) % extra.shape[0]]
    return out


__all__ = ["cache_key", "mix_in", "self_chat_prompts", "self_distilled_texts"]
