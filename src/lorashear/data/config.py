"""What text a training stage reads and how it is packed."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class DataConfig:
    """Training text: a data spec packed into sequences of ``seq_len`` tokens."""

    spec: str = field(default="builtin:calibration", metadata={
        "name": "data", "help": "training text (a lorashear data spec: file, folder, hf:NAME or builtin:NAME)"})
    seq_len: int = field(default=256, metadata={"help": "tokens per packed training sequence"})
    num_sequences: int | None = field(default=None, metadata={"help": "packed sequences to use (default: all)"})

    def __post_init__(self) -> None:
        if not self.spec or not str(self.spec).strip():
            raise ConfigError("--data must name a text source (e.g. builtin:calibration)")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {self.seq_len}")
        if self.num_sequences is not None and self.num_sequences < 1:
            raise ConfigError(f"num_sequences must be >= 1, got {self.num_sequences}")
