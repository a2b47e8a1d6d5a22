"""The whole method as one recipe over the stage functions: analyze -> prune -> recover -> evaluate.

Stages, each the same function as its own command, all writing under ``config.out``
(the layout: :mod:`lorashear.stages.layout`):

1. ``analyze``  knowledge distribution analysis -> ``knowledge/knowledge.json``
2. ``prune``    LHSPG progressive pruning + compaction -> ``pruned/`` (+ report)
3. ``recover``  dynamic knowledge recovery of the pruned model -> ``recovered/`` (off by default:
                ``--stages analyze,prune,recover,eval``)
4. ``eval``     the final model against the dense one -> ``eval/report.md``
5. ``export``   with ``--export gguf``: the final model as GGUF files for llama.cpp -> ``export/``

and at the end ``report.md`` at the top of the run directory (:mod:`lorashear.stages.report`):
settings, knowledge heatmap, pruning curves, kept widths, recovery rounds, the before/after table
and how to load and serve the model. ``--quick`` is a smoke-test preset (a few minutes on a CPU).

First the plan (:mod:`lorashear.stages.plan`): every step's config, inputs and outputs resolved
and every check a stage would make run, before the first stage starts; ``--dry-run`` prints it.
A step is reused when its record (:mod:`lorashear.stages.records`) holds this run's settings and
inputs (models by content) and its output is the one it wrote; otherwise it runs again, and so do
the steps after it (``--no-rerun`` refuses instead); an interrupted prune or recover with the same
settings resumes from its latest checkpoint; ``--force`` re-runs everything from scratch. After each
step, its record and the resolved config (``config.yaml``, readable by ``--config``) are written;
nothing is written when the run fails before a step has finished, and the run directory is locked
as a whole for the run's duration (no stage of another run may write inside it).

From Python::

    from lorashear.stages import pipeline
    result = pipeline.run(pipeline.PipelineConfig(model="smollm2-135m-instruct", out="runs/p20"))
    print(result.model_dir, result.report)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_json, atomic_write_text, output_lock, validate_out
from ..config import to_flat_dict
from ..errors import ConfigError
from . import analyze, evaluate, export, prune, recover
from .layout import CONFIG_FILE, RESULT_FILE, RunLayout
from .pipeline_config import DEFAULT_STAGES, PIPELINE_OWNED, QUICK, STAGES, PipelineConfig
from .plan import RESUMABLE, RunPlan, StepPlan, export_configs, has_checkpoints, make_plan, output_identities
from .plan import stage_configs
from .records import write_record
from .report import write_run_report

logger = logging.getLogger(__name__)


@dataclass
class PipelineResult:
    """Where the pipeline's outputs are and what each stage returned (``pipeline_result.json``)."""

    out: str
    model_dir: str | None
    report: str | None
    stages_run: list[str]
    stages_skipped: list[str]
    seconds: dict[str, float]
    analyze: dict[str, Any] | None = None
    prune: dict[str, Any] | None = None
    recover: dict[str, Any] | None = None
    eval: dict[str, Any] | None = None
    exports: list[str] = dataclasses.field(default_factory=list)
    run_report: str | None = None

    def load_model(self, **kwargs: Any) -> Any:
        """The final (pruned, or recovered) model, loaded; layers of different widths included."""
        from ..models.loading import load_pretrained

        if self.model_dir is None:
            raise ConfigError(f"the run in {self.out} produced no model yet")
        return load_pretrained(self.model_dir, **kwargs)

    def load_tokenizer(self) -> Any:
        from ..models.loading import load_tokenizer

        if self.model_dir is None:
            raise ConfigError(f"the run in {self.out} produced no model yet")
        return load_tokenizer(self.model_dir)

    def read_report(self) -> str:
        """The run report (``report.md``) as text."""
        if self.run_report is None:
            raise ConfigError(f"the run in {self.out} wrote no report")
        return Path(self.run_report).read_text()


def plan(config: PipelineConfig) -> RunPlan:
    """The plan of ``config`` with every up-front check made, writing nothing (``lorashear run --dry-run``)."""
    return make_plan(config, persist=False)


def run(config: PipelineConfig) -> PipelineResult:
    """Plan ``config`` (every check before any work), then run its steps in order; see the module docstring.

    The run directory is locked as a whole for the run's duration; a run that fails before its first
    step has finished leaves nothing behind (an earlier run's results stay as they were).
    """
    out = validate_out(config.out)
    world, rank = launched_processes()
    if world > 1 and set(config.stages) != {"prune"}:
        raise ConfigError(f"under a multi-process launch ({world} processes) run only --stages prune; run the "
                          "analyze stage before it and eval after it in one process (see examples/multi_gpu.sh)")
    main = rank == 0
    created = not out.exists()
    try:
        with output_lock(out, enabled=main, tree=True):
            return _run(make_plan(config), main=main)
    finally:
        if created and main:
            with contextlib.suppress(OSError):
                out.rmdir()  # only when empty: a run that failed before writing anything


