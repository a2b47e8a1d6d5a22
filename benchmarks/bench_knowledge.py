"""Cost of the knowledge distribution analysis on the reference model.

    python benchmarks/bench_knowledge.py                       # smollm2-135m-instruct, defaults
    python benchmarks/bench_knowledge.py --num-sequences 8 --seq-len 64 --save benchmarks/results/knowledge_smollm2

Prints the time of one forward pass over the evaluation set, seconds per node
group (|P| forward passes each), the total, and the most sensitive node groups.
With ``--save PREFIX`` also writes ``PREFIX.json`` and ``PREFIX.png``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch


def load_tokens(args, tokenizer, config):
    if args.text_file:  # fallback when the data layer is not available
        text = Path(args.text_file).read_text(encoding="utf-8")
        ids = tokenizer(text)["input_ids"]
        need = config.num_sequences * config.seq_len
        if len(ids) < need:
            ids = (ids * (need // max(len(ids), 1) + 1))[:need]
        return torch.tensor(ids[:need]).view(config.num_sequences, config.seq_len), f"file:{args.text_file}"
    from lorashear.stages.analyze import build_eval_tokens

    return build_eval_tokens(tokenizer, config), config.data


def main(argv=None) -> int:
    import lorashear
    from lorashear.knowledge import KnowledgeConfig, analyze_knowledge, mean_token_nll, plot_knowledge
    from lorashear.models.loading import load_model, load_tokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--data", default="builtin:calibration")
    parser.add_argument("--text-file", help="plain text to pack instead of --data (fallback)")
    parser.add_argument("--ratios", default="0.2,0.5")
    parser.add_argument("--gamma", type=float, default=0.2)
    parser.add_argument("--num-sequences", type=int, default=KnowledgeConfig.num_sequences)
    parser.add_argument("--seq-len", type=int, default=KnowledgeConfig.seq_len)
    parser.add_argument("--batch-size", type=int, default=KnowledgeConfig.batch_size)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    parser.add_argument("--save", help="write PREFIX.json and PREFIX.png")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    config = KnowledgeConfig(ratios=tuple(float(r) for r in args.ratios.split(",")), gamma=args.gamma,
                             data=args.data, num_sequences=args.num_sequences, seq_len=args.seq_len,
                             batch_size=args.batch_size)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model)
    t_load = time.perf_counter() - t0
    tokens, source = load_tokens(args, tokenizer, config)
    t0 = time.perf_counter()
    graph = lorashear.discover(model)
    t_discover = time.perf_counter() - t0

    mean_token_nll(model, tokens[: config.batch_size], config.batch_size)  # warm-up
    t0 = time.perf_counter()
    mean_token_nll(model, tokens, config.batch_size)
    t_forward = time.perf_counter() - t0

    print("# knowledge analysis benchmark")
    print()
    print(f"- command: `python {' '.join(sys.argv)}`")
    print(f"- machine: {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), no GPU")
    print(f"- model: {args.model} ({graph.num_layers} layers, {sum(p.numel() for p in model.parameters()):,} params), "
          f"fp32; load {t_load:.1f} s, discover {t_discover:.1f} s")
    print(f"- evaluation set: {source}, {tokens.shape[0]} x {tokens.shape[1]} tokens")
    print(f"- ratios {', '.join(f'{r:g}' for r in config.ratios)}; gamma {config.gamma:g}; "
          f"metric {config.metric}; proxy {config.proxy}; attention structure {config.attention_structure}")
    print(f"- one forward pass over the set: {t_forward:.2f} s")
    sys.stdout.flush()
    result = analyze_knowledge(model, graph, tokens, config, progress=not args.no_progress, model_name=args.model,
                               data_info={"spec": source, "seed": config.seed})
    print(f"- full-model perplexity {result.full_perplexity:.3f}")
    print(f"- node groups: {len(result.node_groups)}; forward passes: {result.forward_passes}")
    print(f"- **total analysis: {result.seconds:.1f} s** "
          f"({result.seconds / len(result.node_groups):.2f} s per node group on average)")
    print()
    print("| node group | structures | pruned per ratio | " + " | ".join(f"dev p={r:g}" for r in config.ratios)
          + " | score | rank | unprunable | seconds |")
    print("|---|---|---|" + "---|" * len(config.ratios) + "---|---|---|---|")
    for n in result.node_groups:
        pruned = "/".join(str(len(v)) for v in n.pruned.values())
        devs = " | ".join(f"{n.deviation[k]:.4g}" for k in n.deviation)
        print(f"| {n.name} | {n.num_structures} {n.structure_kind} | {pruned} | {devs} | {n.score:.4g} | "
              f"{n.rank} | {'yes' if n.unprunable else ''} | {n.seconds:.2f} |")
    print()
    top = result.unprunable_node_groups()
    print(f"most sensitive (unprunable, top {len(top)}): " + ", ".join(f"{n.name} ({n.score:.3g})" for n in top))
    layers = sorted({n.layer for n in top})
    print(f"layers with an unprunable block: {layers}")
    if args.save:
        prefix = Path(args.save)
        result.save(prefix.with_suffix(".json"))
        plot_knowledge(result, prefix.with_suffix(".png"))
        print(f"wrote {prefix.with_suffix('.json')} and {prefix.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
