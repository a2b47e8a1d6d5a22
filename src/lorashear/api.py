"""The Python entry point: the whole pipeline in one call.

    import lorashear
    result = lorashear.prune("smollm2-135m-instruct", ratio=0.2, out="runs/p20", steps=200)
    print(result.model_dir, result.report)

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
    """Analyze, prune ``ratio`` of ``model``'s parameters, evaluate; returns where everything is."""
    config = config_from_dict(PipelineConfig, {"model": model, "ratio": ratio, "out": out, **options},
                              source="lorashear.prune options")
    return run_pipeline(config)


__all__ = ["prune"]
