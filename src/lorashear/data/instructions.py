"""Instruction data (prompt/response pairs, chat messages) rendered to text.

With a tokenizer that has a chat template, :func:`format_conversation` uses
``tokenizer.apply_chat_template``; otherwise (or with no tokenizer) it uses the
plain template::

    ### Instruction:
    {prompt}

    ### Response:
    {response}

Records are recognised by their keys: ``messages`` (a list of
``{"role", "content"}``), or one of the prompt keys with one of the response
keys below (Alpaca's ``input`` is appended to the instruction).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Message = dict[str, str]
PROMPT_KEYS = ("prompt", "instruction", "question", "query")
RESPONSE_KEYS = ("response", "output", "answer", "completion")
PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"


def record_to_messages(record: Mapping[str, Any]) -> list[Message] | None:
    """Turn an instruction record into chat messages, or ``None`` if it is not one."""
    messages = record.get("messages")
    if isinstance(messages, list) and messages:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt_key = next((k for k in PROMPT_KEYS if isinstance(record.get(k), str)), None)
    response_key = next((k for k in RESPONSE_KEYS if isinstance(record.get(k), str)), None)
    if prompt_key is None or response_key is None:
        return None
    prompt = record[prompt_key].strip()
    extra = record.get("input")
    if isinstance(extra, str) and extra.strip():
        prompt = f"{prompt}\n\n{extra.strip()}"
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record[response_key].strip()}]


def format_conversation(messages: Sequence[Message], tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Render chat messages as one training text.

    Uses the tokenizer's chat template when it has one, else the plain
    template (user turns as instructions, assistant turns as responses).
    """
    if not messages:
        raise DataError("an instruction example has no messages")
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return str(tokenizer.apply_chat_template(list(messages), tokenize=False))
    blocks = []
    for message in messages:
        role, content = message["role"], message["content"]
        if role == "system":
            blocks.append(content)
        elif role == "user":
            blocks.append(f"### Instruction:\n{content}")
        else:
            blocks.append(f"### Response:\n{content}")
    return "\n\n".join(blocks)


def format_instruction(prompt: str, response: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """Render one prompt/response pair (see :func:`format_conversation`)."""
    return format_conversation([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                               tokenizer)
