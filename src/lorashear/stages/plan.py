"""The plan of a ``lorashear run``: every step's config, what it reads and writes, and what it will do.

:func:`make_plan` resolves every stage's config and runs every check a stage would make later,
before the first stage starts (``--out`` and the stage directories, the model's files, the data,
the evaluation tasks and perplexity texts, the ratios' reachability on the model built on
``meta``, the export's support of the model and its tokenizer). It decides for each step:

- ``reuse``: its record (:mod:`lorashear.stages.records`) holds the same settings and inputs as the
  plan, and its output is still the one it wrote;
- ``resume``: an interrupted prune or recover with the same settings and inputs left checkpoints;
- ``run``: anything else, with the reason (no output yet, other settings or inputs, ``--force``, an
  input this run makes itself: the steps after a step that runs follow it). With ``--no-rerun``
  a step whose output or checkpoints were made with other settings is refused instead;
- ``skip``: not in ``--stages`` (its output, if any, is used as it is).

``lorashear run --dry-run`` prints :meth:`RunPlan.describe` and writes nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import validate_out, validate_out_file
from ..config import to_flat_dict
from ..errors import ConfigError
from ..evaluation.config import EvalConfig
from ..models.identity import directory_identity, file_identity, model_identity
from ..models.reference import is_reference_name
from . import analyze, evaluate, prune, recover
from .export import ExportConfig
from .layout import OWNER_FILES, TRANSIENT, RunLayout
from .pipeline_config import STAGES, PipelineConfig
from .records import PENDING, StageRecord, read_record

#: options that control how a step runs, not what it makes (left out of its record's settings)
RUN_CONTROL = frozenset({"out", "resume", "force", "progress", "keep_run_checkpoints", "checkpoint_every",
                         "keep_checkpoints", "log_every", "check_llama_cpp", "lorashear_version"})
#: options naming a step's inputs (recorded by content in its record's inputs, not by name)
INPUT_OPTIONS = frozenset({"model", "teacher", "baseline", "knowledge"})
#: the stages that checkpoint and can resume
RESUMABLE = ("prune", "recover")


@dataclass
class StepPlan:
    """One step of the run: its stage config, the planned record, and what it will do and why."""

    step: str                    #: analyze, prune, recover, eval, export-<outtype>
    stage: str                   #: analyze, prune, recover, eval, export
    config: Any
    sources: dict[str, str]      #: input name -> "model", or the stage whose output it is
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    #: settings and inputs as planned (an input made by this run is PENDING)
    record: StageRecord = dataclasses.field(default_factory=lambda: StageRecord(step="", settings={}, inputs={}))
    action: str = "run"          #: run, reuse, resume or skip
    reason: str = ""
    fresh: bool = False          #: start over: an earlier run's checkpoints are deleted
    does: str = ""               #: the work in one line (printed by --dry-run)

    @property
    def runs(self) -> bool:
        return self.action in ("run", "resume")


@dataclass
class RunPlan:
    """Every step of a run, resolved and checked (:func:`make_plan`)."""

    config: PipelineConfig
    layout: RunLayout
    model: str                   #: the model as the stages read it (a local directory made absolute)
    steps: list[StepPlan]

    def step(self, name: str) -> StepPlan | None:
        return next((s for s in self.steps if s.step == name), None)

    def current_inputs(self, step: StepPlan) -> dict[str, str]:
        """The identities of ``step``'s inputs as they are now (once the steps before it have run)."""
        inputs = Inputs(self.model, self.layout, persist=True)
        return {key: inputs.of(source) for key, source in step.sources.items()}

    @property
    def final_model(self) -> Path:
        return self.layout.final_model(self.config.stages)

    def describe(self) -> str:
        """The plan as ``lorashear run --dry-run`` prints it."""
        lines = [f"plan for {self.layout.root} (model {self.config.model}"
                 + (f" = {self.model}" if self.model != self.config.model else "") + "):"]
        for s in self.steps:
            fresh = "; starts over, deleting the interrupted run's checkpoints" if s.fresh else ""
            lines.append(f"  {s.step:<12} {s.action.upper():<7} {s.reason}{fresh}")
            if s.action != "skip":
                if s.does:
                    lines.append(f"  {'':<12} does   {s.does}")
                lines.append(f"  {'':<12} reads  {', '.join(s.reads)}")
                lines.append(f"  {'':<12} writes {', '.join(s.writes)}")
        runs = [s.step for s in self.steps if s.runs]
        lines.append(f"then {self.layout.report} and {self.layout.result}; "
                     + (f"{len(runs)} step(s) to run: {', '.join(runs)}" if runs else "nothing to run"))
        return "\n".join(lines)


