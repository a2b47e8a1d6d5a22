"""Zero-shot accuracy through lm-eval-harness, with the model in memory.

The model object itself is handed to ``lm_eval.models.huggingface.HFLM`` (never a
path for lm-eval to reload), so pruned models with per-layer sizes are scored as
they are. Each task runs in its own ``lm_eval.simple_evaluate`` call: a task whose
data cannot be loaded (a registry task whose hub is unreachable, a typo) is
recorded with its error and the others still run.

lm-eval is an optional dependency (``pip install 'lorashear[eval]'``); it is
imported only here, lazily.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, DataError, LorashearError
from ..progress import progress_disabled
from .tasks import (
    ALL_SUITE,
    DEFAULT_SUITE,
    LEGACY_SUITE,
    ZEROSHOT_PREFIX,
    ensure_eval_data,
    expand_task_names,
    is_offline_task,
    known_offline_task_names,
    short_task_name,
    sources_of,
    task_chance,
    temporary_task_dir,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

#: The metrics read back from lm-eval for every task.
METRICS = ("acc", "acc_norm")


@dataclass
class TaskResult:
    """One task's zero-shot result (``acc``/``acc_norm`` are fractions in [0, 1])."""

    task: str
    acc: float | None = None
    acc_stderr: float | None = None
    acc_norm: float | None = None
    acc_norm_stderr: float | None = None
    num_docs: int | None = None  #: documents scored (after ``limit``)
    num_docs_total: int | None = None  #: documents in the task
    chance: float | None = None  #: accuracy of uniform guessing (offline tasks)
    seconds: float = 0.0
    error: str | None = None  #: why the task could not be scored

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class TaskEvalResult:
    """The zero-shot results of one model, with the protocol that produced them."""

    tasks: list[TaskResult]
    limit: int | None
    num_fewshot: int
    batch_size: int
    metric: str = ("acc and acc_norm (lm-eval multiple_choice log-likelihood; "
                   "acc_norm divides by the choice's byte length)")
    lm_eval_version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def by_task(self) -> dict[str, TaskResult]:
        return {t.task: t for t in self.tasks}

    def mean(self, metric: str = "acc") -> float | None:
        """Unweighted mean of ``metric`` over the tasks that were scored."""
        values = [getattr(t, metric) for t in self.tasks if t.ok and getattr(t, metric) is not None]
        return sum(values) / len(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_acc"] = self.mean("acc")
        out["mean_acc_norm"] = self.mean("acc_norm")
        return out


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401
        import lm_eval.models.huggingface  # noqa: F401
    except ImportError:
        return False
    return True


def _require_lm_eval() -> None:
    if not lm_eval_available():
        raise LorashearError("zero-shot tasks need lm-eval: pip install 'lm-eval==0.4.13' (or 'lorashear[eval]')")


def _lm_eval_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return ""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:300]


def _clean(value: Any) -> float | None:
    """A metric as a finite float, or ``None`` (missing, ``"N/A"``, NaN or infinite: never a number)."""
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _registry() -> Any:
    """lm-eval's own task registry (indexing it takes seconds)."""
    from lm_eval.tasks import TaskManager

    with _quiet_lm_eval():
        return TaskManager(include_defaults=True)


def _check_registry_data(names: Sequence[str], manager: Any) -> None:
    """Build each registry task, which loads its data: a hub that cannot be reached (offline, a typo in
    its data set) fails here, with one line, before any model is loaded."""
    for name in names:
        try:
            with _quiet_lm_eval(), _quiet("huggingface_hub", "datasets"), contextlib.redirect_stdout(io.StringIO()):
                manager.load([name])
        except Exception as exc:  # noqa: BLE001 - lm-eval and datasets raise many kinds; each means "no data"
            raise DataError(f"task {name!r} cannot load its data ({_first_line(exc)}); make its data reachable, "
                            f"or use the offline suite {DEFAULT_SUITE}") from exc


