"""The data layer: name a text source with one string, read it, pack it into token sequences.

See :mod:`lorashear.data.spec` for the ``--data SPEC`` grammar, :mod:`lorashear.data.builtin`
for the offline corpora (``builtin:calibration``, ``builtin:heldout``,
``builtin:instructions`` and one name per source) and DATA.md for their origin.

    from lorashear.data import load_texts, pack_texts
    texts = load_texts("builtin:calibration", max_texts=64)
    batch = pack_texts(texts, tokenizer, seq_len=512, num_sequences=32, seed=0)  # (32, 512)
"""

from __future__ import annotations

from .builtin import BUILTIN_ALIASES, BUILTIN_SOURCES, builtin_names, prepare_builtin_data
from .instructions import format_conversation, format_instruction
from .loading import check_texts, describe, load_conversations, load_texts
from .packing import pack_texts
from .spec import DataSpec, parse_data_spec

__all__ = [
    "BUILTIN_ALIASES",
    "BUILTIN_SOURCES",
    "DataSpec",
    "builtin_names",
    "check_texts",
    "describe",
    "format_conversation",
    "format_instruction",
    "load_conversations",
    "load_texts",
    "pack_texts",
    "parse_data_spec",
    "prepare_builtin_data",
]
