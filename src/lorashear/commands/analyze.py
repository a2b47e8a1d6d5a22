"""`lorashear analyze`: knowledge distribution analysis (paper Alg. 3).

    lorashear analyze smollm2-135m-instruct --data builtin:calibration --out runs/knowledge \
        --ratios 0.2,0.5 --gamma 0.2 --num-sequences 16 --seq-len 128

Writes ``OUT/knowledge.json`` (deviations, ranking, unprunable node groups, data
protocol, config) and ``OUT/knowledge.png`` (heatmap by layer and block).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

from ..config import add_dataclass_arguments, dataclass_from_args, load_yaml
from ..errors import DataError
from ..knowledge.config import KnowledgeConfig

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "analyze",
        help="knowledge distribution analysis: find the structures that must never be pruned",
        description="Prune a fraction of each layer's attention and MLP structures in turn, measure the "
                    "perplexity deviation on an evaluation set, restore, and mark the most sensitive "
                    "node groups unprunable. Writes OUT/knowledge.json and OUT/knowledge.png.",
    )
    parser.add_argument("model", metavar="MODEL",
                        help="hub id, local model directory, or smollm2-135m-instruct")
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--config", metavar="YAML", help="options from a YAML file (flags override it)")
    parser.add_argument("--dtype", default="float32", help="parameter dtype (default: float32)")
    parser.add_argument("--device", default=None, help="torch device (default: cpu)")
    add_dataclass_arguments(parser, KnowledgeConfig)
    parser.set_defaults(func=run)
    return parser


def build_eval_tokens(tokenizer, config: KnowledgeConfig):
    """The evaluation set: ``config.num_sequences`` packed sequences of ``config.seq_len`` tokens."""
    from ..data import load_texts, pack_texts

    spec = config.data.strip().lower()
    if spec.startswith("builtin:heldout") or ":split=validation" in spec:
        logger.warning("%s looks like held-out evaluation text; the analysis should use training-side "
                       "text (e.g. builtin:calibration) so reported results stay unbiased", config.data)
    texts = [t for t in load_texts(config.data) if t and t.strip()]
    if not texts:
        raise DataError(f"data source {config.data!r} produced no text")
    tokens = pack_texts(texts, tokenizer, config.seq_len, num_sequences=config.num_sequences, seed=config.seed)
    if tokens.numel() == 0 or tokens.shape[0] == 0:
        raise DataError(f"data source {config.data!r} is too short for one sequence of {config.seq_len} tokens")
    if tokens.shape[0] < config.num_sequences:
        logger.warning("data source %r filled only %d of %d sequences", config.data, tokens.shape[0],
                       config.num_sequences)
    return tokens


def run(args: argparse.Namespace) -> int:
    import lorashear

    from ..knowledge import analyze_knowledge, plot_knowledge
    from ..models.loading import load_model, load_tokenizer

    yaml_values = load_yaml(args.config) if args.config else None
    config = dataclass_from_args(KnowledgeConfig, args, yaml_values)  # validates before anything loads
    out = Path(args.out)

    tokenizer = load_tokenizer(args.model)
    tokens = build_eval_tokens(tokenizer, config)
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    graph = lorashear.discover(model)
    result = analyze_knowledge(
        model, graph, tokens, config, model_name=args.model,
        data_info={"spec": config.data, "seed": config.seed, "role": "evaluation set drawn from training-side text"},
    )
    json_path = result.save(out)
    png_path = plot_knowledge(result, out / "knowledge.png")

    top = result.unprunable_node_groups()
    print(f"full model: perplexity {result.full_perplexity:.3f} on {tokens.shape[0]} x {tokens.shape[1]} tokens "
          f"({result.forward_passes} forward passes, {result.seconds:.1f} s)")
    if top:
        print(f"unprunable ({len(top)} of {len(result.node_groups)} node groups, gamma={config.gamma:g}): "
              + ", ".join(f"{n.name} ({n.score:.3g})" if math.isfinite(n.score) else f"{n.name} (inf)" for n in top))
    else:
        print(f"no node group marked unprunable (gamma={config.gamma:g})")
    print(f"wrote {json_path} and {png_path}")
    return 0
