"""Greedy replies of a causal LM to chat prompts, batched and left-padded.

The recall probe asks its questions this way, and the self-distilled chat data
(:mod:`lorashear.data.self_distill`) is the dense model's replies made this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_for(question: str, tokenizer: PreTrainedTokenizerBase) -> str:
    """The text given to the model for a user turn: the tokenizer's chat template with the assistant's turn
    opened, else a plain ``Question: ... Answer:``."""
    if has_chat_template(tokenizer):
        return str(tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True))
    return f"Question: {question}\nAnswer:"


def generate_replies(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
                     max_new_tokens: int, batch_size: int = 16) -> list[str]:
    """The model's greedy reply to every user turn in ``questions`` (special tokens dropped, stripped).

    Batches of ``batch_size`` prompts are left-padded; the model is put in eval mode for the call and
    restored after.
    """
    import torch

    chat = has_chat_template(tokenizer)
    prompts = [prompt_for(q, tokenizer) for q in questions]
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    device = next(model.parameters()).device
    replies: list[str] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompts), batch_size):
            ids = [tokenizer(text, add_special_tokens=not chat)["input_ids"] for text in prompts[start:start + batch_size]]
            width = max(len(i) for i in ids)
            input_ids = torch.tensor([[pad_id] * (width - len(i)) + i for i in ids], device=device)
            mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=device)
            with torch.no_grad():
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                     do_sample=False, pad_token_id=pad_id)
            replies.extend(tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:].tolist())
    finally:
        model.train(was_training)
    return replies


__all__ = ["generate_replies", "has_chat_template", "prompt_for"]
