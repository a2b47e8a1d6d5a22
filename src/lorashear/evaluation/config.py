"""The settings of ``lorashear eval`` (:class:`EvalConfig`), a leaf of the evaluation package."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EvalConfig:
    """What ``lorashear eval`` measures and how."""

    model: str = field(default="", metadata={**_h("model to evaluate: directory, hub id or smollm2-135m-instruct"),
                                             "cli": False})
    out: str = field(default="", metadata={**_h("output directory for eval.json, report.md and plots"), "cli": False})
    baseline: str | None = field(default=None, metadata=_h(
        "dense model measured side by side (same tokenizer), for ratios"))
    tasks: list[str] = field(default_factory=lambda: ["lorashear_zeroshot"], metadata=_h(
        "zero-shot tasks: lorashear_zeroshot (offline default suite: the paper's seven tasks), "
        "lorashear_zeroshot_all, lorashear_zs_<name>, lorashear_bigbench_all (needs the BIG-bench sdist), "
        "lorashear_bb_<name>, or lm-eval registry names (need their data hub); 'none' to skip"))
    limit: int | None = field(default=None, metadata=_h("score at most N documents per task (a fixed random sample)"))
    num_fewshot: int = field(default=0, metadata=_h("few-shot examples per prompt (0: zero-shot)"))
    batch_size: int = field(default=8, metadata=_h("lm-eval batch size"))
    dtype: str = field(default="float32", metadata=_h("parameter dtype: float32, bfloat16, float16"))
    device: str | None = field(default=None, metadata=_h("device (default: cuda if available, else cpu)"))
    ppl_source: str = field(default="builtin:heldout-test", metadata=_h(
        "text for perplexity: a lorashear.data source, a .txt or .jsonl file, or 'none' to skip (the default "
        "is the test half of the held-out documents: reported figures only, never choices)"))
    ppl_more_sources: list[str] = field(default_factory=list, metadata=_h(
        "more held-out texts, each with its own perplexity under the same protocol (e.g. "
        "builtin:heldout-docs-test)"))
    ppl_seq_len: int = field(default=512, metadata=_h("perplexity window length in tokens"))
    ppl_stride: int | None = field(default=None, metadata=_h(
        "tokens between perplexity window starts (default: seq_len, disjoint windows)"))
    ppl_max_windows: int | None = field(default=64, metadata=_h(
        "perplexity windows, spread evenly over the whole text (none: every window)"))
    recall: bool = field(default=True, metadata=_h(
        "ask the factual-recall probe (48 questions of common fact with one-word answers, written for lorashear; "
        "greedy replies, about 20 s for a 135M model on one CPU core)"))
    speed: bool = field(default=True, metadata=_h("measure size, latency, throughput and peak memory"))
    speed_prompt_len: int = field(default=128, metadata=_h("prompt length for the speed runs"))
    speed_new_tokens: int = field(default=32, metadata=_h("tokens generated per sequence in the speed runs"))
    speed_batch_sizes: list[int] = field(default_factory=lambda: [1, 8], metadata=_h("batch sizes for speed runs"))
    speed_repeats: int = field(default=3, metadata=_h("timed repeats per measurement (the median is reported)"))
    speed_warmup: int = field(default=1, metadata=_h("untimed warm-up runs per measurement"))
    speed_isolation: Literal["subprocess", "inprocess"] = field(default="subprocess", metadata=_h(
        "measure speed in a fresh subprocess per model (clean peak memory) or in this process"))
    seed: int = field(default=1234, metadata=_h("random seed for lm-eval"))
    threads: int | None = field(default=None, metadata=_h(
        "CPU threads for torch (default: torch's choice); 1 can be many times faster on a busy machine"))

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        self.tasks = [t for t in self.tasks if t.lower() != "none"]
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.ppl_seq_len < 2:
            raise ConfigError(f"ppl_seq_len must be >= 2, got {self.ppl_seq_len}")
        if self.ppl_stride is not None and not 1 <= self.ppl_stride <= self.ppl_seq_len:
            raise ConfigError(f"ppl_stride must be in [1, ppl_seq_len={self.ppl_seq_len}], got {self.ppl_stride}")
        if self.ppl_max_windows is not None and self.ppl_max_windows < 1:
            raise ConfigError(f"ppl_max_windows must be >= 1, got {self.ppl_max_windows}")
        if self.speed_prompt_len < 1 or self.speed_new_tokens < 2:
            raise ConfigError("speed_prompt_len must be >= 1 and speed_new_tokens >= 2")
        if not self.speed_batch_sizes or any(b < 1 for b in self.speed_batch_sizes):
            raise ConfigError(f"speed_batch_sizes must be positive integers, got {self.speed_batch_sizes}")
        if self.speed_repeats < 1 or self.speed_warmup < 0:
            raise ConfigError("speed_repeats must be >= 1 and speed_warmup >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.speed_isolation not in ("subprocess", "inprocess"):
            raise ConfigError(f"speed_isolation must be subprocess or inprocess, got {self.speed_isolation!r}")

    @property
    def skip_ppl(self) -> bool:
        return self.ppl_source.strip().lower() in ("", "none")