# -- stage configs ---------------------------------------------------------------------------------
def canonical_model(name: str) -> str:
    """``name`` as the stages get it: a local directory absolute and normalised (``./m``, ``m/`` and
    ``/abs/m`` are one model), the built-in name and hub ids as given."""
    path = Path(name).expanduser()
    if is_reference_name(name) or not path.is_dir():
        return name
    return os.path.abspath(path)


#: the prune stage's options that ``lorashear run`` declares under the same names (every one of them but the
#: model, the output and the knowledge file, which the pipeline sets; its ``knowledge`` is the analysis section)
PRUNE_OPTIONS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(prune.PruneConfig)
    if f.name in {g.name for g in dataclasses.fields(PipelineConfig)} and f.name not in ("model", "out", "knowledge"))


def stage_configs(config: PipelineConfig, model: str | None = None) -> tuple[
        analyze.AnalyzeConfig, prune.PruneConfig, recover.RecoverConfig, EvalConfig]:
    """The stage configs the pipeline runs, all derived from ``config`` (``model``: the model as the stages
    read it, :func:`canonical_model` by default). Resuming and starting over are set by the plan."""
    layout = RunLayout(Path(config.out).expanduser())
    model = model if model is not None else canonical_model(config.model)
    knowledge = layout.knowledge
    a = analyze.AnalyzeConfig(model=model, out=str(layout.stage_dir("analyze")), dtype=config.dtype,
                              recipe=config.recipe, knowledge=config.knowledge)
    p = prune.PruneConfig(model=model, out=str(layout.pruned),
                          knowledge=str(knowledge) if ("analyze" in config.stages or knowledge.is_file()) else None,
                          **{name: getattr(config, name) for name in PRUNE_OPTIONS})
    r = dataclasses.replace(config.recovery, model=str(layout.pruned), teacher=model, out=str(layout.recovered),
                            dtype=config.dtype)
    e = dataclasses.replace(config.evaluation, model=str(layout.final_model(config.stages)), baseline=model,
                            out=str(layout.stage_dir("eval")), dtype=config.dtype)
    return a, p, r, e


def export_configs(config: PipelineConfig, layout: RunLayout) -> list[ExportConfig]:
    """One export per ``config.export_outtypes``: ``OUT/export/model-<outtype>.gguf``."""
    fmt = config.export or "gguf"
    model = str(layout.final_model(config.stages))
    return [dataclasses.replace(config.exporting, model=model, format=fmt, outtype=t,
                                out=str(layout.export_file(fmt, t))) for t in config.export_outtypes]


def step_settings(stage: str, cfg: Any) -> dict[str, Any]:
    """The settings that define what a step makes (its record's settings)."""
    left_out = RUN_CONTROL | INPUT_OPTIONS | (prune.NON_DEFINING if stage == "prune" else frozenset())
    return {k: v for k, v in to_flat_dict(cfg).items() if k not in left_out}


# -- identities of inputs and outputs ---------------------------------------------------------------
def _model_dir_identity(path: Path, persist: bool) -> str | None:
    return directory_identity(path, persist=persist) if (path / "config.json").is_file() else None


def _file_identity(path: Path, persist: bool) -> str | None:
    return file_identity(path, persist=persist) if path.is_file() else None


