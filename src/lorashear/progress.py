"""Progress bars follow ``lorashear -q`` (which sets ``LORASHEAR_DISABLE_PROGRESS``)."""

from __future__ import annotations

import os


def progress_disabled() -> bool:
    return os.environ.get("LORASHEAR_DISABLE_PROGRESS", "").strip().lower() not in ("", "0", "false", "no")
