"""``lorashear groups MODEL``: list the minimally removable structures of a model."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict

from ..models.reference import REFERENCE_MODEL_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "groups", help="list the removable structures (heads, KV groups, MLP channels) of a model",
        description="Trace MODEL and list its minimally removable structures. With --lora-rank R, LoRA "
                    "adapters of rank R are attached first, so LoRA factors appear in the groups.")
    parser.add_argument("model", nargs="?", default=REFERENCE_MODEL_NAME,
                        help=f"hub id, local directory or built-in name (default: {REFERENCE_MODEL_NAME})")
    parser.add_argument("--lora-rank", type=int, default=0, help="attach LoRA of this rank first (0: none)")
    parser.add_argument("--hidden", action="store_true", help="also list hidden (residual) channels")
    parser.add_argument("--json", action="store_true", help="print every group with its slices as JSON")
    parser.add_argument("--per-layer", action="store_true", help="print a per-layer table")
    parser.set_defaults(func=run)
    return parser


def attach_lora(model, rank: int):
    import torch
    from peft import LoraConfig, get_peft_model

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, torch.nn.Linear) and "lm_head" not in n})
    return get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0))


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..graph.discover import discover
    from ..models.loading import load_model

    if args.lora_rank < 0:
        raise ConfigError("--lora-rank must be >= 0")
    model = load_model(args.model)
    if args.lora_rank:
        model = attach_lora(model, args.lora_rank)
    start = time.perf_counter()
    graph = discover(model, hidden=args.hidden)
    seconds = time.perf_counter() - start
    if args.json:
        json.dump({
            "model": args.model, "model_type": graph.model_type, "num_layers": graph.num_layers,
            "total_params": graph.total_params, "lora": graph.lora,
            "groups": [{"id": g.id, "kind": g.kind, "layer": g.layer, "index": g.index, "num_params": g.num_params,
                        "prunable": g.prunable, "width": g.width,
                        "slices": [[s.name, s.dim, list(s.indices)] for s in g.slices]} for g in graph.groups],
        }, sys.stdout)
        print()
        return 0
    print(f"{args.model}: {graph.model_type}, {graph.num_layers} layers, {graph.total_params:,} parameters"
          f"{' (LoRA attached)' if graph.lora else ''}; discovered in {seconds:.2f} s")
    print(f"{'kind':<16}{'count':>8}{'prunable':>10}{'params':>14}{'per layer':>12}")
    for row in graph.summary():
        per_layer = int(row["count"]) / graph.num_layers if row["kind"] != "hidden_channel" else float("nan")
        print(f"{row['kind']:<16}{row['count']:>8}{row['prunable']:>10}{row['params']:>14,}{per_layer:>12.1f}")
    if args.per_layer:
        counts: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for g in graph.groups:
            if g.layer is not None:
                counts[g.layer][g.kind] += 1
        print(f"\n{'layer':<7}{'query-head slots':>18}{'kv groups':>11}{'mlp channels':>14}")
        for layer in sorted(counts):
            c = counts[layer]
            print(f"{layer:<7}{c['attention_head']:>18}{c['kv_group']:>11}{c['mlp_channel']:>14}")
    for note in graph.notes[:5]:
        print(f"note: {note}")
    return 0
