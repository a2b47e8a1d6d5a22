"""LHSPG: progressive structured pruning of a LoRA model (paper Alg. 4).

- :class:`LHSPG` / :class:`LHSPGConfig` — the optimizer wrapper (or ``post_step`` hook);
- :mod:`~lorashear.lhspg.saliency` — the five saliency criteria;
- :class:`PruningSchedule` — warm-up, periods, quotas;
- :func:`~lorashear.lhspg.train.train_lhspg` — the training loop with LHSPG's hooks (:mod:`~lorashear.lhspg.hooks`);
- :func:`plan_targets` / :class:`TargetConfig` — parameter ratio -> group counts.
"""

from .optimizer import LHSPG, LHSPGConfig, effective_weights
from .saliency import CRITERIA, criteria, criteria_from_tensors, group_statistics, saliency
from .schedule import PruningSchedule, split_quota
from .tables import LoraInfo, SliceTable, find_loras
from .targets import CLUSTER_OF_KIND, TargetConfig, TargetPlan, plan_targets

__all__ = ["CLUSTER_OF_KIND", "CRITERIA", "LHSPG", "LHSPGConfig", "LoraInfo", "PruningSchedule", "SliceTable",
           "TargetConfig", "TargetPlan", "criteria", "criteria_from_tensors", "effective_weights", "find_loras",
           "group_statistics", "plan_targets", "saliency", "split_quota"]
