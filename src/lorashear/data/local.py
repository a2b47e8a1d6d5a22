"""Read texts from local files and folders (txt, jsonl, json, parquet).

- ``.txt``: one text per blank-line-separated paragraph.
- ``.jsonl``: one record per line; ``.json``: a list of records (or an object
  holding one such list). A record is a string, or an object whose ``field``
  (default ``text``) is the text; objects without it that look like
  instruction data (see :mod:`.instructions`) are rendered with the plain template.
- ``.parquet``: the ``field`` column (read with ``pyarrow``).
- a folder: every such file below it, in sorted path order.

Each text gets a document id (``file#index``) used for deterministic splits.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import DataError
from .instructions import format_conversation, record_to_messages

logger = logging.getLogger(__name__)

SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
DEFAULT_FIELD = "text"
_PARAGRAPH = re.compile(r"\n\s*\n")


def read_local(path: str | Path, field: str | None = None) -> list[tuple[str, str]]:
    """Return ``(doc_id, text)`` pairs from a local file or folder.

    Raises:
        DataError: the path does not exist, has an unsupported type, or a
            record lacks ``field``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file or folder {path} does not exist")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"folder {path} holds no {'/'.join(s[1:] for s in SUFFIXES)} files")
        out: list[tuple[str, str]] = []
        for file in files:
            out.extend(_read_file(file, field, name=file.relative_to(path).as_posix()))
        return out
    return _read_file(path, field, name=path.name)


def read_local_records(path: str | Path) -> list[tuple[str, Any]]:
    """Return ``(doc_id, record)`` pairs from local json/jsonl files (a file or a folder of them)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data file or folder {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in (".json", ".jsonl")) if path.is_dir() else [path]
    out: list[tuple[str, Any]] = []
    for file in files:
        name = file.relative_to(path).as_posix() if path.is_dir() else file.name
        if file.suffix.lower() == ".jsonl":
            records: Iterable[Any] = _jsonl_records(file)
        elif file.suffix.lower() == ".json":
            records = _json_records(file)
        else:
            raise DataError(f"{file}: records are read from .json or .jsonl files, not {file.suffix or '(none)'}")
        out.extend((f"{name}#{i}", record) for i, record in enumerate(records))
    if not out:
        raise DataError(f"{path} holds no json/jsonl records")
    return out


def _read_file(path: Path, field: str | None, name: str) -> list[tuple[str, str]]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            raw = path.read_text(encoding="utf-8")
            if "\x00" in raw:
                raise DataError(f"{path} looks like a binary file (it holds NUL bytes), not text")
            texts: Iterable[str] = _PARAGRAPH.split(raw)
        elif suffix == ".jsonl":
            texts = _records_to_texts(_jsonl_records(path), field, path)
        elif suffix == ".json":
            texts = _records_to_texts(_json_records(path), field, path)
        elif suffix == ".parquet":
            texts = _parquet_texts(path, field or DEFAULT_FIELD)
        else:
            raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use one of {', '.join(SUFFIXES)}")
        pairs = [(f"{name}#{i}", t.strip()) for i, t in enumerate(texts)]
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); is it a binary file?") from exc
    except (PermissionError, IsADirectoryError) as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc
    kept = [(doc_id, text) for doc_id, text in pairs if text]
    logger.debug("read %d texts from %s", len(kept), path)
    return kept


def _jsonl_records(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc


def _json_records(path: Path) -> list[Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: invalid JSON ({exc.msg} at line {exc.lineno})") from exc
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding exactly one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records")
    return data


def _records_to_texts(records: Iterable[Any], field: str | None, path: Path) -> Iterator[str]:
    for i, record in enumerate(records):
        if isinstance(record, str):
            yield record
            continue
        if not isinstance(record, dict):
            raise DataError(f"{path}: record {i} is a {type(record).__name__}, expected an object or a string")
        key = field or DEFAULT_FIELD
        value = record.get(key)
        if isinstance(value, str):
            yield value
            continue
        messages = record_to_messages(record) if field is None else None
        if messages is None:
            raise DataError(f"{path}: record {i} has no string field {key!r} (fields: {', '.join(record) or 'none'});"
                            f" choose one with :field=NAME")
        yield format_conversation(messages)


def _parquet_texts(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises ArrowInvalid and OSError variants
        raise DataError(f"{path}: not a readable parquet file ({exc})") from exc
    if field not in schema.names:
        raise DataError(f"{path}: no column {field!r} (columns: {', '.join(schema.names)}); choose one with :field=NAME")
    column = pq.read_table(path, columns=[field]).column(field).to_pylist()
    return [v for v in column if isinstance(v, str)]
