"""lorashear: LoRAShear structured pruning and knowledge recovery for Hugging Face causal LMs.

The whole pipeline (analyze -> prune -> evaluate)::

    import lorashear
    result = lorashear.prune("smollm2-135m-instruct", ratio=0.2, out="runs/p20")
    print(result.model_dir, result.report)

The components are public too::

    model = lorashear.load_model("smollm2-135m-instruct")
    graph = lorashear.discover(model)
    small = lorashear.compact(model, graph.prunable()[:10])

Public names are imported lazily so that ``lorashear --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

_LAZY = {
    "load_model": "lorashear.models.loading",
    "load_tokenizer": "lorashear.models.loading",
    "REFERENCE_MODEL_NAME": "lorashear.models.reference",
    "discover": "lorashear.graph.discover",
    "StructureGraph": "lorashear.graph.groups",
    "Group": "lorashear.graph.groups",
    "zero_groups": "lorashear.graph.groups",
    "compact": "lorashear.compaction",
    "save_pretrained": "lorashear.models.saving",
    "load_pretrained": "lorashear.models.loading",
    "LorashearError": "lorashear.errors",
    "LHSPG": "lorashear.lhspg",
    "LHSPGConfig": "lorashear.lhspg",
    "TargetConfig": "lorashear.lhspg",
    "plan_targets": "lorashear.lhspg",
    "prune": "lorashear.api",
    "PipelineConfig": "lorashear.stages.pipeline",
    "PruneConfig": "lorashear.stages.prune",
    "RecoverConfig": "lorashear.stages.recover",
    "export_gguf": "lorashear.export.gguf",
    "TrainConfig": "lorashear.training",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from .compaction import compact
    from .errors import LorashearError
    from .graph.discover import discover
    from .lhspg import LHSPG, LHSPGConfig, TargetConfig, plan_targets
    from .training import TrainConfig
    from .api import prune
    from .export.gguf import export_gguf
    from .stages.pipeline import PipelineConfig
    from .stages.prune import PruneConfig
    from .stages.recover import RecoverConfig
    from .graph.groups import Group, StructureGraph, zero_groups
    from .models.loading import load_model, load_pretrained, load_tokenizer
    from .models.saving import save_pretrained
    from .models.reference import REFERENCE_MODEL_NAME


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorashear' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
