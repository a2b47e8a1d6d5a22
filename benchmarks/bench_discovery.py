"""Discovery time and memory on a 7B-shaped LLaMA built on the meta device (no weights).

    python benchmarks/bench_discovery.py [--lora-rank 8] [--layers 32]

Prints the seconds spent in ``lorashear.discover`` and the process's peak resident memory
before and after, so "no weight memory" can be checked (a 7B fp32 model would need ~27 GB).
"""

from __future__ import annotations

import argparse
import platform
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import lorashear


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--lora-rank", type=int, default=0)
    args = parser.parse_args()
    config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if args.lora_rank:
        from lorashear.models.lora import LoraSettings, attach_lora

        model = attach_lora(model, LoraSettings(r=args.lora_rank, alpha=2 * args.lora_rank, dropout=0.0))
    n_params = sum(p.numel() for p in model.parameters())
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    graph = lorashear.discover(model)
    seconds = time.perf_counter() - start
    rss_after = peak_rss_mib()
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"model: LLaMA-7B shape on meta, {args.layers} layers, {n_params:,} parameters"
          f"{f', LoRA r={args.lora_rank}' if args.lora_rank else ''}")
    for row in graph.summary():
        print(f"  {row['kind']:<15} {row['count']:>8} groups, {row['params']:>15,} params")
    print(f"discovery time: {seconds:.1f} s (target < 60 s)")
    print(f"peak RSS: {rss_before:.0f} MiB before discovery, {rss_after:.0f} MiB after "
          f"(fp32 weights alone would be {n_params * 4 / 2**20:,.0f} MiB)")


if __name__ == "__main__":
    main()
