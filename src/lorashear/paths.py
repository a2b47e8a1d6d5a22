"""Where lorashear keeps its caches (XDG conventions, overridable)."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "LORASHEAR_CACHE"


def cache_root() -> Path:
    """Return the cache directory: ``$LORASHEAR_CACHE``, else ``$XDG_CACHE_HOME/lorashear``,
    else ``~/.cache/lorashear``. The directory is created if missing."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        root = Path(explicit).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
        root = base / "lorashear"
    root.mkdir(parents=True, exist_ok=True)
    return root
