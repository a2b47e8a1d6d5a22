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

from ..atomic import atomic_directory, atomic_write_json, output_lock, validate_out
from ..errors import ConfigError, DataError, LorashearError
from ..evaluation.config import EvalConfig
from ..evaluation.results import EvalReport, ModelEval

logger = logging.getLogger(__name__)

#: The stage config: the evaluation settings plus ``model``/``out``/``baseline``.
EvaluateConfig = EvalConfig
#: The stage result (``eval.json``).
EvaluateResult = EvalReport

RESULT_FILE = "eval.json"
REPORT_FILE = "report.md"
#: files that mark a directory as an evaluate stage's output (it may then be replaced)
OWNER_FILES = (RESULT_FILE, REPORT_FILE)


def check_config(config: EvaluateConfig) -> None:
    """What can be checked before any model loads: a model is named and every task name exists."""
    from ..evaluation.harness import check_task_names

    if not config.model:
        raise ConfigError("no model given")
    if config.tasks:
        check_task_names(config.tasks)


def eval_texts(config: EvaluateConfig) -> list[str] | None:
    """The perplexity text (``None`` when perplexity is off), with every further source read too, before a
    model loads: a missing, empty or binary source fails with one line."""
    from ..evaluation.perplexity import load_eval_texts

    texts = None if config.skip_ppl else load_eval_texts(config.ppl_source)
    for source in config.ppl_more_sources:
        load_eval_texts(source)
    return texts


def run(config: EvaluateConfig) -> EvaluateResult:
    """Evaluate ``config.model`` (and ``config.baseline``) and write the outputs to ``config.out``.

    Everything that can fail on the user's input is checked before a model loads: ``--out``, the
    task names, both model names, the perplexity text and the tokenizers. The outputs are written
    complete into a temporary sibling of ``config.out`` that then replaces it.
    """
    from ..models.loading import check_causal_lm, resolve_model_path

    out = validate_out(config.out, owner_files=OWNER_FILES, flag="--out")
    check_config(config)
    # Resolve both names first: a typo fails before minutes of work.
    runs = ([("baseline", config.baseline)] if config.baseline else []) + [("model", config.model)]
    resolved = {role: resolve_model_path(name) for role, name in runs}
    for role, name in runs:
        check_causal_lm(resolved[role], name=name)
    with output_lock(out):
        return _run(config, out, runs, resolved)


def _run(config: EvaluateConfig, out: Path, runs: list[tuple[str, str]], resolved: dict[str, str]) -> EvaluateResult:
    from ..evaluation.measure import default_device, environment, evaluate_model
    from ..evaluation.report import write_report
    from ..evaluation.speed import measure_speed_isolated
    from ..models.loading import check_tokenizer_fits, load_model, load_tokenizer

    device = config.device or default_device()
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    start = time.perf_counter()
    texts = eval_texts(config)
    tokenizers: dict[str, object] = {}
    for role, name in runs:
        try:
            tokenizers[role] = load_tokenizer(name)
        except LorashearError:
            if "baseline" not in tokenizers:
                raise
            logger.warning("%s has no tokenizer; using the baseline's", name)
            tokenizers[role] = tokenizers["baseline"]
    results: list[ModelEval] = []
    for role, name in runs:
        logger.info("loading %s %s on %s (%s)", role, name, device, config.dtype)
        model = load_model(name, dtype=config.dtype, device=device)
        tokenizer = tokenizers[role]
        check_tokenizer_fits(model, tokenizer, name)
        sub = dataclasses.replace(config, speed=config.speed and config.speed_isolation == "inprocess")
        if texts is None:
            sub = dataclasses.replace(sub, ppl_source="none")
        result = evaluate_model(model, tokenizer, sub, name=name, role=role, texts=texts)
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
    check_tasks_scored(config, results)
    report = EvalReport(config=config, models=results, environment={**environment(), "device": device},
                        seconds=time.perf_counter() - start)
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / RESULT_FILE, report.to_dict())
        write_report(report, tmp)
    logger.info("wrote %s and %s", out / RESULT_FILE, out / REPORT_FILE)
    return report


def check_tasks_scored(config: EvaluateConfig, results: list[ModelEval]) -> None:
    """Refuse an evaluation in which no zero-shot task could be scored for a model (nothing is written):
    accuracy was asked for, and a report without any would read as a success."""
    if not config.tasks:
        return
    for result in results:
        tasks = result.tasks.tasks if result.tasks is not None else []
        if any(t.ok for t in tasks):
            continue
        why = result.errors.get("tasks") or next((f"{t.task}: {t.error}" for t in tasks), "no task ran")
        raise DataError(f"no zero-shot task could be scored for {result.name} ({why}); fix the tasks or run with "
                        "--tasks none")


__all__ = ["EvaluateConfig", "EvaluateResult", "check_tasks_scored", "run"]
