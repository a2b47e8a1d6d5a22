"""What a model is, by content rather than by the path it was named with.

:func:`model_identity` digests a model directory's ``config.json``, its weight files
(``*.safetensors`` and the shard index) and its tokenizer files: name, size and SHA-256
of each. ``runs/x/tiny``, ``./tiny`` and ``tiny/`` are one model; other weights copied to
the same path are another. File hashes are cached by path, size, inode and modification
time (``$LORASHEAR_CACHE/file_hashes.json``), so a model is read once, not at every run.
Hub ids are identified by their name (``hub:<id>``: the weights are not local).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..atomic import atomic_write_json
from ..paths import cache_root

logger = logging.getLogger(__name__)

#: files that define a model directory's content (weights, config, tokenizer)
IDENTITY_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json",
                     "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "vocab.json", "merges.txt")
CACHE_FILE = "file_hashes.json"
_CHUNK = 1 << 24


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}


def _read_cache(cache: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_digests(paths: list[Path], *, persist: bool = True) -> dict[Path, str]:
    """SHA-256 of each file, from the cache when its size, inode and modification time are unchanged.

    ``persist=False`` reads the cache but writes nothing (``lorashear run --dry-run``)."""
    cache = cache_root() / CACHE_FILE
    stored = _read_cache(cache)
    out: dict[Path, str] = {}
    changed = False
    for path in paths:
        real = str(Path(path).resolve())
        key = _stat_key(Path(real))
        hit = stored.get(real)
        if isinstance(hit, dict) and all(hit.get(k) == v for k, v in key.items()) and isinstance(hit.get("sha256"), str):
            out[path] = str(hit["sha256"])
            continue
        out[path] = _sha256(Path(real))
        stored[real] = {**key, "sha256": out[path]}
        changed = True
    if changed and persist:
        try:
            atomic_write_json(cache, stored)
        except OSError as exc:  # a read-only cache only costs the next run the hashing again
            logger.debug("cannot write %s: %s", cache, exc)
    return out


def directory_files(directory: Path) -> list[Path]:
    """The files of ``directory`` that define a model (:data:`IDENTITY_PATTERNS`), sorted by name."""
    found = {p for pattern in IDENTITY_PATTERNS for p in directory.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)


def directory_identity(directory: str | os.PathLike[str], *, persist: bool = True) -> str:
    """``sha256:<hex>`` over the name, size and SHA-256 of every file that defines the model in ``directory``."""
    directory = Path(directory)
    files = directory_files(directory)
    digests = file_digests(files, persist=persist)
    summary = [[p.name, p.stat().st_size, digests[p]] for p in files]
    return "sha256:" + hashlib.sha256(json.dumps(summary).encode("utf-8")).hexdigest()


def model_identity(name_or_path: str | os.PathLike[str], *, persist: bool = True) -> str:
    """The content identity of a model name: a local directory (the built-in reference name included)
    by :func:`directory_identity`, a hub id by its name."""
    from .loading import resolve_model_path

    resolved = Path(resolve_model_path(name_or_path))
    if resolved.is_dir():
        return directory_identity(resolved, persist=persist)
    return f"hub:{os.fspath(name_or_path)}"


def file_identity(path: str | os.PathLike[str], *, persist: bool = True) -> str:
    """``sha256:<hex>`` of one file (cached like the model files)."""
    return "sha256:" + file_digests([Path(path)], persist=persist)[Path(path)]


__all__ = ["directory_identity", "file_digests", "file_identity", "model_identity"]