def output_identities(step: StepPlan, layout: RunLayout, *, persist: bool = True) -> dict[str, str] | None:
    """The content identities of a step's complete output as it is now; ``None`` when it is incomplete."""
    if step.stage == "analyze":
        found = {"knowledge": _file_identity(layout.knowledge, persist)}
    elif step.stage in ("prune", "recover"):
        report = layout.prune_report if step.stage == "prune" else layout.recover_report
        found = {"model": _model_dir_identity(layout.stage_dir(step.stage), persist) if report.is_file() else None}
    elif step.stage == "eval":
        found = {"eval": _file_identity(layout.eval_json, persist) if layout.eval_report.is_file() else None}
    else:
        gguf = Path(step.config.out)
        found = {"file": _file_identity(gguf, persist) if gguf.with_suffix(".json").is_file() else None}
    return None if None in found.values() else found  # type: ignore[return-value]


class Inputs:
    """Identities of the files steps read: the model by content; an earlier step's output by content, or
    PENDING when an earlier step of this run makes it."""

    def __init__(self, model: str, layout: RunLayout, persist: bool) -> None:
        self.layout, self.persist = layout, persist
        self.model = model_identity(model, persist=persist)
        self.made: set[str] = set()  # stages whose output this run makes

    def of(self, source: str) -> str:
        """The identity of ``source``: ``model``, or the stage whose output it is."""
        if source == "model":
            return self.model
        if source in self.made:
            return PENDING
        if source == "analyze":
            found = _file_identity(self.layout.knowledge, self.persist)
        else:
            found = _model_dir_identity(self.layout.stage_dir(source), self.persist)
        return found or "missing"


# -- the decisions ------------------------------------------------------------------------------------
def _changed(config: PipelineConfig, step: StepPlan, what: str, diff: list[str]) -> tuple[str, str]:
    detail = f"{what}" + (f" ({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''})" if diff else "")
    if not config.rerun:
        raise ConfigError(f"{step.step}: {detail}; run without --no-rerun to re-run it (and the stages after it), "
                          "or choose another --out")
    return "run", detail


def has_checkpoints(layout: RunLayout, stage: str) -> bool:
    root = layout.checkpoints(stage)
    return root.is_dir() and any(p.is_dir() for p in root.rglob("step-*"))


def decide(step: StepPlan, config: PipelineConfig, layout: RunLayout, *, persist: bool = True) -> tuple[str, str]:
    """``(action, reason)`` of one selected step (see the module docstring)."""
    if config.force:
        return "run", "--force"
    pending = [k for k, v in step.record.inputs.items() if v == PENDING]
    if pending:
        return "run", f"its input ({pending[0]}) is made by this run"
    if step.stage in RESUMABLE and has_checkpoints(layout, step.stage):
        attempt = read_record(layout.attempt(step.step))
        if attempt is None:
            return "resume", "an interrupted run left checkpoints (the stage checks that they are this run's)"
        diff = attempt.differences(step.record)
        if not diff:
            return "resume", "an interrupted run with the same settings and inputs left checkpoints"
        return _changed(config, step, "its checkpoints are of a run with other settings or inputs", diff)
    current = output_identities(step, layout, persist=persist)
    if current is None:
        return "run", "no output yet"
    record = read_record(layout.record(step.step))
    if record is None:
        return _changed(config, step, "no record of the settings its output was made with", [])
    diff = record.differences(step.record)
    if diff:
        return _changed(config, step, "its output was made with other settings or inputs", diff)
    if record.outputs != current:
        return _changed(config, step, "its output changed after it was made", [])
    return "reuse", "its output was made with the same settings and inputs"


