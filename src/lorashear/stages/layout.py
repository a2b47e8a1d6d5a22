"""The layout of a ``lorashear run`` directory, defined here once (the pipeline, its plan and the run
report all read it from :class:`RunLayout`)::

    OUT/
      config.yaml              every resolved setting of the last run that produced something
      pipeline_result.json     where the outputs are, what each stage returned, stage timings
      report.md                the run report
      records/<step>.json      what each step was run with and what it wrote (stages.records)
      records/<step>.started.json   a prune or recover that started and may be resumed
      knowledge/               the analyze stage (knowledge.json, knowledge.png)
      pruned/                  the prune stage (the model, prune_report.json, prune.png; checkpoints/ while running)
      recovered/               the recover stage (the model, recover_report.json, recover.png)
      eval/                    the eval stage (eval.json, report.md, plots)
      export/model-<type>.gguf the export step, each file beside its JSON record
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..atomic import TRANSIENT as RUN_STATE
from ..knowledge.result import KNOWLEDGE_FILENAME
from ..training.loop import checkpoint_root
from . import analyze, evaluate, prune, recover

CONFIG_FILE = "config.yaml"
RESULT_FILE = "pipeline_result.json"
REPORT_FILE = "report.md"
RECORDS_DIR = "records"
EXPORT_DIR = "export"
#: the stages of a run, in order, and the directory each writes
STAGE_DIRS: dict[str, str] = {"analyze": "knowledge", "prune": "pruned", "recover": "recovered", "eval": "eval"}
#: files that mark each stage directory as that stage's (it may then be replaced), and its run state
OWNER_FILES: dict[str, tuple[str, ...]] = {"analyze": analyze.OWNER_FILES, "prune": prune.OWNER_FILES,
                                           "recover": recover.OWNER_FILES, "eval": evaluate.OWNER_FILES}
TRANSIENT: dict[str, tuple[str, ...]] = {"analyze": RUN_STATE, "prune": RUN_STATE, "recover": recover.TRANSIENT,
                                         "eval": RUN_STATE}


def _top(name: str) -> property:
    """A path directly in the run directory."""
    return property(lambda self: self.root / name, doc=f"``OUT/{name}``")


def _of(stage: str, name: str = "") -> property:
    """A stage's directory, or a file in it."""
    return property(lambda self: self.stage_dir(stage) / name if name else self.stage_dir(stage),
                    doc=f"``OUT/{STAGE_DIRS[stage]}/{name}``")


@dataclass(frozen=True)
class RunLayout:
    """Every path of a run directory ``root``."""

    root: Path

    config = _top(CONFIG_FILE)
    result = _top(RESULT_FILE)
    report = _top(REPORT_FILE)
    records = _top(RECORDS_DIR)
    export = _top(EXPORT_DIR)
    knowledge = _of("analyze", KNOWLEDGE_FILENAME)
    knowledge_plot = _of("analyze", analyze.PLOT_FILE)
    pruned = _of("prune")
    prune_report = _of("prune", prune.REPORT_FILE)
    prune_plot = _of("prune", prune.PLOT_FILE)
    recovered = _of("recover")
    recover_report = _of("recover", recover.REPORT_FILE)
    recover_plot = _of("recover", recover.PLOT_FILE)
    eval_json = _of("eval", evaluate.RESULT_FILE)
    eval_report = _of("eval", evaluate.REPORT_FILE)

    def stage_dir(self, stage: str) -> Path:
        return self.root / STAGE_DIRS[stage]

    def export_file(self, fmt: str, outtype: str) -> Path:
        return self.export / f"model-{outtype}.{fmt}"

    def checkpoints(self, stage: str) -> Path:
        """Where a resumable stage keeps its checkpoints while it runs."""
        return checkpoint_root(self.stage_dir(stage))

    def record(self, step: str) -> Path:
        return self.records / f"{step}.json"

    def attempt(self, step: str) -> Path:
        return self.records / f"{step}.started.json"

    def final_model(self, stages: tuple[str, ...]) -> Path:
        """The model a run ends with: the recovered one when the run recovers, else the pruned one."""
        return self.recovered if "recover" in stages else self.pruned

    def relative(self, path: Path) -> str:
        """``path`` as the run report links it (relative to the run directory)."""
        return path.relative_to(self.root).as_posix()


__all__ = ["CONFIG_FILE", "EXPORT_DIR", "OWNER_FILES", "RECORDS_DIR", "REPORT_FILE", "RESULT_FILE", "STAGE_DIRS",
           "TRANSIENT", "RunLayout"]
