"""Named presets of defaults ("recipes") for the prune stage and the pipeline.

A recipe fills every option the user did not set (flags, YAML, Python keywords win).
Keys are the flat option names shared by ``lorashear prune`` and ``lorashear run``; the knowledge
analysis's (``ANALYZE_RECIPES``) are ``lorashear analyze``'s, ``analyze_``-prefixed under ``run``.

- ``paper``: LoRAShear as published (arXiv 2310.18356, Alg. 4): the five weight/LoRA-update
  saliency criteria with equal weights, global ranking per kind, even quotas over 10 periods,
  pruning until 70% of the steps, LoRA merged and restarted at every period end, LM loss only.
- ``lorashear``: our recipe, each change chosen by the side-by-side benchmark
  (``benchmarks/quality.py``): activation-Fisher saliency ranked across all layers (the paper's global
  allocation: layers keep different widths), front-loaded quotas with pruning over 10%..50% of the steps, no merges,
  0.5 CE + 0.5 KL to the dense model while pruning and plain CE once it has ended, a learning rate of 8e-4, a knowledge
  analysis that ranks the structures inside a node group by the same activation Fisher, the online teacher
  in bfloat16 where the device has native bf16 (``auto``), and serve-ready
  widths (every kept MLP width a multiple of 32 where layers are at least 512 wide; ``--round-to 1`` keeps
  the exact counts).
  Results in ``benchmarks/results/quality_smollm2.md`` (400 steps, two seeds) and
  ``benchmarks/results/quality_dev100.md`` (the 100-step runs that chose each setting).
"""

from __future__ import annotations

from typing import Any

RECIPES: dict[str, dict[str, Any]] = {
    "paper": {},
    "lorashear": {
        "saliency": ["fisher"],
        "allocation": "global",
        "uniform_per_layer": False,
        "quota": "front",
        # pruning over steps 10%..50% (40-200 of 400), then the compacted model trains on: chosen on validation
        # against 10%..30% (row lorashear-1205-long against lorashear-1205, seeds 0 and 1): in domain -0.59 at 20%
        # and -1.48 at 50%, both beyond the seed spread, Python docs -0.19 and -2.32 (quality_smollm2.md); it costs
        # 1.11x (20%) and 1.18x (50%) the FLOPs of 10%..30%. The shorter 10%..20% lost (lorashear-short).
        "prune_end": 0.5,
        "merge_at_period_end": False,
        "distill_weight": 0.5,
        "distill_after_pruning": 0.0,
        # four times the training loop's default learning rate, chosen on validation at 20% by the geometric mean
        # perplexity of the two sources: 2e-4 38.36 / 37.04, 4e-4 37.33 / 36.58, 8e-4 36.98 / 36.89 (seed 0); the
        # best peer gains alike and is given its own best, 8e-4 too (quality_smollm2.md)
        "lr": 8e-4,
        # the online teacher in bfloat16 where the device computes it natively and the model is float32 (3.05x
        # faster teacher forward on an AMX CPU); level with the float32 teacher on validation at 20% and 50%
        "distill_teacher_dtype": "auto",
        # serve-ready widths: every kept MLP width a multiple of 32 (q8_0 blocks, fast kernels) where layers are
        # at least 512 wide; within the seed spread of exact widths on validation (quality_smollm2.md)
        "round_to": 32,
        "round_min_width": 512,
    },
}
#: the knowledge analysis's options in each recipe (flat names of ``lorashear analyze``): the paper ranks the
#: structures inside a node group by weight magnitude; ours by the activation Fisher that its pruning uses
ANALYZE_RECIPES: dict[str, dict[str, Any]] = {
    "paper": {"proxy": "magnitude"},
    "lorashear": {"proxy": "fisher"},
}
#: ``lorashear run``: the prune options plus the analysis options under their ``analyze_`` names
PIPELINE_RECIPES: dict[str, dict[str, Any]] = {
    name: {**RECIPES[name], **{f"analyze_{key}": value for key, value in ANALYZE_RECIPES[name].items()}}
    for name in RECIPES
}
DEFAULT_RECIPE = "lorashear"
