"""lorashear: LoRAShear structured pruning and knowledge recovery for Hugging Face causal LMs.

Five lines from a model to a smaller one::

    import lorashear
    model = lorashear.load_model("smollm2-135m-instruct")
    graph = lorashear.discover(model)
    small = lorashear.compact(model, graph.prunable()[:10])

Public names are imported lazily so that ``lorashear --help`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "load_model": "lorashear.models.loading",
    "load_tokenizer": "lorashear.models.loading",
    "REFERENCE_MODEL_NAME": "lorashear.models.reference",
    "discover": "lorashear.graph.discover",
    "StructureGraph": "lorashear.graph.groups",
    "Group": "lorashear.graph.groups",
    "zero_groups": "lorashear.graph.groups",
    "compact": "lorashear.compaction",
    "save_pretrained": "lorashear.export",
    "load_pretrained": "lorashear.export",
    "LorashearError": "lorashear.errors",
    "LHSPG": "lorashear.lhspg",
    "LHSPGConfig": "lorashear.lhspg",
    "TargetConfig": "lorashear.lhspg",
    "plan_targets": "lorashear.lhspg",
    "PruneConfig": "lorashear.training.prune",
    "TrainConfig": "lorashear.training",
    "run_prune": "lorashear.training.prune",
}

__all__ = sorted([*_LAZY, "__version__"])

if TYPE_CHECKING:  # pragma: no cover
    from .compaction import compact
    from .errors import LorashearError
    from .export import load_pretrained, save_pretrained
    from .graph.discover import discover
    from .lhspg import LHSPG, LHSPGConfig, TargetConfig, plan_targets
    from .training import TrainConfig
    from .training.prune import PruneConfig, run_prune
    from .graph.groups import Group, StructureGraph, zero_groups
    from .models.loading import load_model, load_tokenizer
    from .models.reference import REFERENCE_MODEL_NAME


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'lorashear' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
