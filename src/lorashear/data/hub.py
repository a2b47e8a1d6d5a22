"""Texts from a Hugging Face hub data set through ``datasets.load_dataset``.

This is the real loading code; on a machine without access to the hub it
fails, and the failure is turned into a :class:`~lorashear.errors.DataError`
that says what to do instead.
"""

from __future__ import annotations

import logging

from ..errors import DataError
from .instructions import format_conversation, record_to_messages

logger = logging.getLogger(__name__)

DEFAULT_SPLIT = "train"
DEFAULT_FIELD = "text"


def read_hub(path: str, *, config: str | None, split: str | None, field: str | None,
             max_texts: int | None = None) -> list[str]:
    """Load ``split`` of hub data set ``path`` and return the ``field`` strings."""
    import datasets

    split = split or DEFAULT_SPLIT
    try:
        dataset = datasets.load_dataset(path, name=config, split=split)
    except Exception as exc:  # datasets raises many types: offline, not found, bad config, bad split
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"could not load hub data set {path!r} (config={config}, split={split}): {reason}. "
            "Without network access to the hub, save the data as jsonl/parquet where it is reachable and "
            "pass the file, or use an offline corpus such as builtin:calibration"
        ) from exc
    if max_texts is not None:
        dataset = dataset.select(range(min(max_texts, len(dataset))))
    key = field or DEFAULT_FIELD
    if key in dataset.column_names:
        return [t for t in dataset[key] if isinstance(t, str) and t.strip()]
    if field is None:
        texts = []
        for record in dataset:
            messages = record_to_messages(record)
            if messages is None:
                break
            texts.append(format_conversation(messages))
        else:
            return texts
    raise DataError(f"hub data set {path!r} has no column {key!r} (columns: {', '.join(dataset.column_names)}); "
                    "choose one with :field=NAME")