# -- the checks before any work ---------------------------------------------------------------------
def check_prune_target(config: prune.PruneConfig, *, knowledge: str | None) -> None:
    """The prune target's reachability (``--ratio``, ``--attention-ratio``, ``--mlp-ratio``) on the model
    built on ``meta`` with LoRA attached (no weights read), with the protected blocks of ``knowledge`` (an
    existing knowledge.json) and ``--unprunable``; and that the config accepts a pruned hidden size if hidden
    channels are pruned."""
    from ..graph.discover import discover
    from ..models.loading import build_meta_model, resolve_model_path
    from ..models.lora import attach_lora
    from ..models.params import count_params

    resolved = Path(resolve_model_path(config.model))
    if not resolved.is_dir():
        return  # a hub id: checked by the stage once loaded
    model = build_meta_model(resolved, name=config.model)
    prune.check_hidden_width(config, model.config)
    total = count_params(model)
    graph = discover(attach_lora(model, config.lora), hidden="hidden_channel" in config.target.kinds)
    excluded, _ = prune.unprunable_ids(graph, knowledge, config.unprunable)
    candidates = [g for g in graph.groups if g.prunable and g.id not in excluded]
    prune.check_reachable(candidates, graph.groups, config.target, total)


def _check_prune_settings(plan: RunPlan, step: StepPlan) -> None:
    prune.check_config(step.config)


def _check_eval_settings(plan: RunPlan, step: StepPlan) -> None:
    evaluate.check_config(step.config)


def _check_export_settings(plan: RunPlan, step: StepPlan) -> None:
    validate_out_file(step.config.out, flag="--export")


def _check_analyze_inputs(plan: RunPlan, step: StepPlan) -> None:
    analyze.check_config(step.config)


def _check_prune_inputs(plan: RunPlan, step: StepPlan) -> None:
    from ..data import check_texts

    check_texts(step.config.data.spec)
    analyze_step = plan.step("analyze")
    stale = analyze_step is not None and analyze_step.runs
    knowledge = None if stale or not plan.layout.knowledge.is_file() else str(plan.layout.knowledge)
    check_prune_target(step.config, knowledge=knowledge)


def _check_recover_inputs(plan: RunPlan, step: StepPlan) -> None:
    recover.check_sources(step.config)


def _check_eval_inputs(plan: RunPlan, step: StepPlan) -> None:
    evaluate.eval_texts(step.config)


def _check_export_inputs(plan: RunPlan, step: StepPlan) -> None:
    from ..export.formats import get_format

    get_format(step.config.format).check(plan.model)


Check = Callable[[RunPlan, StepPlan], None]
#: the checks of every step that runs, before any work: first the settings of every step, then its inputs
SETTINGS_CHECKS: dict[str, Check] = {"prune": _check_prune_settings, "eval": _check_eval_settings,
                                     "export": _check_export_settings}
INPUT_CHECKS: dict[str, Check] = {"analyze": _check_analyze_inputs, "prune": _check_prune_inputs,
                                  "recover": _check_recover_inputs, "eval": _check_eval_inputs,
                                  "export": _check_export_inputs}


# -- the plan -------------------------------------------------------------------------------------------
def prune_work(p: Any) -> str:
    """The prune stage's budget in one line: when pruning happens, when the model is compacted, and what the
    small model trains on for the rest of the budget."""
    steps = p.train.steps
    sched = p.lhspg.resolve(steps).schedule
    target = f"{p.target.ratio:.0%} of the parameters" if p.target.ratio is not None else "the set ratios"
    head = f"removes {target} with LHSPG over steps {sched.warmup_steps}-{sched.prune_end} of {steps}"
    if p.compact_at == "end" or sched.prune_end >= steps:
        return head + f", the masked model at full width to step {steps}, then compacted"
    rest = {"recover": "recovery rounds on the dynamic mix of " + ", ".join(p.post.sources),
            "full": f"{p.data.spec}, every weight at lr {p.post_lr:g}"}.get(p.post_pruning, p.data.spec)
    when = (f"each period's structures cut out as it ends once the cut pays, the last at step {sched.prune_end}"
            if p.compact_at == "period_end" else f"compacted at step {sched.prune_end}")
    return head + f"; {when}, the small model trains on to step {steps} ({rest})"


