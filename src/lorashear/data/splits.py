"""Deterministic train / validation / test split by document.

A document's side depends only on its identifier, never on the order or the
number of other documents, so a held-out document stays held out when a
corpus grows. Two independent rankings decide it:

1. documents are ranked by the SHA-256 of their identifier and the first
   ``ceil(fraction * n)`` are *held out* (at least one, when there are two or
   more documents); the rest are ``train``. This is the split of every earlier
   version, so training data and models trained on it stay valid;
2. the held-out documents are ranked again by the SHA-256 of
   ``"test/" + identifier``; the first ``floor(h / 2)`` are ``test``, the
   rest ``validation``.

``validation`` is for every choice (recipe options, ablations, recovery's
adaptive weights, early stopping); ``test`` only for reported figures;
``heldout`` is both halves together (what ``validation`` meant before the
held-out documents were split, kept so earlier figures can be reproduced).

Worked example: 20 documents -> 2 held out -> 1 ``validation`` + 1 ``test``;
3 documents -> 1 held out -> 1 ``validation`` + 0 ``test``.
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
#: the held-out halves, and the pseudo-split that reads both
HELDOUT_HALVES = ("validation", "test")
HELDOUT = "heldout"


def document_key(doc_id: str, salt: str = "") -> str:
    """Stable sort key of a document identifier (``salt`` gives an independent ranking)."""
    return hashlib.sha256((salt + doc_id).encode("utf-8")).hexdigest()


def split_documents(ids: Sequence[str], fraction: float = VALIDATION_FRACTION) -> tuple[set[str], set[str]]:
    """Return ``(train_ids, heldout_ids)``; the two sets are disjoint and cover ``ids``."""
    unique = sorted(set(ids), key=document_key)
    if len(unique) < 2:
        return set(unique), set()
    n_val = min(len(unique) - 1, max(1, math.ceil(fraction * len(unique))))
    return set(unique[n_val:]), set(unique[:n_val])


def split_heldout(ids: Sequence[str]) -> tuple[set[str], set[str]]:
    """Split held-out document ids into ``(validation_ids, test_ids)`` (``test`` gets ``floor(n / 2)``)."""
    unique = sorted(set(ids), key=lambda i: document_key(i, "test/"))
    n_test = len(unique) // 2
    return set(unique[n_test:]), set(unique[:n_test])


def split_of(split: str) -> str:
    """Validate a split name (one of :data:`~lorashear.data.spec.SPLITS`) and return it."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    return split


def heldout_part(heldout_ids: Sequence[str], split: str) -> set[str]:
    """The ids of ``split`` (``heldout``, ``validation`` or ``test``) among held-out document ids."""
    if split == HELDOUT:
        return set(heldout_ids)
    validation, test = split_heldout(heldout_ids)
    return validation if split == "validation" else test


def select_split(items: Sequence[T], ids: Sequence[str], split: str) -> list[T]:
    """Keep the ``items`` whose identifier falls in ``split`` (input order preserved)."""
    train, heldout = split_documents(ids)
    wanted = train if split_of(split) == "train" else heldout_part(sorted(heldout), split)
    return [item for item, doc_id in zip(items, ids) if doc_id in wanted]
