"""`lorashear prune`: progressive structured pruning with LHSPG and LoRA, then compaction.

    lorashear prune smollm2-135m-instruct --ratio 0.2 --data builtin:calibration --out runs/p20 \
        --steps 200 [--knowledge runs/knowledge/knowledge.json] [--resume] [--config prune.yaml]

Multi-GPU (DDP): ``accelerate launch --num_processes N -m lorashear prune ...``.
Writes the compacted model (safetensors, config, tokenizer), ``OUT/prune_report.json``,
``OUT/prune_result.json`` and ``OUT/prune.png``. ``--checkpoint-every N`` writes resumable
checkpoints to ``OUT/checkpoints``; ``--resume`` continues from the latest one.
"""

from __future__ import annotations

import argparse

from ..stages.prune import PruneConfig
from ._stage import add_stage_options, stage_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune",
        help="progressive structured pruning with LHSPG and LoRA, then compaction",
        description="Attach LoRA, discover the prunable structures, train with LHSPG until the parameter "
                    "ratio is reached (selected structures decay to exactly zero), then remove them and "
                    "save the smaller model with prune_report.json and prune.png.",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="hub id, local model directory, or smollm2-135m-instruct (or `model:` in --config)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (or `out:` in --config)")
    add_stage_options(parser, PruneConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..stages import prune

    config = stage_config(PruneConfig, args, model=args.model, out=args.out)
    if not config.model:
        raise ConfigError("name the model to prune (MODEL, or `model:` in --config)")
    if not config.out:
        raise ConfigError("name an output directory (--out DIR, or `out:` in --config)")
    result = prune.run(config)
    if result is not None:
        print(f"pruned {config.model}: {result.params_before:,} -> {result.params_after:,} parameters "
              f"({100 * result.ratio_removed:.2f}% removed, {100 * result.non_embedding_ratio_removed:.2f}% of "
              f"non-embedding) in {result.wall_time_s:.1f} s -> {config.out}")
    return 0
