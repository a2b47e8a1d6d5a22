"""The whole method as one recipe over the stage functions: analyze -> prune -> recover -> evaluate.

Stages, each the same function as its own command, all writing under ``config.out``:

1. ``analyze``  knowledge distribution analysis -> ``knowledge/knowledge.json``
2. ``prune``    LHSPG progressive pruning + compaction -> ``pruned/`` (+ report)
3. ``recover``  dynamic knowledge recovery of the pruned model -> ``recovered/`` (off by default:
                ``--stages analyze,prune,recover,eval``)
4. ``eval``     the final model against the dense one -> ``eval/report.md``
5. ``export``   with ``--export gguf``: the final model as GGUF files for llama.cpp -> ``export/``

and at the end ``report.md`` at the top of the run directory (:mod:`lorashear.stages.report`):
settings, knowledge heatmap, pruning curves, kept widths, recovery rounds, the before/after table
and how to load and serve the model. ``--quick`` is a smoke-test preset (a few minutes on a CPU).

A stage whose output is complete is skipped unless ``force``; an interrupted prune
resumes from its latest checkpoint. The resolved config is saved as
``config.yaml`` (readable by ``--config``) and the outcome as ``pipeline_result.json``.

From Python::

    from lorashear.stages import pipeline
    result = pipeline.run(pipeline.PipelineConfig(model="smollm2-135m-instruct", out="runs/p20"))
    print(result.model_dir, result.report)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..atomic import atomic_write_json, atomic_write_text, output_lock, validate_out
from ..config import section, to_flat_dict
from ..data.config import DataConfig
from ..errors import ConfigError
from ..evaluation.config import EvalConfig
from ..knowledge.config import KnowledgeConfig
from ..lhspg.optimizer import LHSPGConfig
from ..lhspg.targets import TargetConfig
from ..models.lora import LoraSettings
from ..models.reference import REFERENCE_MODEL_NAME
from ..export.gguf import OUTTYPES
from ..recipes import DEFAULT_RECIPE, PIPELINE_RECIPES
from ..training.loop import TrainConfig
from ..training.losses import DistillConfig
from . import analyze, evaluate, export, prune, recover
from .export import FORMATS as EXPORT_FORMATS
from .export import ExportConfig
from .report import write_run_report

logger = logging.getLogger(__name__)

STAGES = ("analyze", "prune", "recover", "eval")
DEFAULT_STAGES = ("analyze", "prune", "eval")
RESULT_FILE = "pipeline_result.json"
CONFIG_FILE = "config.yaml"
EXPORT_DIR = "export"

#: ``--quick``: what it sets unless given (a smoke test of every stage in a few minutes on a CPU)
QUICK: dict[str, Any] = {
    "steps": 20, "num_sequences": 64, "checkpoint_every": 0,
    "analyze_num_sequences": 4, "analyze_ratios": [0.5],
    "recover_steps": 5, "recover_max_rounds": 1, "recover_val_sequences": 4, "recover_instruct_data": [],
    "eval_limit": 10, "eval_ppl_max_windows": 8, "eval_speed_batch_sizes": [1], "eval_speed_repeats": 1,
}


@dataclass
class PipelineConfig:
    """The pipeline: shared inputs plus the settings of every component the stages use."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = PIPELINE_RECIPES
    PRESET_FLAGS: ClassVar[dict[str, dict[str, Any]]] = {"quick": QUICK}

    model: str = field(default=REFERENCE_MODEL_NAME, metadata={
        "help": "hub id, local directory or built-in name", "cli": False})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": f"preset of defaults for every option not given: {', '.join(RECIPES)} (see lorashear.recipes)"})
    out: str = field(default="runs/lorashear", metadata={"help": "run directory"})
    stages: tuple[str, ...] = field(default=DEFAULT_STAGES, metadata={
        "help": f"stages to run, in order, from {', '.join(STAGES)}"})
    force: bool = field(default=False, metadata={"help": "re-run stages whose outputs exist"})
    quick: bool = field(default=False, metadata={
        "help": "smoke-test preset, a few minutes on a CPU: 20 prune steps, small analysis and evaluation "
                "(options given explicitly still win)"})
    export: str | None = field(default=None, metadata={
        "help": f"also write the final model for a serving engine: {', '.join(EXPORT_FORMATS)} "
                "(into OUT/export/, one file per --export-outtypes)"})
    export_outtypes: tuple[str, ...] = field(default=("f16",), metadata={
        "help": "tensor types of the exported files, e.g. f16,q8_0"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the model"})
    data: DataConfig = section(DataConfig, help="training text of the prune stage")
    knowledge: KnowledgeConfig = section(KnowledgeConfig, prefix="analyze_", help="knowledge analysis",
                                         num_sequences=8)
    lora: LoraSettings = section(LoraSettings, prefix="lora_", help="LoRA factors")
    target: TargetConfig = section(TargetConfig, help="how much to remove", ratio=0.2)
    lhspg: LHSPGConfig = section(LHSPGConfig, help="LHSPG schedule and saliency")
    # 180 steps: the whole default run fits 30 minutes on a 2-core CPU (measured; README)
    train: TrainConfig = section(TrainConfig, help="training loop", steps=180, batch_size=2, checkpoint_every=50)
    distill: DistillConfig = section(DistillConfig, prefix="distill_", help="distillation from the dense model")
    recovery: recover.RecoverConfig = section(recover.RecoverConfig, prefix="recover_",
                                              help="dynamic knowledge recovery")
    evaluation: EvalConfig = section(EvalConfig, prefix="eval_", help="evaluation", limit=50, ppl_max_windows=64,
                                     ppl_more_sources=["builtin:heldout-docs-test"])
    exporting: ExportConfig = section(ExportConfig, prefix="export_", help="GGUF export")

    def __post_init__(self) -> None:
        self.stages = tuple(s.strip() for s in self.stages if s.strip())
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if not self.stages:
            raise ConfigError(f"no stage to run; choose from {', '.join(STAGES)}")
        if self.export is not None and self.export not in EXPORT_FORMATS:
            raise ConfigError(f"unknown --export {self.export!r}; use one of {', '.join(EXPORT_FORMATS)}")
        self.export_outtypes = tuple(self.export_outtypes)
        bad = [t for t in self.export_outtypes if t not in OUTTYPES]
        if bad or not self.export_outtypes:
            raise ConfigError(f"unknown --export-outtypes {', '.join(bad) or '(none)'}; use {', '.join(OUTTYPES)}")


#: options the pipeline sets itself (hidden from the command line)
PIPELINE_OWNED = ("eval_baseline", "eval_dtype", "recover_teacher", "recover_dtype", "recover_resume",
                  "export_format", "export_outtype")


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


def stage_configs(config: PipelineConfig) -> tuple[analyze.AnalyzeConfig, prune.PruneConfig,
                                                    recover.RecoverConfig, EvalConfig]:
    """The stage configs the pipeline runs, all derived from ``config``."""
    out = Path(config.out)
    knowledge_json = out / "knowledge" / "knowledge.json"
    a = analyze.AnalyzeConfig(model=config.model, out=str(out / "knowledge"), dtype=config.dtype,
                              recipe=config.recipe, knowledge=config.knowledge)
    p = prune.PruneConfig(model=config.model, out=str(out / "pruned"), data=config.data, dtype=config.dtype,
                          knowledge=str(knowledge_json) if ("analyze" in config.stages or knowledge_json.is_file())
                          else None,
                          lora=config.lora, target=config.target, lhspg=config.lhspg, train=config.train,
                          distill=config.distill, recipe=config.recipe,
                          resume=(out / "pruned" / "checkpoints").is_dir() and not config.force, force=config.force)
    r = dataclasses.replace(config.recovery, model=str(out / "pruned"), teacher=config.model,
                            out=str(out / "recovered"), dtype=config.dtype,
                            resume=(out / "recovered" / "checkpoints").is_dir() and not config.force)
    final = out / ("recovered" if "recover" in config.stages else "pruned")
    e = dataclasses.replace(config.evaluation, model=str(final), baseline=config.model,
                            out=str(out / "eval"), dtype=config.dtype)
    return a, p, r, e


def check_config(config: PipelineConfig, stage_cfgs: tuple[Any, ...]) -> None:
    """What the stages would refuse later, checked before the first stage writes anything."""
    _, p_cfg, _, e_cfg = stage_cfgs
    for sub in ("knowledge", "pruned", "recovered", "eval"):
        validate_out(Path(config.out) / sub)
    if "prune" in config.stages:
        prune.check_config(p_cfg)
    if "eval" in config.stages:
        evaluate.check_config(e_cfg)


def run(config: PipelineConfig) -> PipelineResult:
    """Run the stages of ``config`` in order; see the module docstring.

    ``config.out`` and every stage's settings are checked before the first stage runs; the run
    directory is locked for the pipeline's duration (each stage also locks its own directory).
    """
    out = validate_out(config.out)
    stage_cfgs = stage_configs(config)
    check_config(config, stage_cfgs)
    world, rank = launched_processes()
    if world > 1 and set(config.stages) != {"prune"}:
        raise ConfigError(f"under a multi-process launch ({world} processes) run only --stages prune; run the "
                          "analyze stage before it and eval after it in one process (see examples/multi_gpu.sh)")
    with output_lock(out, enabled=rank == 0):
        return _run(config, out, stage_cfgs, main=rank == 0)


def launched_processes() -> tuple[int, int]:
    """(world size, rank) of this process as ``accelerate launch``/``torchrun`` set them; (1, 0) alone."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return 1, 0


def _run(config: PipelineConfig, out: Path, stage_cfgs: tuple[Any, ...], main: bool = True) -> PipelineResult:
    a_cfg, p_cfg, r_cfg, e_cfg = stage_cfgs
    out.mkdir(parents=True, exist_ok=True)
    import yaml

    if main:
        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(to_flat_dict(config), sort_keys=False))
    result = PipelineResult(out=str(out), model_dir=None, report=None, stages_run=[], stages_skipped=[], seconds={})

    def timed(name: str, fn):
        t = time.perf_counter()
        value = fn()
        result.seconds[name] = round(time.perf_counter() - t, 2)
        result.stages_run.append(name)
        return value

    if "analyze" in config.stages:
        if config.force or not Path(a_cfg.out, "knowledge.json").is_file():
            result.analyze = timed("analyze", lambda: analyze.run(a_cfg)).summary()
        else:
            result.stages_skipped.append("analyze")
    if "prune" in config.stages:
        if config.force or not Path(p_cfg.out, prune.REPORT_FILE).is_file():
            pruned = timed("prune", lambda: prune.run(p_cfg))
            result.prune = pruned.summary() if pruned is not None else None
        else:
            result.stages_skipped.append("prune")
    if Path(p_cfg.out, "config.json").is_file():
        result.model_dir = p_cfg.out
    if "recover" in config.stages:
        if result.model_dir is None:
            raise ConfigError(f"no pruned model under {p_cfg.out}; run the prune stage first")
        if config.force or not Path(r_cfg.out, "recover_report.json").is_file():
            result.recover = timed("recover", lambda: recover.run(r_cfg)).summary()
        else:
            result.stages_skipped.append("recover")
        result.model_dir = r_cfg.out
    if "eval" in config.stages:
        if result.model_dir is None or not Path(result.model_dir, "config.json").is_file():
            raise ConfigError(f"no model to evaluate under {out}; run the prune stage first")
        report = timed("eval", lambda: evaluate.run(e_cfg))
        result.eval = report.to_dict()
    if Path(e_cfg.out, evaluate.REPORT_FILE).is_file():
        result.report = str(Path(e_cfg.out) / evaluate.REPORT_FILE)
    if not main:  # the other processes of a multi-process prune: the main one writes the rest
        return result
    if config.export is not None:
        if result.model_dir is None or not Path(result.model_dir, "config.json").is_file():
            raise ConfigError(f"no model to export under {out}; run the prune stage first")
        result.exports = timed("export", lambda: _export(config, out, result.model_dir))
    result.run_report = str(write_run_report(out, model_dir=result.model_dir, timings=result.seconds))
    atomic_write_json(out / RESULT_FILE, dataclasses.asdict(result))
    return result


def export_configs(config: PipelineConfig, out: Path, model_dir: str) -> list[ExportConfig]:
    """One export per ``config.export_outtypes``: ``OUT/export/model-<outtype>.gguf``."""
    return [dataclasses.replace(config.exporting, model=model_dir, format=config.export or "gguf", outtype=t,
                                out=str(out / EXPORT_DIR / f"model-{t}.{config.export}"))
            for t in config.export_outtypes]


def _export(config: PipelineConfig, out: Path, model_dir: str) -> list[str]:
    """Write the exports that are missing (all of them with ``force``), each beside its JSON record."""
    written = []
    for cfg in export_configs(config, out, model_dir):
        record = Path(cfg.out).with_suffix(".json")
        done = Path(cfg.out).is_file() and record.is_file()
        if done:  # an export of another model (e.g. the pruned one, before recovery ran) is redone
            try:
                done = json.loads(record.read_text()).get("model") == model_dir
            except (OSError, ValueError):
                done = False
        if config.force or not done:
            exported = export.run(cfg)
            atomic_write_json(record, exported.to_dict())
            logger.info("exported %s (%s, %s)", cfg.out, exported.arch, cfg.outtype)
        written.append(cfg.out)
    return written