def check_task_names(tasks: Sequence[str]) -> list[str]:
    """The task names ``tasks`` expand to, checked before any model is loaded.

    An unknown name (an offline ``lorashear_*`` name that does not exist, or a name lm-eval's
    registry does not know) is a :class:`~lorashear.errors.ConfigError` naming it; offline tasks
    that are not prepared, and registry tasks whose data cannot be loaded, are a
    :class:`~lorashear.errors.DataError` saying what to do.
    """
    names = expand_task_names(tasks)
    if not names:
        return []
    _require_lm_eval()
    offline = known_offline_task_names()
    ours = [n for n in names if n.startswith("lorashear")]
    unknown = [n for n in ours if n not in offline]
    registry = [n for n in names if n not in ours]
    manager = None
    if registry and not unknown:
        manager = _registry()
        unknown = [n for n in registry if n not in manager.all_tasks]
    if unknown:
        shown = ", ".join(repr(n) for n in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        examples = ", ".join(sorted(n for n in offline if n.startswith(ZEROSHOT_PREFIX))[:3])
        raise ConfigError(f"unknown task{'s' if len(unknown) > 1 else ''} {shown}; use {LEGACY_SUITE} or "
                          f"{DEFAULT_SUITE} (the offline default suite), {ALL_SUITE}, an offline task "
                          f"({examples}, ...), an lm-eval registry name, or none")
    for source in sources_of(n for n in names if is_offline_task(n)):
        ensure_eval_data(source)
    if manager is not None:
        _check_registry_data(registry, manager)
    return names


def build_lm(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, batch_size: int = 8,
             max_length: int | None = None) -> Any:
    """Wrap an in-memory model as an lm-eval ``HFLM`` (no reload from disk)."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    kwargs: dict[str, Any] = {"pretrained": model, "tokenizer": tokenizer, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    # HFLM logs a warning about ignored arguments when given an instance; it is expected here.
    hf_logger = logging.getLogger("lm_eval.models.huggingface")
    previous = hf_logger.level
    hf_logger.setLevel(logging.ERROR)
    try:
        return HFLM(**kwargs)
    finally:
        hf_logger.setLevel(previous)


def evaluate_tasks(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 8,
    include_path: str | Iterable[str] | None = None,
    max_length: int | None = None,
    seed: int = 1234,
) -> TaskEvalResult:
    """Score ``model`` zero-shot on ``tasks`` with lm-eval; report ``acc`` and ``acc_norm``.

    Args:
        tasks: lm-eval task names. ``lorashear_zeroshot`` (alias ``lorashear_bigbench``) /
            ``lorashear_zeroshot_all`` expand to the offline tasks (prepared by
            :func:`prepare_eval_data`); other names go to lm-eval's registry (which needs its
            data hub).
        limit: score at most this many documents per task (offline tasks are shuffled
            once at preparation, so this is a fixed random sample).
        include_path: extra directories of lm-eval task YAMLs.
        max_length: context length for lm-eval (default: the model's).

    A task that fails is returned with ``error`` set; the run goes on.
    """
    _require_lm_eval()
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    names = expand_task_names(tasks)
    if not names:
        raise ConfigError("no tasks given")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    lm = build_lm(model, tokenizer, batch_size=batch_size, max_length=max_length)
    chance = task_chance()
    results: list[TaskResult] = []
    extra_paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    needs_registry = any(not is_offline_task(n) for n in names)
    with _quiet_lm_eval(), temporary_task_dir(names) as tmp:
        manager = TaskManager(include_path=[tmp, *extra_paths], include_defaults=needs_registry or not names)
        from tqdm.auto import tqdm

        bar = tqdm(names, desc="zero-shot tasks", unit="task", disable=progress_disabled())
        for name in bar:
            bar.set_postfix_str(short_task_name(name))
            results.append(_evaluate_one(lm, manager, name, limit=limit, num_fewshot=num_fewshot,
                                         seed=seed, chance=chance.get(name), simple_evaluate=simple_evaluate))
    return TaskEvalResult(tasks=results, limit=limit, num_fewshot=num_fewshot, batch_size=batch_size,
                          lm_eval_version=_lm_eval_version())


@contextlib.contextmanager
def _quiet(*names: str) -> Iterator[None]:
    """Keep the loggers ``names`` at ERROR while we run them, unless our own logger is at DEBUG
    (``lorashear -vv``)."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [lg.level for lg in loggers]
    if not logging.getLogger("lorashear").isEnabledFor(logging.DEBUG):
        for lg in loggers:
            lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, previous):
            lg.setLevel(level)


def _quiet_lm_eval() -> contextlib.AbstractContextManager[None]:
    """lm-eval logs every step at INFO (and a warning per truncated request)."""
    return _quiet("lm_eval")


def _evaluate_one(lm: Any, manager: Any, name: str, *, limit: int | None, num_fewshot: int, seed: int,
                  chance: float | None, simple_evaluate: Any) -> TaskResult:
    start = time.perf_counter()
    if name not in manager.all_tasks:
        hint = (f" (offline tasks: {DEFAULT_SUITE}, {ALL_SUITE}, {ZEROSHOT_PREFIX}<name>; BIG-bench "
                f"lorashear_bb_<name> if its sdist was supplied)" if name.startswith("lorashear") else "")
        return TaskResult(task=name, chance=chance, error=f"unknown task {name!r}{hint}")
    try:
        # lm-eval prints tables and progress to stdout; keep our stdout clean.
        with contextlib.redirect_stdout(io.StringIO()):
            out = simple_evaluate(
                model=lm, tasks=[name], num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=1000, random_seed=seed, numpy_random_seed=seed,
                torch_random_seed=seed, fewshot_random_seed=seed,
            )
    except Exception as exc:  # noqa: BLE001 - one task's failure must not end the run
        logger.warning("task %s failed: %s", name, _first_line(exc))
        logger.debug("task %s traceback", name, exc_info=True)
        return TaskResult(task=name, chance=chance, seconds=time.perf_counter() - start, error=_first_line(exc))
    seconds = time.perf_counter() - start
    if not out or name not in out.get("results", {}):
        return TaskResult(task=name, chance=chance, seconds=seconds, error="lm-eval returned no result")
    metrics = out["results"][name]
    n = (out.get("n-samples") or {}).get(name) or {}
    result = TaskResult(
        task=name,
        acc=_clean(metrics.get("acc,none")),
        acc_stderr=_clean(metrics.get("acc_stderr,none")),
        acc_norm=_clean(metrics.get("acc_norm,none")),
        acc_norm_stderr=_clean(metrics.get("acc_norm_stderr,none")),
        num_docs=n.get("effective"),
        num_docs_total=n.get("original"),
        chance=chance,
        seconds=seconds,
    )
    if result.acc is None:
        result.error = "task reported no acc metric (not a multiple-choice task?)"
    # 0.0 is a real accuracy (e.g. the first docs of a task share one gold answer the model never picks)
    logger.info("%s: acc %s acc_norm %s (%s docs, %.1fs)", name,
                f"{result.acc:.4f}" if result.acc is not None else "-",
                f"{result.acc_norm:.4f}" if result.acc_norm is not None else "-", result.num_docs, seconds)
    return result


__all__ = ["METRICS", "TaskEvalResult", "TaskResult", "build_lm", "check_task_names", "evaluate_tasks",
           "lm_eval_available"]