def _steps(config: PipelineConfig, layout: RunLayout, model: str, inputs: Inputs) -> list[StepPlan]:
    """Every step in order, with its planned record, what it reads and writes, and its action."""
    a, p, r, e = stage_configs(config, model)
    final = layout.final_model(config.stages)
    final_stage = "recover" if "recover" in config.stages else "prune"
    steps = [
        StepPlan("analyze", "analyze", a, sources={"model": "model"},
                 reads=(config.model, a.knowledge.data), writes=(a.out,)),
        StepPlan("prune", "prune", p, sources={"model": "model", **({"knowledge": "analyze"} if p.knowledge else {})},
                 reads=(config.model, p.data.spec, *([p.knowledge] if p.knowledge else [])), writes=(p.out,)),
        StepPlan("recover", "recover", r, sources={"model": "prune", "teacher": "model"},
                 reads=(r.model, config.model, *r.data, *r.instruct_data), writes=(r.out,)),
        StepPlan("eval", "eval", e, sources={"model": final_stage, "baseline": "model"},
                 reads=(str(final), config.model, *([] if e.skip_ppl else [e.ppl_source]), *e.ppl_more_sources),
                 writes=(e.out,)),
    ]
    steps[1].does = prune_work(p)
    if config.export is not None:
        steps += [StepPlan(f"export-{x.outtype}", "export", x, sources={"model": final_stage},
                           reads=(str(final),), writes=(x.out, str(Path(x.out).with_suffix(".json"))))
                  for x in export_configs(config, layout)]
    for step in steps:
        step.record = StageRecord(step=step.step, settings=step_settings(step.stage, step.config),
                                  inputs={key: inputs.of(source) for key, source in step.sources.items()})
        if step.stage in config.stages or step.stage == "export":
            step.action, step.reason = decide(step, config, layout, persist=inputs.persist)
        else:
            step.action, step.reason = "skip", "not in --stages"
        if step.runs:
            inputs.made.add(step.stage)
    return steps


def _resume_settings(step: StepPlan, layout: RunLayout) -> None:
    """What the stage is told: resume an interrupted run, or start over, deleting the checkpoints an
    interrupted run of other settings or inputs left."""
    if step.stage in RESUMABLE and step.action == "run" and has_checkpoints(layout, step.stage):
        step.fresh = True
    if step.stage == "prune":
        step.config = dataclasses.replace(step.config, resume=step.action == "resume",
                                          force=step.config.force or step.fresh)
    elif step.stage == "recover":
        step.config = dataclasses.replace(step.config, resume=step.action == "resume")


def _check_stage_dirs(plan: RunPlan) -> None:
    for step in plan.steps:
        if step.runs and step.stage in OWNER_FILES:
            validate_out(step.config.out, owner_files=OWNER_FILES[step.stage],
                         transient=TRANSIENT[step.stage])


def make_plan(config: PipelineConfig, *, persist: bool = True) -> RunPlan:
    """Resolve and check every step of ``config`` before any work (see the module docstring); one line
    (a :class:`~lorashear.errors.LorashearError`) for the first thing a stage would refuse.

    ``persist=False`` writes nothing at all, not even the cache of model file hashes (``--dry-run``)."""
    from ..models.loading import check_causal_lm

    layout = RunLayout(validate_out(config.out))
    model = canonical_model(config.model)
    check_causal_lm(model, name=config.model)
    inputs = Inputs(model, layout, persist)
    plan = RunPlan(config=config, layout=layout, model=model, steps=_steps(config, layout, model, inputs))
    for step in plan.steps:
        if step.runs and step.record.inputs.get("model") == "missing":
            raise ConfigError(f"no model to {step.stage} under {Path(step.reads[0])}; run the prune stage first")
    _check_stage_dirs(plan)
    for step in plan.steps:
        _resume_settings(step, layout)
    for checks in (SETTINGS_CHECKS, INPUT_CHECKS):
        for step in plan.steps:
            if step.runs and step.stage in checks:
                checks[step.stage](plan, step)
    return plan


__all__ = ["RESUMABLE", "RUN_CONTROL", "Inputs", "RunPlan", "STAGES", "StepPlan", "canonical_model",
           "check_prune_target", "decide", "export_configs", "has_checkpoints", "make_plan", "output_identities",
           "stage_configs", "step_settings"]
