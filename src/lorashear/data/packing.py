"""Pack texts into fixed-length token sequences.

Documents are shuffled with a seeded generator, tokenised without special
tokens, joined with the EOS token and cut into ``seq_len`` windows; the last
partial window is dropped. Example with ``seq_len=4``, documents ``[a b c]``
and ``[d e]`` (after shuffling) and EOS ``<e>``::

    a b c <e> d e <e>  ->  [[a, b, c, <e>]]      (the 3 leftover tokens are dropped)
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_BATCH = 64  # documents tokenised per call


def pack_texts(
    texts: list[str],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    *,
    num_sequences: int | None = None,
    seed: int = 0,
    add_eos: bool = True,
) -> torch.LongTensor:
    """Tokenise, shuffle (seeded), join with EOS and pack ``texts`` into ``[N, seq_len]``.

    Args:
        texts: documents.
        tokenizer: a Hugging Face tokenizer.
        seq_len: tokens per sequence.
        num_sequences: how many sequences to return (default: as many as fit).
            Only the documents needed are tokenised. When the text is too short
            for this many, the sequences that fit are returned with a warning.
        seed: shuffle seed; the same texts, tokenizer and seed give the same tensor.
        add_eos: append the tokenizer's EOS token after every document.

    Returns:
        ``torch.long`` tensor of shape ``(N, seq_len)``.

    Raises:
        ConfigError: ``seq_len`` or ``num_sequences`` below 1, or ``add_eos`` with
            a tokenizer that has no EOS token.
        DataError: no texts, or not enough tokens for one sequence.
    """
    if seq_len < 1:
        raise ConfigError(f"seq_len must be at least 1, got {seq_len}")
    if num_sequences is not None and num_sequences < 1:
        raise ConfigError(f"num_sequences must be at least 1, got {num_sequences}")
    docs = [t for t in texts if t and t.strip()]
    if not docs:
        raise DataError("no text to pack: the data source produced no non-empty texts")
    eos: list[int] = []
    if add_eos:
        if tokenizer.eos_token_id is None:
            raise ConfigError("the tokenizer has no EOS token; pass add_eos=False")
        eos = [int(tokenizer.eos_token_id)]

    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(docs), generator=generator).tolist()
    wanted = None if num_sequences is None else num_sequences * seq_len
    stream: list[int] = []
    for start in range(0, len(order), _BATCH):
        batch = [docs[i] for i in order[start : start + _BATCH]]
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            stream.extend(ids)
            stream.extend(eos)
        if wanted is not None and len(stream) >= wanted:
            break

    available = len(stream) // seq_len
    if available == 0:
        raise DataError(f"not enough text for one sequence of {seq_len} tokens: {len(docs)} texts give "
                        f"{len(stream)} tokens")
    n = available if num_sequences is None else min(num_sequences, available)
    if num_sequences is not None and n < num_sequences:
        logger.warning("only %d of the %d requested sequences of %d tokens fit in the text", n, num_sequences,
                       seq_len)
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)  # (N, seq_len)
