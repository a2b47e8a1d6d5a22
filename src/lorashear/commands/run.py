"""``lorashear run [MODEL]``: the main job on a model (default: the built-in reference model).

Today it runs the stages that exist: load the model, discover its removable
structures, and measure held-out perplexity with a stated protocol. Stages
are added here as they land (analysis, pruning, recovery, evaluation).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..models.reference import REFERENCE_MODEL_NAME


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="the main job: load, discover structures, measure held-out perplexity",
        description="Run the lorashear stages that exist on MODEL and print what they measure.")
    parser.add_argument("model", nargs="?", default=REFERENCE_MODEL_NAME,
                        help=f"hub id, local directory or built-in name (default: {REFERENCE_MODEL_NAME})")
    parser.add_argument("--eval-data", default="builtin:heldout", help="held-out text for perplexity (data spec)")
    parser.add_argument("--seq-len", type=int, default=512, help="perplexity window length")
    parser.add_argument("--max-windows", type=int, default=32, help="perplexity windows (0: the whole text)")
    parser.add_argument("--out", default=None, help="write run.json here (directory)")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..atomic import atomic_write_json
    from ..data import load_texts
    from ..evaluation.perplexity import perplexity, token_stream
    from ..graph.discover import discover
    from ..models.loading import load_model, load_tokenizer

    t0 = time.perf_counter()
    model = load_model(args.model)
    tokenizer = load_tokenizer(args.model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.model} ({model.config.model_type}, {model.config.num_hidden_layers} layers)")
    print(f"parameters: {n_params:,}")
    graph = discover(model)
    for row in graph.summary():
        print(f"  {row['kind']:<15} {row['count']:>7} groups ({row['prunable']} prunable), {row['params']:,} params")
    texts = load_texts(args.eval_data)
    stream = token_stream(texts, tokenizer)
    result = perplexity(model, stream, seq_len=args.seq_len, max_windows=args.max_windows or None,
                        source=args.eval_data)
    print(f"held-out perplexity: {result.perplexity:.3f}  ({result.protocol})")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    if args.out:
        atomic_write_json(Path(args.out) / "run.json", {
            "model": args.model, "num_parameters": n_params, "groups": graph.summary(),
            "perplexity": result.to_dict(), "seconds": time.perf_counter() - t0})
    return 0
