"""What ``lorashear eval`` measured: :class:`ModelEval` per model and the :class:`EvalReport` of a run.

Types only (plus :func:`ratios`), so that the runner (:mod:`.run`) and the report
writer (:mod:`.report`) both import them without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import EvalConfig
from .harness import TaskEvalResult
from .perplexity import PerplexityResult
from .recall import RecallResult
from .speed import SpeedResult


@dataclass
class ModelEval:
    """Everything measured for one model."""

    role: str  #: "model" or "baseline"
    name: str  #: as given on the command line
    perplexity: PerplexityResult | None = None
    tasks: TaskEvalResult | None = None
    speed: SpeedResult | None = None
    errors: dict[str, str] = field(default_factory=dict)  #: stage -> why it failed
    #: perplexity on each of ``ppl_more_sources``, by source
    more_perplexity: dict[str, PerplexityResult] = field(default_factory=dict)
    recall: RecallResult | None = None  #: the factual-recall probe

    def to_dict(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "name": self.name,
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "tasks": self.tasks.to_dict() if self.tasks else None,
            "speed": self.speed.to_dict() if self.speed else None,
            "errors": dict(self.errors),
            "more_perplexity": {k: v.to_dict() for k, v in self.more_perplexity.items()},
            "recall": self.recall.to_dict() if self.recall else None,
        }


@dataclass
class EvalReport:
    """The result of the evaluate stage (:mod:`lorashear.stages.evaluate`); ``eval.json`` is :meth:`to_dict`."""

    config: EvalConfig
    models: list[ModelEval]  #: the baseline first (if any), then the model
    environment: dict[str, Any]
    seconds: float

    @property
    def out(self) -> str:
        """The output directory (``eval.json``, ``report.md``, plots)."""
        return self.config.out

    @property
    def wall_time_s(self) -> float:
        return self.seconds

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
    if base.recall and model.recall:
        pairs["recall"] = (model.recall.accuracy, base.recall.accuracy)
    if base.tasks and model.tasks:
        pairs["mean_acc"] = (model.tasks.mean("acc"), base.tasks.mean("acc"))
        pairs["mean_acc_norm"] = (model.tasks.mean("acc_norm"), base.tasks.mean("acc_norm"))
    return {k: m / b for k, (m, b) in pairs.items() if m is not None and b}
