"""Turn a data spec into texts, and describe a spec for reports."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from ..errors import DataError
from .builtin import builtin_origin, load_builtin_documents, load_builtin_texts
from .hub import read_hub
from .instructions import Message, record_to_messages
from .local import read_local, read_local_records
from .spec import DataSpec, parse_data_spec
from .splits import select_split

logger = logging.getLogger(__name__)


def load_texts(spec: str | DataSpec, *, split: str | None = None, max_texts: int | None = None) -> list[str]:
    """Read the texts a data spec names (see :mod:`lorashear.data.spec` for the grammar).

    Args:
        spec: a ``--data`` string or a parsed :class:`DataSpec`.
        split: overrides the spec's ``split`` option. Local files: ``None`` reads
            everything, ``train``/``validation`` a deterministic 90/10 split by
            document. Built-ins: see :mod:`lorashear.data.builtin`. Hub: any split name.
        max_texts: keep at most this many texts (the first ones, in a deterministic order).

    Raises:
        DataError: the source is missing or unreadable, or produced no text.
    """
    parsed = parse_data_spec(spec).with_split(split)
    if max_texts is not None and max_texts < 1:
        raise DataError(f"max_texts must be at least 1, got {max_texts}")
    if parsed.kind == "builtin":
        texts = load_builtin_texts(parsed.source, parsed.split)
        if parsed.field is not None:
            raise DataError(f"builtin:{parsed.source} takes no field= option")
    elif parsed.kind == "hf":
        texts = read_hub(parsed.source, config=parsed.config, split=parsed.split, field=parsed.field,
                         max_texts=max_texts)
    else:
        pairs = read_local(parsed.source, parsed.field)
        if parsed.split is not None:
            pairs = select_split(pairs, [doc_id for doc_id, _ in pairs], parsed.split)
        texts = [text for _, text in pairs]
    if max_texts is not None:
        texts = texts[:max_texts]
    if not texts:
        raise DataError(f"data {parsed} produced no text")
    logger.info("loaded %d texts from %s", len(texts), parsed)
    return texts


def check_texts(spec: str | DataSpec) -> None:
    """A data spec checked before any work, without the network: its grammar, and that a built-in or
    local source reads as text (missing, empty or binary: one line). A hub source is read by the stage."""
    parsed = parse_data_spec(spec)
    if parsed.kind != "hf":
        load_texts(parsed)


def describe(spec: str | DataSpec, *, split: str | None = None, max_texts: int | None = None) -> dict[str, Any]:
    """The data protocol of a spec, for reports: what was read, from where, how much.

    Returns a JSON-serialisable dict with ``spec``, ``kind``, ``source``,
    ``split``, ``field``, ``num_texts``, ``num_words``, ``sha256`` (of the texts,
    to detect silent changes) and ``origin`` (package, version, path, licence
    for built-ins; the resolved path for local files; the hub id for ``hf:``).
    """
    parsed = parse_data_spec(spec).with_split(split)
    texts = load_texts(parsed, max_texts=max_texts)
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8"))
        digest.update(b"\x00")
    if parsed.kind == "builtin":
        origin: Any = builtin_origin(parsed.source, parsed.split)
        effective_split = origin[0]["split"]
    elif parsed.kind == "hf":
        origin = {"hub_dataset": parsed.source, "config": parsed.config}
        effective_split = parsed.split or "train"
    else:
        origin = {"path": str(Path(parsed.source).expanduser().resolve())}
        effective_split = parsed.split or "all"
    return {
        "spec": str(parsed),
        "kind": parsed.kind,
        "source": parsed.source,
        "split": effective_split,
        "field": parsed.field,
        "max_texts": max_texts,
        "num_texts": len(texts),
        "num_words": sum(len(t.split()) for t in texts),
        "sha256": digest.hexdigest(),
        "origin": origin,
    }



def load_conversations(spec: str | DataSpec, *, split: str | None = None,
                       max_items: int | None = None) -> list[list[Message]]:
    """Read instruction data as chat messages, to be rendered with a model's chat template.

    Works for ``builtin:instructions`` / ``builtin:chatterbot`` and for local
    json/jsonl files whose records have ``messages`` or prompt/response keys
    (see :mod:`lorashear.data.instructions`).

    Raises:
        DataError: the source is not instruction data, or holds none.
    """
    parsed = parse_data_spec(spec).with_split(split)
    if parsed.kind == "builtin":
        docs = load_builtin_documents(parsed.source, parsed.split)
        conversations = [d["messages"] for d in docs if "messages" in d]
        if len(conversations) != len(docs):
            raise DataError(f"{parsed} is plain text, not instruction data; try builtin:instructions")
    elif parsed.kind == "local":
        records = read_local_records(parsed.source)
        ids = [doc_id for doc_id, _ in records]
        if parsed.split is not None:
            records = select_split(records, ids, parsed.split)
        conversations = []
        for doc_id, record in records:
            messages = record_to_messages(record) if isinstance(record, dict) else None
            if messages is None:
                raise DataError(f"{doc_id}: not an instruction record (need messages, or prompt and response keys)")
            conversations.append(messages)
    else:
        raise DataError("instruction data from hf: specs is not supported; save it as jsonl and pass the file")
    if max_items is not None:
        conversations = conversations[:max_items]
    if not conversations:
        raise DataError(f"data {parsed} holds no instruction examples")
    return conversations
