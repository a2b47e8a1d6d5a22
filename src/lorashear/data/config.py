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
    chat_share: float = field(default=0.0, metadata={
        "help": "share of the training sequences that are the dense model's own greedy replies to chat prompts "
                "from the training splits, rendered with its chat template (self-data distillation, "
                "lorashear.data.self_distill); 0 = off"})
    chat_prompts: int = field(default=256, metadata={"help": "with --chat-share: prompts the dense model answers"})
    chat_max_new_tokens: int = field(default=128, metadata={"help": "with --chat-share: longest reply, in tokens"})

    def __post_init__(self) -> None:
        if not self.spec or not str(self.spec).strip():
            raise ConfigError("--data must name a text source (e.g. builtin:calibration)")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be >= 2 (a next-token loss needs two tokens), got {self.seq_len}")
        if self.num_sequences is not None and self.num_sequences < 1:
            raise ConfigError(f"num_sequences must be >= 1, got {self.num_sequences}")
        if not 0.0 <= self.chat_share < 1.0:
            raise ConfigError(f"chat_share must be in [0, 1), got {self.chat_share}")
        if self.chat_prompts < 1 or self.chat_max_new_tokens < 1:
            raise ConfigError("chat_prompts and chat_max_new_tokens must be >= 1")
