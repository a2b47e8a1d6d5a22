"""The Python entry point: the whole pipeline in one call.

    import lorashear
    result = lorashear.prune("smollm2-135m-instruct", ratio=0.2, out="runs/p20", steps=200)
    model, tokenizer = result.load_model(), result.load_tokenizer()   # the pruned model
    print(result.read_report())                                        # report.md

Options are the flat names of :class:`~lorashear.stages.pipeline.PipelineConfig`, the same as
``lorashear run``'s flags (``steps``, ``data``, ``lora_r``, ``eval_tasks``, ``stages``, ...); a
misspelled option raises :class:`~lorashear.errors.ConfigError` naming it.
"""

from __future__ import annotations

from typing import Any

from .config import config_from_dict
from .stages.pipeline import PipelineConfig, PipelineResult
from .stages.pipeline import run as run_pipeline


def prune(model: str, *, ratio: float = 0.2, out: str = "runs/lorashear", **options: Any) -> PipelineResult:
    """Analyze, prune ``ratio`` of ``model``'s parameters, evaluate, write ``out/report.md``.

    Returns where everything is (:class:`PipelineResult`); ``result.load_model()`` loads the pruned
    model and ``result.read_report()`` reads the report."""
    config = config_from_dict(PipelineConfig, {"model": model, "ratio": ratio, "out": out, **options},
                              source="lorashear.prune options")
    return run_pipeline(config)


__all__ = ["prune"]
