"""Measuring one in-memory model: perplexity, zero-shot tasks and (optionally) speed.

:func:`evaluate_model` is the component the evaluate stage
(:mod:`lorashear.stages.evaluate`) calls once per model; :func:`environment` records
the library versions and hardware beside the numbers.
"""

from __future__ import annotations

import logging
import os
import platform
from typing import TYPE_CHECKING, Any

from .._version import __version__
from ..errors import LorashearError
from .config import EvalConfig
from .harness import evaluate_tasks
from .perplexity import load_eval_texts, perplexity, token_stream
from .recall import recall_probe
from .results import ModelEval
from .speed import SpeedResult, measure_speed

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def environment() -> dict[str, Any]:
    """Library versions, platform and threads (recorded in ``eval.json``)."""
    import torch
    import transformers

    from .harness import _lm_eval_version

    env: dict[str, Any] = {
        "lorashear": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
        "lm_eval": _lm_eval_version() or None, "python": platform.python_version(),
        "platform": platform.platform(), "cpu_count": os.cpu_count(),
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
    ``config.speed`` and ``config.speed_isolation == "inprocess"``; the evaluate stage
    measures speed in a subprocess otherwise).

    A measurement that fails with a :class:`LorashearError` is recorded in ``errors`` and
    the others still run.
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
        for source in config.ppl_more_sources:
            try:
                stream = token_stream(load_eval_texts(source), tokenizer)
                result.more_perplexity[source] = perplexity(
                    model, stream, seq_len=config.ppl_seq_len, stride=config.ppl_stride,
                    max_windows=config.ppl_max_windows, source=source)
                logger.info("%s: perplexity %.3f on %s", name, result.more_perplexity[source].perplexity, source)
            except LorashearError as exc:
                logger.warning("%s: perplexity on %s skipped: %s", name, source, exc)
                result.errors[f"perplexity {source}"] = str(exc)
    if config.recall:
        try:
            result.recall = recall_probe(model, tokenizer)
        except LorashearError as exc:
            logger.warning("%s: recall probe skipped: %s", name, exc)
            result.errors["recall"] = str(exc)
    if config.tasks:
        try:
            result.tasks = evaluate_tasks(model, tokenizer, config.tasks, limit=config.limit,
                                          num_fewshot=config.num_fewshot, batch_size=config.batch_size,
                                          seed=config.seed)
        except LorashearError as exc:
            logger.warning("%s: zero-shot tasks skipped: %s", name, exc)
            result.errors["tasks"] = str(exc)
    if config.speed and config.speed_isolation == "inprocess":
        result.speed = speed_inprocess(model, config)
    return result


def speed_inprocess(model: PreTrainedModel, config: EvalConfig, checkpoint_dir: str | None = None) -> SpeedResult:
    return measure_speed(model, prompt_len=config.speed_prompt_len, new_tokens=config.speed_new_tokens,
                         batch_sizes=config.speed_batch_sizes, repeats=config.speed_repeats,
                         warmup=config.speed_warmup, checkpoint_dir=checkpoint_dir)


__all__ = ["default_device", "environment", "evaluate_model", "speed_inprocess"]
