"""`lorashear recover`: dynamic knowledge recovery of a pruned model (LoRA rounds on an adaptive data mix).

    lorashear recover runs/p20/pruned --teacher smollm2-135m-instruct --out runs/p20/recovered \
        [--data builtin:austen --data notes.txt ...] [--instruct-data alpaca.jsonl | --instruct-data none] \
        [--tokens N] [--max-rounds 3] [--distill-weight 0.5] [--resume] [--config recover.yaml]

Writes the recovered model (safetensors, config, tokenizer), ``OUT/recover_report.json`` and
``OUT/recover.png``; ``OUT/checkpoints`` holds the last complete round while it runs (``--resume``).
"""

from __future__ import annotations

import argparse

from ..stages.recover import RecoverConfig
from ._stage import add_stage_options, stage_config

#: options registered by hand below (repeatable flags), not generated from the config
_BY_HAND = ("data", "instruct_data")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "recover",
        help="dynamic knowledge recovery: LoRA fine-tuning on an adaptive data mix",
        description="Measure how much worse than the dense model (--teacher) the pruned MODEL is on each source, "
                    "fine-tune it with LoRA on a mix that favours the most degraded sources, merge, and repeat "
                    "until the largest degradation stops improving; first on the pretraining-style sources "
                    "(--data), then on instruction data (--instruct-data). Saves the recovered model with "
                    "recover_report.json and recover.png.",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="the pruned model: local directory, hub id or built-in name (or `model:` in --config)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (or `out:` in --config)")
    parser.add_argument("--data", metavar="SPEC", dest="data_specs", action="append", default=None,
                        help="a stage-1 source (file, folder, hf:NAME, builtin:NAME); repeat for more "
                             "(default: builtin:austen, builtin:wikipedia, builtin:debian-handbook)")
    parser.add_argument("--instruct-data", metavar="SPEC", dest="instruct_specs", action="append", default=None,
                        help="a stage-2 instruction source (json/jsonl records with instruction, optional input, "
                             "output; or chat messages); repeat for more; `none` skips stage 2 "
                             "(default: builtin:instructions)")
    add_stage_options(parser, RecoverConfig, exclude=_BY_HAND)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..stages import recover

    config = stage_config(RecoverConfig, args, model=args.model, out=args.out,
                          data=tuple(args.data_specs) if args.data_specs else None,
                          instruct_data=tuple(args.instruct_specs) if args.instruct_specs else None)
    if not config.model:
        raise ConfigError("name the pruned model to recover (MODEL, or `model:` in --config)")
    if not config.out:
        raise ConfigError("name an output directory (--out DIR, or `out:` in --config)")
    if not config.teacher:
        raise ConfigError("name the dense model the pruned one came from (--teacher DENSE, or `teacher:` in "
                          "--config)")
    result = recover.run(config)
    if result is not None:
        worst = max(result.final_delta.values()) if result.final_delta else 0.0
        stops = ", ".join(f"stage {s['stage']}: {s['rounds']} rounds ({s['stop_reason']})" for s in result.stages)
        print(f"recovered {config.model}: {stops}; largest degradation now {worst:.4f} nats/token; "
              f"{result.tokens_seen:,} training tokens in {result.wall_time_s:.1f} s -> {config.out}")
    return 0
