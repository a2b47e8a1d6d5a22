"""Evaluation: perplexity, zero-shot accuracy (lm-eval, model in memory), speed and size, reports.

::

    from lorashear.evaluation import EvalConfig
    from lorashear.stages import evaluate            # the end-to-end stage (eval.json, report.md)
    evaluate.run(EvalConfig(model="pruned/", baseline="smollm2-135m-instruct",
                            tasks=["lorashear_bigbench"], limit=100, out="eval/"))

Offline zero-shot tasks are prepared once with :func:`prepare_eval_data`.
Heavy imports (torch, lm-eval, matplotlib) happen inside the functions.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_LAZY = {
    "perplexity": "lorashear.evaluation.perplexity",
    "PerplexityResult": "lorashear.evaluation.perplexity",
    "window_spans": "lorashear.evaluation.perplexity",
    "token_stream": "lorashear.evaluation.perplexity",
    "evaluate_tasks": "lorashear.evaluation.harness",
    "TaskEvalResult": "lorashear.evaluation.harness",
    "TaskResult": "lorashear.evaluation.harness",
    "lm_eval_available": "lorashear.evaluation.harness",
    "measure_speed": "lorashear.evaluation.speed",
    "measure_speed_isolated": "lorashear.evaluation.speed",
    "SpeedResult": "lorashear.evaluation.speed",
    "prepare_eval_data": "lorashear.evaluation.tasks",
    "convert_bigbench_task": "lorashear.evaluation.tasks",
    "offline_task_names": "lorashear.evaluation.tasks",
    "write_task_yamls": "lorashear.evaluation.tasks",
    "EvalConfig": "lorashear.evaluation.config",
    "EvalReport": "lorashear.evaluation.results",
    "ModelEval": "lorashear.evaluation.results",
    "ratios": "lorashear.evaluation.results",
    "evaluate_model": "lorashear.evaluation.measure",
    "environment": "lorashear.evaluation.measure",
    "write_report": "lorashear.evaluation.report",
}

__all__ = sorted(_LAZY)

if TYPE_CHECKING:  # pragma: no cover
    from .harness import TaskEvalResult, TaskResult, evaluate_tasks, lm_eval_available
    from .perplexity import PerplexityResult, perplexity, token_stream, window_spans
    from .report import write_report
    from .config import EvalConfig
    from .results import EvalReport, ModelEval, ratios
    from .measure import environment, evaluate_model
    from .speed import SpeedResult, measure_speed, measure_speed_isolated
    from .tasks import convert_bigbench_task, offline_task_names, prepare_eval_data, write_task_yamls


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorashear.evaluation' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
