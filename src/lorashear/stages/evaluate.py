"""The evaluate stage: one model, optionally beside its dense baseline.

Recipe (each step a component)::

    for baseline, model: load_model(name); evaluate_model(model, tokenizer, config)  # perplexity, tasks
    measure_speed_isolated(name, ...)       # speed and size, each model in a fresh subprocess
    EvalReport -> eval.json; write_report -> report.md, accuracy.png, speed.png

The stage config is :class:`~lorashear.evaluation.config.EvalConfig` itself (every
option declared once, there); the result is
:class:`~lorashear.evaluation.results.EvalReport`, whose JSON form is ``eval.json``.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path

from ..atomic import atomic_write_json
from ..errors import ConfigError, LorashearError
from ..evaluation.config import EvalConfig
from ..evaluation.results import EvalReport, ModelEval

logger = logging.getLogger(__name__)

#: The stage config: the evaluation settings plus ``model``/``out``/``baseline``.
EvaluateConfig = EvalConfig
#: The stage result (``eval.json``).
EvaluateResult = EvalReport

RESULT_FILE = "eval.json"
REPORT_FILE = "report.md"


def run(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate ``config.model`` (and ``config.baseline``) and write the outputs to ``config.out``."""
    from ..evaluation.measure import default_device, environment, evaluate_model
    from ..evaluation.perplexity import load_eval_texts
    from ..evaluation.report import write_report
    from ..evaluation.speed import measure_speed_isolated
    from ..models.loading import load_model, load_tokenizer, resolve_model_path

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
            from ..evaluation.speed import directory_bytes

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
    atomic_write_json(out / RESULT_FILE, report.to_dict())
    write_report(report, out)
    logger.info("wrote %s and %s", out / RESULT_FILE, out / REPORT_FILE)
    return report


__all__ = ["EvaluateConfig", "EvaluateResult", "run"]
