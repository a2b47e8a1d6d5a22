"""`lorashear prune`: progressive structured pruning with LHSPG and LoRA, then compaction.

    lorashear prune smollm2-135m-instruct --ratio 0.2 --data builtin:calibration --out runs/p20 \
        --steps 200 [--knowledge runs/knowledge/knowledge.json] [--resume]

Multi-GPU (DDP): ``accelerate launch --num_processes N -m lorashear prune ...``.
Writes the compacted model (safetensors, config, tokenizer), ``OUT/prune_report.json``
and ``OUT/prune.png``. ``--checkpoint-every N`` writes resumable checkpoints to
``OUT/checkpoints``; ``--resume`` continues from the latest one.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging

from ..config import add_dataclass_arguments, dataclass_from_args, dataclass_from_dict, load_yaml
from ..lhspg.targets import TargetConfig
from ..training.loop import TrainConfig
from ..training.prune import PruneConfig

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "prune",
        help="progressive structured pruning with LHSPG and LoRA, then compaction",
        description="Attach LoRA, discover the prunable structures, train with LHSPG until the parameter "
                    "ratio is reached (selected structures decay to exactly zero), then remove them and "
                    "save the smaller model with prune_report.json and prune.png.",
    )
    parser.add_argument("model", metavar="MODEL", help="hub id, local model directory, or smollm2-135m-instruct")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--config", metavar="YAML", help="options from a YAML file (flags override it)")
    add_dataclass_arguments(parser, TargetConfig)
    add_dataclass_arguments(parser, PruneConfig)
    add_dataclass_arguments(parser, TrainConfig)
    parser.set_defaults(func=run)
    return parser


def _pick(cls: type, values: dict) -> dict:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k.replace("-", "_"): v for k, v in values.items() if k.replace("-", "_") in names}


def run(args: argparse.Namespace) -> int:
    from ..training.prune import run_prune

    yaml_values = load_yaml(args.config) if args.config else {}
    known = set()
    for cls in (TargetConfig, PruneConfig, TrainConfig):
        known |= {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in yaml_values if k.replace("-", "_") not in known)
    if unknown:
        dataclass_from_dict(TargetConfig, {k: yaml_values[k] for k in unknown})  # raises ConfigError
    target = dataclass_from_args(TargetConfig, args, _pick(TargetConfig, yaml_values))
    train = dataclass_from_args(TrainConfig, args, _pick(TrainConfig, yaml_values))
    prune_values = _pick(PruneConfig, yaml_values)
    prune_values.update(model=args.model, out=args.out)
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k not in ("model", "out")})
    config = dataclass_from_args(PruneConfig, ns, prune_values)
    report = run_prune(config, target, train)
    if report is not None:
        p = report["params"]
        print(f"pruned {args.model}: {p['before']:,} -> {p['after']:,} parameters "
              f"({100 * p['ratio_removed']:.2f}% removed, {100 * p['non_embedding_ratio_removed']:.2f}% of "
              f"non-embedding) in {report['wall_time_s']:.1f} s -> {args.out}")
    return 0
