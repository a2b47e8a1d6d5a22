"""The settings of ``lorashear run``: shared inputs plus the settings of every component the stages use
(:class:`PipelineConfig`; its flat option names are ``lorashear run``'s flags and ``config.yaml``'s keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..config import section
from ..data.config import DataConfig
from ..errors import ConfigError
from ..evaluation.config import EvalConfig
from ..export.formats import FORMATS as EXPORT_REGISTRY
from ..export.formats import get_format
from ..knowledge.config import KnowledgeConfig
from ..lhspg.optimizer import LHSPGConfig
from ..lhspg.targets import TargetConfig
from ..models.lora import LoraSettings
from ..models.reference import REFERENCE_MODEL_NAME
from ..recovery.rounds import RoundsConfig
from ..recipes import DEFAULT_RECIPE, PIPELINE_RECIPES
from ..training.loop import TrainConfig
from ..training.losses import DistillConfig
from . import prune, recover
from .export import FORMATS as EXPORT_FORMATS
from .export import ExportConfig

def _prune_option(name: str) -> Any:
    """The prune stage's option ``name`` as a pipeline option: its default and help, declared once (there)."""
    f = next(f for f in dataclasses.fields(prune.PruneConfig) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return field(default_factory=f.default_factory, metadata=dict(f.metadata))
    return field(default=f.default, metadata=dict(f.metadata))


STAGES = ("analyze", "prune", "recover", "eval")
DEFAULT_STAGES = ("analyze", "prune", "eval")

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
    force: bool = field(default=False, metadata={
        "help": "re-run every stage from scratch, even those whose outputs match this run's settings"})
    rerun: bool = field(default=True, metadata={
        "help": "re-run a stage whose output (or interrupted run) was made with other settings or inputs than "
                "this run's, and the stages after it; --no-rerun refuses instead, with one line"})
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
    unprunable: tuple[str, ...] = _prune_option("unprunable")
    compact_at: Literal["period_end", "prune_end", "end"] = _prune_option("compact_at")
    compact_min_gain: float = _prune_option("compact_min_gain")
    post_pruning: Literal["continue", "recover", "full"] = _prune_option("post_pruning")
    post_lr: float = _prune_option("post_lr")
    post: RoundsConfig = section(RoundsConfig, prefix="post_", help="the dynamic mix after pruning (prune stage)")
    verify: bool = _prune_option("verify")
    keep_run_checkpoints: bool = _prune_option("keep_run_checkpoints")
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
        if self.export is not None and self.export not in EXPORT_REGISTRY:
            raise ConfigError(f"unknown --export {self.export!r}; use one of {', '.join(EXPORT_REGISTRY)}")
        self.export_outtypes = tuple(self.export_outtypes)
        outtypes = get_format(self.export or "gguf").outtypes
        bad = [t for t in self.export_outtypes if t not in outtypes]
        if bad or not self.export_outtypes:
            raise ConfigError(f"unknown --export-outtypes {', '.join(bad) or '(none)'}; use {', '.join(outtypes)}")


#: options the pipeline sets itself (hidden from the command line)
PIPELINE_OWNED = ("eval_baseline", "eval_dtype", "recover_teacher", "recover_dtype", "recover_resume",
                  "export_format", "export_outtype")
