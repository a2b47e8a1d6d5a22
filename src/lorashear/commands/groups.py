"""``lorashear groups MODEL``: list the minimally removable structures of a model."""

from __future__ import annotations

import argparse
import json
import sys

from ..models.reference import REFERENCE_MODEL_NAME
from ..stages.groups import GroupsConfig
from ._stage import add_stage_options, stage_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "groups", help="list the removable structures (heads, KV groups, MLP channels) of a model",
        description="Trace MODEL and list its minimally removable structures. With --lora-rank R, LoRA "
                    "adapters of rank R are attached first, so LoRA factors appear in the groups.")
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help=f"hub id, local directory or built-in name (default: {REFERENCE_MODEL_NAME}, "
                             "or `model:` in --config)")
    parser.add_argument("--json", action="store_true", help="print every group with its slices as JSON")
    parser.add_argument("--per-layer", action="store_true", help="print a per-layer table")
    add_stage_options(parser, GroupsConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..stages import groups

    config = stage_config(GroupsConfig, args, model=args.model)
    result = groups.run(config)
    if args.json:
        json.dump(result.to_dict(groups=True), sys.stdout)
        print()
        return 0
    print(f"{result.model}: {result.model_type}, {result.num_layers} layers, {result.total_params:,} parameters"
          f"{' (LoRA attached)' if result.lora else ''}; discovered in {result.seconds:.2f} s")
    print(f"{'kind':<16}{'count':>8}{'prunable':>10}{'params':>14}{'per layer':>12}")
    for row in result.summary:
        per_layer = int(row["count"]) / result.num_layers if row["kind"] != "hidden_channel" else float("nan")
        print(f"{row['kind']:<16}{row['count']:>8}{row['prunable']:>10}{row['params']:>14,}{per_layer:>12.1f}")
    if args.per_layer:
        print(f"\n{'layer':<7}{'query-head slots':>18}{'kv groups':>11}{'mlp channels':>14}")
        for layer, c in result.per_layer.items():
            print(f"{layer:<7}{c.get('attention_head', 0):>18}{c.get('kv_group', 0):>11}{c.get('mlp_channel', 0):>14}")
    for note in result.notes[:5]:
        print(f"note: {note}")
    return 0
