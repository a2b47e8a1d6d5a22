"""One switch for every progress bar: ``lorashear -q`` sets ``LORASHEAR_DISABLE_PROGRESS``."""

from __future__ import annotations

import os

PROGRESS_ENV = "LORASHEAR_DISABLE_PROGRESS"


def progress_disabled() -> bool:
    """True when ``$LORASHEAR_DISABLE_PROGRESS`` is set to anything but empty, 0, false or no."""
    return os.environ.get(PROGRESS_ENV, "").strip().lower() not in ("", "0", "false", "no")