def launched_processes() -> tuple[int, int]:
    """(world size, rank) of this process as ``accelerate launch``/``torchrun`` set them; (1, 0) alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return 1, 0


def _run_analyze(step: StepPlan, result: PipelineResult) -> None:
    result.analyze = analyze.run(step.config).summary()


def _run_prune(step: StepPlan, result: PipelineResult) -> None:
    pruned = prune.run(step.config)
    result.prune = pruned.summary() if pruned is not None else None


def _run_recover(step: StepPlan, result: PipelineResult) -> None:
    recovered = recover.run(step.config)
    result.recover = recovered.summary() if recovered is not None else None


def _run_eval(step: StepPlan, result: PipelineResult) -> None:
    result.eval = evaluate.run(step.config).to_dict()


def _run_export(step: StepPlan, result: PipelineResult) -> None:
    exported = export.run(step.config)
    atomic_write_json(Path(step.config.out).with_suffix(".json"), exported.to_dict())
    logger.info("exported %s (%s, %s)", step.config.out, exported.arch, step.config.outtype)


RUNNERS: dict[str, Callable[[StepPlan, PipelineResult], None]] = {
    "analyze": _run_analyze, "prune": _run_prune, "recover": _run_recover, "eval": _run_eval, "export": _run_export}


def _checkpoints_now(layout: RunLayout, stage: str) -> list[tuple[str, int]]:
    root = layout.checkpoints(stage)
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("step-*")) \
        if root.is_dir() else []


@contextlib.contextmanager
def _attempt(plan: RunPlan, step: StepPlan, inputs: dict[str, str]) -> Iterator[None]:
    """While a resumable step runs, ``records/<step>.started.json`` says what it runs with, so that a later
    run resumes its checkpoints only with the same settings and inputs. Removed when the step finishes;
    put back as it was when the step fails without writing a checkpoint (it describes the checkpoints)."""
    layout = plan.layout
    path = layout.attempt(step.step)
    created = not layout.records.exists()
    previous = path.read_text(encoding="utf-8") if path.is_file() else None
    checkpoints = _checkpoints_now(layout, step.stage)
    write_record(path, dataclasses.replace(step.record, inputs=inputs))
    try:
        yield
    except BaseException:
        if _checkpoints_now(layout, step.stage) == checkpoints:
            _put_back(path, previous, layout.records if created else None)
        raise
    path.unlink(missing_ok=True)


def _put_back(path: Path, previous: str | None, created_dir: Path | None) -> None:
    """``path`` as it was (``None``: absent), and ``created_dir`` removed again when it is empty."""
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, previous)
    if created_dir is not None:
        with contextlib.suppress(OSError):
            created_dir.rmdir()


def _run_step(plan: RunPlan, step: StepPlan, result: PipelineResult, main: bool) -> None:
    """Run one step; then write its record (settings, inputs and outputs by content) and ``config.yaml``."""
    inputs = plan.current_inputs(step)
    attempt = _attempt(plan, step, inputs) if main and step.stage in RESUMABLE else contextlib.nullcontext()
    start = time.perf_counter()
    with attempt:
        RUNNERS[step.stage](step, result)
    result.seconds[step.stage] = round(result.seconds.get(step.stage, 0.0) + time.perf_counter() - start, 2)
    if step.stage not in result.stages_run:  # one entry for all export steps
        result.stages_run.append(step.stage)
    if main:
        outputs = output_identities(step, plan.layout) or {}
        write_record(plan.layout.record(step.step), dataclasses.replace(step.record, inputs=inputs, outputs=outputs))
        _write_config(plan)


def _write_config(plan: RunPlan) -> None:
    import yaml

    atomic_write_text(plan.layout.config, yaml.safe_dump(to_flat_dict(plan.config), sort_keys=False))


def _run(plan: RunPlan, main: bool = True) -> PipelineResult:
    layout = plan.layout
    logger.info("%s", plan.describe())
    result = PipelineResult(out=str(layout.root), model_dir=None, report=None, stages_run=[], stages_skipped=[],
                            seconds={})
    for step in plan.steps:
        if step.action == "reuse" and step.stage not in result.stages_skipped:
            result.stages_skipped.append(step.stage)
        if step.runs:
            _run_step(plan, step, result, main)
        if step.stage == "export" and step.action != "skip":
            result.exports.append(step.config.out)
    final = plan.final_model
    result.model_dir = str(final) if (final / "config.json").is_file() else None
    if layout.eval_report.is_file():
        result.report = str(layout.eval_report)
    if not main:  # the other processes of a multi-process prune: the main one writes the rest
        return result
    _write_config(plan)
    result.run_report = str(write_run_report(layout.root, model_dir=result.model_dir, timings=result.seconds))
    atomic_write_json(layout.result, dataclasses.asdict(result))
    return result


__all__ = ["CONFIG_FILE", "DEFAULT_STAGES", "PIPELINE_OWNED", "QUICK", "RESULT_FILE", "STAGES", "PipelineConfig",
           "PipelineResult", "RunLayout", "export_configs", "plan", "run", "stage_configs"]
