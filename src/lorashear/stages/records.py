"""Stage records: what each step of a run was run with and what it wrote.

A :class:`StageRecord` holds a step's defining settings (flat option names), the content
identities of its inputs (models by :func:`~lorashear.models.identity.model_identity`, files by
hash) and, once complete, of its outputs. The pipeline reuses a step only when its record matches
the plan and its outputs are still the ones it wrote; :func:`write_record` and :func:`read_record`
are the one writer and the one reader (JSON, ``OUT/records/<step>.json``).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..atomic import atomic_write_json

#: an input this run makes itself (its identity is known once the step before has run)
PENDING = "made by this run"


@dataclass
class StageRecord:
    """One step of a run: its settings, the identities of what it read and (once complete) of what it wrote."""

    step: str
    settings: dict[str, Any]
    inputs: dict[str, str]
    outputs: dict[str, str] = field(default_factory=dict)
    lorashear_version: str = __version__
    written: str = ""

    def differences(self, planned: StageRecord) -> list[str]:
        """What differs from the ``planned`` record, as ``name: recorded -> planned`` (inputs by name only)."""
        out = []
        for key in sorted(set(self.settings) | set(planned.settings)):
            old, new = self.settings.get(key), planned.settings.get(key)
            if old != new:
                out.append(f"{key}: {_show(old)} -> {_show(new)}")
        for key in sorted(set(self.inputs) | set(planned.inputs)):
            if self.inputs.get(key) != planned.inputs.get(key):
                out.append(f"{key}: {'another' if key in self.inputs else 'a new'} input")
        return out


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else text[:37] + "..."


def write_record(path: Path, record: StageRecord) -> None:
    """Write ``record`` to ``path`` (atomically), stamped with the time."""
    stamped = dataclasses.replace(record, written=_dt.datetime.now().isoformat(timespec="seconds"))
    atomic_write_json(path, dataclasses.asdict(stamped))


def read_record(path: Path) -> StageRecord | None:
    """The record at ``path``; ``None`` when there is none or it cannot be read as one (a damaged
    record is no record: the step then runs again)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        record = StageRecord(**data)
    except (OSError, ValueError, TypeError):
        return None
    if not (isinstance(record.settings, dict) and isinstance(record.inputs, dict)
            and isinstance(record.outputs, dict)):
        return None
    return record


__all__ = ["PENDING", "StageRecord", "read_record", "write_record"]
