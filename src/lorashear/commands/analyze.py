"""`lorashear analyze`: knowledge distribution analysis (paper Alg. 3).

    lorashear analyze smollm2-135m-instruct --data builtin:calibration --out runs/knowledge \
        --ratios 0.2,0.5 --gamma 0.2 --num-sequences 16 --seq-len 128 [--config analyze.yaml]

Writes ``OUT/knowledge.json`` (deviations, ranking, unprunable node groups, data
protocol, config), ``OUT/knowledge.png`` (heatmap by layer and block) and
``OUT/analyze_result.json``. The work is :func:`lorashear.stages.analyze.run`.
"""

from __future__ import annotations

import argparse

from ..stages.analyze import AnalyzeConfig
from ._stage import add_stage_options, stage_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="knowledge distribution analysis: find the structures that must never be pruned",
        description="Prune a fraction of each layer's attention and MLP structures in turn, measure the "
                    "perplexity deviation on an evaluation set, restore, and mark the most sensitive "
                    "node groups unprunable. Writes OUT/knowledge.json and OUT/knowledge.png.",
    )
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="hub id, local model directory, or smollm2-135m-instruct (or `model:` in --config)")
    parser.add_argument("--out", metavar="DIR", default=None, help="output directory (or `out:` in --config)")
    add_stage_options(parser, AnalyzeConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..stages import analyze

    config = stage_config(AnalyzeConfig, args, model=args.model, out=args.out)  # validates before anything loads
    if not config.model:
        raise ConfigError("name the model to analyze (MODEL, or `model:` in --config)")
    if not config.out:
        raise ConfigError("name an output directory (--out DIR, or `out:` in --config)")
    result = analyze.run(config)

    ppl = f"{result.full_perplexity:.3f}" if result.full_perplexity is not None else "inf"
    print(f"full model: perplexity {ppl} on {result.eval_sequences} x {result.eval_seq_len} tokens "
          f"({result.forward_passes} forward passes, {result.analysis_seconds:.1f} s)")
    if result.unprunable_names:
        print(f"unprunable ({len(result.unprunable_names)} of {result.num_node_groups} node groups, "
              f"gamma={result.gamma:g}): "
              + ", ".join(f"{name} ({score:.3g})" if score is not None else f"{name} (inf)"
                          for name, score in zip(result.unprunable_names, result.unprunable_scores)))
    else:
        print(f"no node group marked unprunable (gamma={result.gamma:g})")
    print(f"wrote {result.knowledge_json} and {result.knowledge_png}")
    return 0
