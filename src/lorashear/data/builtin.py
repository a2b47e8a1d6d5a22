"""Built-in offline corpora (``builtin:NAME``), prepared from installed packages.

Sources (one name each, split by document into ``train``, ``validation`` and
``test``, see :mod:`.splits`; ``heldout`` reads ``validation`` and ``test``
together; evaluation-only sources hold every document out):

================  ======================================================  ==============
name              content                                                 kind
================  ======================================================  ==============
austen            Jane Austen's six novels, one document per chapter      books
wikipedia         English Wikipedia articles (a 2017 dump excerpt)        encyclopedia
debian-handbook   The Debian Administrator's Handbook, one page per doc   technical book
chatterbot        ChatterBot English dialogues (user/assistant turns)     instructions
python-docs       Python 3.11 Tutorial and HOWTOs, one page per doc       evaluation only
================  ======================================================  ==============

Aliases other modules rely on:

- ``builtin:calibration``: the ``train`` split of austen, wikipedia and
  debian-handbook, interleaved document by document;
- ``builtin:heldout-validation`` / ``builtin:heldout-test``: the ``validation`` /
  ``test`` split of austen and wikipedia (prose only) - never overlapping
  ``calibration``, because all take whole documents from the same deterministic
  split; ``builtin:heldout`` reads both halves (the protocol of earlier figures);
- ``builtin:instructions``: the chatterbot ``train`` split rendered with the
  plain instruction template;
- ``builtin:heldout-docs-validation`` / ``builtin:heldout-docs-test``: the two
  halves of python-docs (prose only), a second held-out perplexity source from
  another author and domain than every training corpus; ``builtin:heldout-docs``
  reads all of it.

Evaluation-only sources (``evaluation_only=True``: python-docs) have an empty
``train`` split (every document is held out), refuse ``split=train`` and are never part of a ``train``
alias. :func:`prepare_builtin_data` with no names only warns when one of
them cannot be prepared (nothing trains on it, so set-up goes on); naming it,
or loading it, raises the usual :class:`~lorashear.errors.DataError`.

:func:`prepare_builtin_data` extracts and cleans every source once into
``cache_root()/data/builtin-v2/NAME/{train,heldout}.jsonl`` with a
``manifest.json`` (origin, licence, counts); each source directory is written
atomically. Loading a built-in prepares it lazily when needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import chain, zip_longest
from pathlib import Path
from typing import Any

from ..atomic import atomic_directory, atomic_write_json
from ..errors import DataError
from ..paths import cache_root
from . import extract
from .extract import PackageRef
from .instructions import format_conversation
from .spec import SPLITS
from .splits import HELDOUT, heldout_part, split_documents, split_of

logger = logging.getLogger(__name__)

CACHE_VERSION = 2
#: the files a prepared source holds (``validation`` and ``test`` are read from ``heldout``)
STORED_SPLITS = ("train", HELDOUT)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class BuiltinSource:
    """One built-in corpus: where it comes from and how to extract it."""

    name: str
    description: str
    kind: str  # "text" or "instructions"
    package: PackageRef
    extractor: Callable[[Path], list[dict[str, Any]]]
    #: every document goes to ``validation``; the source can never be read as training data
    evaluation_only: bool = False


BUILTIN_SOURCES: dict[str, BuiltinSource] = {
    source.name: source
    for source in (
        BuiltinSource(
            "austen", "Jane Austen's six completed novels (Project Gutenberg texts), one document per chapter",
            "text",
            PackageRef("apt", "r-cran-janeaustenr", "/usr/lib/R/site-library/janeaustenr/data",
                       "novels: public domain; package: MIT"),
            extract.extract_austen),
        BuiltinSource(
            "wikipedia", "English Wikipedia articles from a 2017 dump excerpt, one document per article",
            "text",
            PackageRef("pip", "gensim",
                       "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
                       "text: CC BY-SA 3.0 (Wikipedia contributors); package: LGPL-2.1", pin="4.4.0"),
            extract.extract_wikipedia),
        BuiltinSource(
            "debian-handbook", "The Debian Administrator's Handbook (English HTML), one document per page",
            "text",
            PackageRef("apt", "debian-handbook", "/usr/share/doc/debian-handbook/html/en-US",
                       "GPL-2.0+ or CC BY-SA 3.0 (Raphael Hertzog, Roland Mas)"),
            extract.extract_debian_handbook),
        BuiltinSource(
            "chatterbot", "ChatterBot English dialogue corpus, one conversation per document",
            "instructions",
            PackageRef("pip", "chatterbot-corpus", "chatterbot_corpus/data/english", "BSD-3-Clause", pin="1.3.3"),
            extract.extract_chatterbot),
        BuiltinSource(
            "python-docs", "Python 3.11 documentation: the Tutorial and the HOWTOs (English HTML), prose paragraphs "
            "only, one document per page; evaluation only",
            "text",
            PackageRef("apt", "python3.11-doc", "/usr/share/doc/python3.11/html",
                       "PSF-2.0 (Python Software Foundation License; Guido van Rossum and others)"),
            extract.extract_python_docs, evaluation_only=True),
    )
}

_PROSE = ("austen", "wikipedia")
#: Alias -> (sources, fixed split).
BUILTIN_ALIASES: dict[str, tuple[tuple[str, ...], str]] = {
    "calibration": (("austen", "wikipedia", "debian-handbook"), "train"),
    "heldout-validation": (_PROSE, "validation"),  # every choice is made here
    "heldout-test": (_PROSE, "test"),  # reported figures only
    "heldout": (_PROSE, HELDOUT),  # both halves: the protocol of the figures before 2026-12-04
    "instructions": (("chatterbot",), "train"),
    "heldout-docs-validation": (("python-docs",), "validation"),
    "heldout-docs-test": (("python-docs",), "test"),
    "heldout-docs": (("python-docs",), HELDOUT),  # all of python-docs (evaluation-only source)
}


def builtin_names() -> list[str]:
    """Every name accepted after ``builtin:``."""
    return [*BUILTIN_ALIASES, *BUILTIN_SOURCES]


def builtin_dir() -> Path:
    return cache_root() / "data" / f"builtin-v{CACHE_VERSION}"


def _manifest(name: str) -> dict[str, Any] | None:
    path = builtin_dir() / name / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _prepare_source(source: BuiltinSource, force: bool) -> Path:
    target = builtin_dir() / source.name
    path, version = extract.locate(source.package)
    manifest = _manifest(source.name)
    if not force and manifest is not None and manifest.get("origin", {}).get("version") == version:
        return target
    logger.info("preparing builtin:%s from %s %s", source.name, source.package.name, version)
    docs = source.extractor(path)
    if not docs:
        raise DataError(f"{source.package.name} {version} produced no documents for builtin:{source.name}")
    if source.evaluation_only:
        train_ids, heldout_ids = set(), {d["id"] for d in docs}
    else:
        train_ids, heldout_ids = split_documents([d["id"] for d in docs])
    counts: dict[str, dict[str, int]] = {}
    with atomic_directory(target) as tmp:
        for split, ids in (("train", train_ids), (HELDOUT, heldout_ids)):
            chosen = [d for d in docs if d["id"] in ids]
            lines = [json.dumps(d, ensure_ascii=False) for d in chosen]
            (tmp / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
            counts[split] = _count(chosen)
        for half in ("validation", "test"):
            part = heldout_part(sorted(heldout_ids), half)
            counts[half] = _count([d for d in docs if d["id"] in part])
        atomic_write_json(tmp / MANIFEST, {
            "cache_version": CACHE_VERSION,
            "name": source.name,
            "description": source.description,
            "kind": source.kind,
            "evaluation_only": source.evaluation_only,
            "origin": {"manager": source.package.manager, "package": source.package.name, "version": version,
                       "path": source.package.path, "licence": source.package.licence},
            "splits": counts,
        })
    logger.info("builtin:%s ready: %s", source.name, counts)
    return target


def _count(docs: Sequence[dict[str, Any]]) -> dict[str, int]:
    return {"documents": len(docs), "words": sum(_words(d) for d in docs)}


def _words(doc: dict[str, Any]) -> int:
    if "messages" in doc:
        return sum(len(m["content"].split()) for m in doc["messages"])
    return len(doc["text"].split())


def prepare_builtin_data(names: Iterable[str] | None = None, *, force: bool = False) -> dict[str, Path]:
    """Extract the built-in corpora into the cache (idempotent; the set-up script calls it).

    Args:
        names: sources or aliases to prepare (default: all).
        force: rebuild even when an up-to-date copy exists.

    Returns:
        source name -> cache directory.

    Raises:
        DataError: a source package is missing (the message says what to install)
            or produced no text. All missing packages are named in one message.
            With ``names=None`` an evaluation-only source that fails is only
            logged (and left out of the result): it never blocks set-up or the
            training sources.
    """
    wanted = _expand(names if names is not None else list(BUILTIN_SOURCES))
    ready: dict[str, Path] = {}
    problems: list[str] = []
    for name in wanted:
        try:
            ready[name] = _prepare_source(BUILTIN_SOURCES[name], force)
        except DataError as exc:
            if names is None and BUILTIN_SOURCES[name].evaluation_only:
                logger.warning("builtin:%s (evaluation only) not prepared: %s", name, exc)
                continue
            problems.append(f"builtin:{name}: {exc}")
    if problems:
        raise DataError("; ".join(problems))
    return ready


def _expand(names: Iterable[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        sources = BUILTIN_ALIASES[name][0] if name in BUILTIN_ALIASES else (_check_name(name),)
        out.extend(s for s in sources if s not in out)
    return out


def _check_name(name: str) -> str:
    if name not in BUILTIN_SOURCES and name not in BUILTIN_ALIASES:
        raise DataError(f"unknown built-in data {name!r}; choose one of: {', '.join(builtin_names())}")
    return name


def resolve_builtin(name: str, split: str | None) -> tuple[tuple[str, ...], str]:
    """Return the sources and split that ``builtin:NAME[:split=...]`` reads."""
    _check_name(name)
    if name in BUILTIN_ALIASES:
        sources, fixed = BUILTIN_ALIASES[name]
        if split is not None and split != fixed:
            half = f"{name}-{split}"
            if half in BUILTIN_ALIASES:
                raise DataError(f"builtin:{name} is always the {fixed} split; use builtin:{half} for its {split} half")
            if any(BUILTIN_SOURCES[s].evaluation_only for s in sources):
                raise DataError(f"builtin:{name} is always the {fixed} split: it reads evaluation-only data "
                                f"({', '.join(sources)}) that has no {split!r} split")
            raise DataError(f"builtin:{name} is always the {fixed} split; for other splits name a source, "
                            f"e.g. builtin:{sources[0]}:split={split}")
        return sources, fixed
    if BUILTIN_SOURCES[name].evaluation_only:
        if split == "train":
            raise DataError(f"builtin:{name} is evaluation-only: every document is held out "
                            f"(split=validation, split=test, or all of it with builtin:{name}), never 'train'")
        return (name,), split_of(split) if split is not None else HELDOUT
    if split is not None and split not in SPLITS:
        raise DataError(f"unknown split {split!r} for builtin:{name}; use one of {', '.join(SPLITS)}")
    return (name,), split or "train"


def load_builtin_documents(name: str, split: str | None = None) -> list[dict[str, Any]]:
    """Documents of ``builtin:NAME`` (several sources are interleaved one document at a time)."""
    sources, split = resolve_builtin(name, split)
    per_source = []
    for source in sources:
        directory = builtin_dir() / source
        if _manifest(source) is None:
            directory = prepare_builtin_data([source])[source]
        stored = "train" if split == "train" else HELDOUT
        with (directory / f"{stored}.jsonl").open(encoding="utf-8") as fh:
            docs = [json.loads(line) for line in fh if line.strip()]
        if split not in STORED_SPLITS:
            part = heldout_part([d["id"] for d in docs], split)
            docs = [d for d in docs if d["id"] in part]
        per_source.append(docs)
    return [d for d in chain.from_iterable(zip_longest(*per_source)) if d is not None]


def load_builtin_texts(name: str, split: str | None = None) -> list[str]:
    """Texts of ``builtin:NAME``; instruction sources are rendered with the plain template."""
    return [format_conversation(d["messages"]) if "messages" in d else d["text"]
            for d in load_builtin_documents(name, split)]


def builtin_origin(name: str, split: str | None = None) -> list[dict[str, Any]]:
    """Origin records (package, version, path, licence, split) of ``builtin:NAME``."""
    sources, split = resolve_builtin(name, split)
    out = []
    for source in sources:
        manifest = _manifest(source) or {}
        ref = BUILTIN_SOURCES[source].package
        origin = manifest.get("origin") or {"manager": ref.manager, "package": ref.name, "path": ref.path,
                                             "licence": ref.licence}
        out.append({"source": source, "split": split, **origin})
    return out


def builtin_document_ids(name: str, split: str | None = None) -> Sequence[str]:
    """Qualified ids (``source/doc``) of the documents ``builtin:NAME`` reads."""
    sources, split = resolve_builtin(name, split)
    ids = []
    for source in sources:
        ids.extend(f"{source}/{d['id']}" for d in load_builtin_documents(source, split))
    return ids
