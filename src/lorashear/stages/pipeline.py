"""The whole method as one recipe over the stage functions: analyze -> prune -> recover -> evaluate.

Stages, each the same function as its own command, all writing under ``config.out``:

1. ``analyze``  knowledge distribution analysis -> ``knowledge/knowledge.json``
2. ``prune``    LHSPG progressive pruning + compaction -> ``pruned/`` (+ report)
3. ``recover``  dynamic knowledge recovery of the pruned model -> ``recovered/`` (off by default:
                ``--stages analyze,prune,recover,eval``)
4. ``eval``     the final model against the dense one -> ``eval/report.md``

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
import logging
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
from ..recipes import DEFAULT_RECIPE, RECIPES
from ..training.loop import TrainConfig
from ..training.losses import DistillConfig
from . import analyze, evaluate, prune, recover

logger = logging.getLogger(__name__)

STAGES = ("analyze", "prune", "recover", "eval")
DEFAULT_STAGES = ("analyze", "prune", "eval")
RESULT_FILE = "pipeline_result.json"
CONFIG_FILE = "config.yaml"


@dataclass
class PipelineConfig:
    """The pipeline: shared inputs plus the settings of every component the stages use."""

    RECIPES: ClassVar[dict[str, dict[str, Any]]] = RECIPES

    model: str = field(default=REFERENCE_MODEL_NAME, metadata={
        "help": "hub id, local directory or built-in name", "cli": False})
    recipe: str = field(default=DEFAULT_RECIPE, metadata={
        "help": f"preset of defaults for every option not given: {', '.join(RECIPES)} (see lorashear.recipes)"})
    out: str = field(default="runs/lorashear", metadata={"help": "run directory"})
    stages: tuple[str, ...] = field(default=DEFAULT_STAGES, metadata={
        "help": f"stages to run, in order, from {', '.join(STAGES)}"})
    force: bool = field(default=False, metadata={"help": "re-run stages whose outputs exist"})
    dtype: str = field(default="float32", metadata={"help": "parameter dtype of the model"})
    data: DataConfig = section(DataConfig, help="training text of the prune stage")
    knowledge: KnowledgeConfig = section(KnowledgeConfig, prefix="analyze_", help="knowledge analysis",
                                         num_sequences=8)
    lora: LoraSettings = section(LoraSettings, prefix="lora_", help="LoRA factors")
    target: TargetConfig = section(TargetConfig, help="how much to remove", ratio=0.2)
    lhspg: LHSPGConfig = section(LHSPGConfig, help="LHSPG schedule and saliency")
    train: TrainConfig = section(TrainConfig, help="training loop", steps=200, batch_size=2, checkpoint_every=50)
    distill: DistillConfig = section(DistillConfig, prefix="distill_", help="distillation from the dense model")
    recovery: recover.RecoverConfig = section(recover.RecoverConfig, prefix="recover_",
                                              help="dynamic knowledge recovery")
    evaluation: EvalConfig = section(EvalConfig, prefix="eval_", help="evaluation", limit=50)

    def __post_init__(self) -> None:
        self.stages = tuple(s.strip() for s in self.stages if s.strip())
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
        if not self.stages:
            raise ConfigError(f"no stage to run; choose from {', '.join(STAGES)}")


#: options the pipeline sets itself (hidden from the command line)
PIPELINE_OWNED = ("eval_baseline", "eval_dtype", "recover_teacher", "recover_dtype", "recover_resume")


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


def stage_configs(config: PipelineConfig) -> tuple[analyze.AnalyzeConfig, prune.PruneConfig,
                                                    recover.RecoverConfig, EvalConfig]:
    """The stage configs the pipeline runs, all derived from ``config``."""
    out = Path(config.out)
    knowledge_json = out / "knowledge" / "knowledge.json"
    a = analyze.AnalyzeConfig(model=config.model, out=str(out / "knowledge"), dtype=config.dtype,
                              knowledge=config.knowledge)
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
    with output_lock(out):
        return _run(config, out, stage_cfgs)


def _run(config: PipelineConfig, out: Path, stage_cfgs: tuple[Any, ...]) -> PipelineResult:
    a_cfg, p_cfg, r_cfg, e_cfg = stage_cfgs
    out.mkdir(parents=True, exist_ok=True)
    import yaml

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
        result.report = str(Path(e_cfg.out) / evaluate.REPORT_FILE)
    atomic_write_json(out / RESULT_FILE, dataclasses.asdict(result))
    return result
