"""``lorashear eval`` as a library call: one model, optionally beside its dense baseline.

:func:`run_evaluation` loads each model in turn, measures perplexity and zero-shot
accuracy in this process, then speed and size (by default each model in a fresh
subprocess, so peak memory belongs to that model alone), and writes ``eval.json``
and ``report.md`` with plots into ``out``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..atomic import atomic_write_json
from ..errors import ConfigError, LorashearError
from .harness import TaskEvalResult, evaluate_tasks
from .perplexity import PerplexityResult, load_eval_texts, perplexity, token_stream
from .speed import SpeedResult, measure_speed, measure_speed_isolated

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def _h(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class EvalConfig:
    """What ``lorashear eval`` measures and how."""

    model: str = field(default="", metadata={**_h("model to evaluate: directory, hub id or smollm2-135m-instruct"),
                                             "cli": False})
    out: str = field(default="", metadata=_h("output directory for eval.json, report.md and plots"))
    baseline: str | None = field(default=None, metadata=_h(
        "dense model measured side by side (same tokenizer), for ratios"))
    tasks: list[str] = field(default_factory=lambda: ["lorashear_bigbench"], metadata=_h(
        "zero-shot tasks: lorashear_bigbench (offline default suite), lorashear_bigbench_all, "
        "lorashear_bb_<name>, or lm-eval registry names (need their data hub); 'none' to skip"))
    limit: int | None = field(default=None, metadata=_h("score at most N documents per task (a fixed random sample)"))
    num_fewshot: int = field(default=0, metadata=_h("few-shot examples per prompt (0: zero-shot)"))
    batch_size: int = field(default=8, metadata=_h("lm-eval batch size"))
    dtype: str = field(default="float32", metadata=_h("parameter dtype: float32, bfloat16, float16"))
    device: str | None = field(default=None, metadata=_h("device (default: cuda if available, else cpu)"))
    ppl_source: str = field(default="builtin:heldout", metadata=_h(
        "text for perplexity: a lorashear.data source, a .txt or .jsonl file, or 'none' to skip"))
    ppl_seq_len: int = field(default=512, metadata=_h("perplexity window length in tokens"))
    ppl_stride: int | None = field(default=None, metadata=_h(
        "tokens between perplexity window starts (default: seq_len, disjoint windows)"))
    ppl_max_windows: int | None = field(default=32, metadata=_h("at most this many perplexity windows"))
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


@dataclass
class ModelEval:
    """Everything measured for one model."""

    role: str  #: "model" or "baseline"
    name: str  #: as given on the command line
    perplexity: PerplexityResult | None = None
    tasks: TaskEvalResult | None = None
    speed: SpeedResult | None = None
    errors: dict[str, str] = field(default_factory=dict)  #: stage -> why it failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "tasks": self.tasks.to_dict() if self.tasks else None,
            "speed": self.speed.to_dict() if self.speed else None,
            "errors": dict(self.errors),
        }


@dataclass
class EvalReport:
    config: EvalConfig
    models: list[ModelEval]  #: the baseline first (if any), then the model
    environment: dict[str, Any]
    seconds: float

    def get(self, role: str) -> ModelEval | None:
        return next((m for m in self.models if m.role == role), None)

    def to_dict(self) -> dict[str, Any]:
        from ..config import to_json_dict

        return {
            "config": to_json_dict(self.config),
            "environment": self.environment,
            "seconds": round(self.seconds, 2),
            "models": [m.to_dict() for m in self.models],
            "ratios": ratios(self),
        }


def ratios(report: EvalReport) -> dict[str, float]:
    """model / baseline for the headline numbers (empty without a baseline)."""
    base, model = report.get("baseline"), report.get("model")
    if base is None or model is None:
        return {}
    pairs: dict[str, tuple[float | None, float | None]] = {}
    if base.speed and model.speed:
        pairs["num_parameters"] = (model.speed.num_parameters, base.speed.num_parameters)
        pairs["parameter_bytes"] = (model.speed.parameter_bytes, base.speed.parameter_bytes)
        pairs["checkpoint_bytes"] = (model.speed.checkpoint_bytes, base.speed.checkpoint_bytes)
        pairs["peak_memory_bytes"] = (model.speed.peak_memory_bytes, base.speed.peak_memory_bytes)
        for b in base.speed.batches:
            m = model.speed.batch(b.batch_size)
            if m is not None:
                pairs[f"prefill_ms_bs{b.batch_size}"] = (m.prefill_ms, b.prefill_ms)
                pairs[f"decode_tokens_per_s_bs{b.batch_size}"] = (m.decode_tokens_per_s, b.decode_tokens_per_s)
    if base.perplexity and model.perplexity:
        pairs["perplexity"] = (model.perplexity.perplexity, base.perplexity.perplexity)
    if base.tasks and model.tasks:
        pairs["mean_acc"] = (model.tasks.mean("acc"), base.tasks.mean("acc"))
        pairs["mean_acc_norm"] = (model.tasks.mean("acc_norm"), base.tasks.mean("acc_norm"))
    return {k: m / b for k, (m, b) in pairs.items() if m is not None and b}


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    from .. import __version__
    from .harness import _lm_eval_version

    env: dict[str, Any] = {
        "lorashear": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "lm_eval": _lm_eval_version() or None, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": __import__("os").cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def evaluate_model(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: EvalConfig,
    *,
    name: str = "model",
    role: str = "model",
    texts: list[str] | None = None,
) -> ModelEval:
    """Perplexity and zero-shot tasks of an in-memory model (speed in this process if
    ``config.speed``; :func:`run_evaluation` measures speed in a subprocess instead).

    A stage that fails with a :class:`LorashearError` is recorded in ``errors`` and the
    other stages still run.
    """
    result = ModelEval(role=role, name=name)
    if not config.skip_ppl:
        try:
            texts = texts if texts is not None else load_eval_texts(config.ppl_source)
            stream = token_stream(texts, tokenizer)
            logger.info("%s: perplexity on %s (%d tokens)", name, config.ppl_source, stream.numel())
            result.perplexity = perplexity(model, stream, seq_len=config.ppl_seq_len, stride=config.ppl_stride,
                                           max_windows=config.ppl_max_windows, source=config.ppl_source)
            logger.info("%s: perplexity %.3f (%s)", name, result.perplexity.perplexity, result.perplexity.protocol)
        except LorashearError as exc:
            logger.warning("%s: perplexity skipped: %s", name, exc)
            result.errors["perplexity"] = str(exc)
    if config.tasks:
        try:
            result.tasks = evaluate_tasks(model, tokenizer, config.tasks, limit=config.limit,
                                          num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                                          seed=config.seed)
        except LorashearError as exc:
            logger.warning("%s: zero-shot tasks skipped: %s", name, exc)
            result.errors["tasks"] = str(exc)
    if config.speed and config.speed_isolation == "inprocess":
        result.speed = _speed_inprocess(model, config, None)
    return result


def _speed_inprocess(model: PreTrainedModel, config: EvalConfig, checkpoint_dir: str | None) -> SpeedResult:
    return measure_speed(model, prompt_len=config.speed_prompt_len, new_tokens=config.speed_new_tokens,
                         batch_sizes=config.speed_batch_sizes, repeats=config.speed_repeats,
                         warmup=config.speed_warmup, checkpoint_dir=checkpoint_dir)


def run_evaluation(config: EvalConfig) -> EvalReport:
    """Evaluate ``config.model`` (and ``config.baseline``) and write the outputs to ``config.out``."""
    from ..models.loading import load_model, load_tokenizer, resolve_model_path
    from .report import write_report

    if not config.model:
        raise ConfigError("no model given")
    if not config.out:
        raise ConfigError("no output directory given (--out DIR)")
    out = Path(config.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a directory")
    device = config.device or default_device()
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    # Resolve both names first: a typo fails before minutes of work.
    runs = ([("baseline", config.baseline)] if config.baseline else []) + [("model", config.model)]
    resolved = {role: resolve_model_path(name) for role, name in runs}
    start = time.perf_counter()
    texts = None
    if not config.skip_ppl:
        try:
            texts = load_eval_texts(config.ppl_source)
        except LorashearError as exc:
            logger.warning("perplexity skipped: %s", exc)
    results: list[ModelEval] = []
    base_tokenizer = None
    for role, name in runs:
        logger.info("loading %s %s on %s (%s)", role, name, device, config.dtype)
        model = load_model(name, dtype=config.dtype, device=device)
        try:
            tokenizer = load_tokenizer(name)
        except LorashearError:
            if base_tokenizer is None:
                raise
            logger.warning("%s has no tokenizer; using the baseline's", name)
            tokenizer = base_tokenizer
        base_tokenizer = base_tokenizer or tokenizer
        sub = dataclasses.replace(config, speed=config.speed and config.speed_isolation == "inprocess")
        if texts is None:
            sub = dataclasses.replace(sub, ppl_source="none")
        result = evaluate_model(model, tokenizer, sub, name=name, role=role, texts=texts)
        if texts is None and not config.skip_ppl:
            result.errors["perplexity"] = f"could not read {config.ppl_source!r}"
        if result.speed is not None and Path(resolved[role]).is_dir():
            from .speed import directory_bytes

            result.speed.checkpoint_bytes, result.speed.weights_bytes = directory_bytes(resolved[role])
        results.append(result)
        del model
        gc.collect()
    if config.speed and config.speed_isolation == "subprocess":
        for result in results:
            logger.info("%s: speed and memory in a fresh process", result.name)
            try:
                result.speed = measure_speed_isolated(
                    result.name, dtype=config.dtype, device=device, prompt_len=config.speed_prompt_len,
                    new_tokens=config.speed_new_tokens, batch_sizes=config.speed_batch_sizes,
                    repeats=config.speed_repeats, warmup=config.speed_warmup, threads=config.threads)
            except LorashearError as exc:
                logger.warning("%s: speed skipped: %s", result.name, exc)
                result.errors["speed"] = str(exc)
    report = EvalReport(config=config, models=results, environment={**environment(), "device": device},
                        seconds=time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "eval.json", report.to_dict())
    write_report(report, out)
    logger.info("wrote %s and %s", out / "eval.json", out / "report.md")
    return report


__all__ = ["EvalConfig", "EvalReport", "ModelEval", "evaluate_model", "ratios", "run_evaluation"]
