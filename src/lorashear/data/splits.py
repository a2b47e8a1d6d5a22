"""Deterministic train/validation split by document.

A document's side depends only on its identifier, never on the order or the
number of other documents, so a held-out document stays held out when a
corpus grows. Documents are ranked by the SHA-256 of their identifier and the
first ``ceil(fraction * n)`` go to validation (at least one, when there are
two or more documents).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

from ..errors import DataError
from .spec import SPLITS

T = TypeVar("T")
VALIDATION_FRACTION = 0.1


def document_key(doc_id: str) -> str:
    """Stable sort key of a document identifier."""
    return hashlib.sha256(doc_id.encode("utf-8")).hexdigest()


def split_documents(ids: Sequence[str], fraction: float = VALIDATION_FRACTION) -> tuple[set[str], set[str]]:
    """Return ``(train_ids, validation_ids)``; the two sets are disjoint and cover ``ids``."""
    unique = sorted(set(ids), key=document_key)
    if len(unique) < 2:
        return set(unique), set()
    n_val = min(len(unique) - 1, max(1, math.ceil(fraction * len(unique))))
    return set(unique[n_val:]), set(unique[:n_val])


def select_split(items: Sequence[T], ids: Sequence[str], split: str) -> list[T]:
    """Keep the ``items`` whose identifier falls in ``split`` (input order preserved)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    train, validation = split_documents(ids)
    wanted = train if split == "train" else validation
    return [item for item, doc_id in zip(items, ids) if doc_id in wanted]
