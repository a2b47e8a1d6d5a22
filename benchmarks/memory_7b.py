"""What distillation and the fisher saliency add to memory on a LLaMA-7B shape (estimated on the meta device).

    python benchmarks/memory_7b.py [--batch-size 1] [--seq-len 2048] [--steps 400] [--top-k 64]

The model is built on the meta device (no weights), so the parameter counts are exact; everything else is
arithmetic on them and printed with its formula: the online teacher (a frozen copy of the dense model), the
distillation loss's logits, the activation-Fisher statistics (two float64 per structure plus column maps),
the input Gram matrices of ``--transfer`` (one fp32 ``in_features^2`` matrix per ``o_proj`` / ``down_proj``) and,
as the alternative to an online teacher, the memory for the teacher's top-k logits of a deterministic run
(``--distill-topk``: fp16 value + int32 index per kept logit, held in CPU memory).
"""

from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--grad-accum", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=64)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    params = sum(p.numel() for p in model.parameters())
    gib = 2**30
    L, H, I, V = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size, cfg.vocab_size
    structures = L * (H + cfg.num_key_value_heads + I)  # query-head slots, KV groups, MLP channels
    consumer_columns = L * (cfg.hidden_size * 2 + I)  # o_proj columns (heads and KV groups) + down_proj columns
    fisher_bytes = structures * (8 + 8 + 1) + consumer_columns * (8 + 8)
    tokens_step = a.batch_size * a.seq_len
    logits_bytes = tokens_step * V * 4 * 3  # teacher logits, student log-softmax, teacher probabilities (fp32)
    run_tokens = a.steps * a.grad_accum * tokens_step
    topk_bytes = run_tokens * a.top_k * (2 + 4)  # fp16 value + int32 index per kept logit
    print(f"LLaMA-7B shape: {params:,} parameters ({params * 2 / gib:.1f} GiB in bf16)")
    print(f"online teacher (frozen bf16 copy, no gradients or optimizer state): +{params * 2 / gib:.1f} GiB")
    print(f"distillation logits per micro-batch ({a.batch_size} x {a.seq_len} tokens x {V} vocab x 4 B x 3): "
          f"+{logits_bytes / gib:.2f} GiB")
    print(f"activation-Fisher statistics ({structures:,} structures x 17 B + {consumer_columns:,} column maps x 16 B):"
          f" +{fisher_bytes / 2**20:.1f} MiB")
    gram_bytes = L * (cfg.hidden_size ** 2 + I ** 2) * 4  # o_proj input (H x head_dim) and down_proj input (I)
    print(f"--transfer input Grams ({L} x ({cfg.hidden_size}^2 + {I}^2) x 4 B, on the training device): "
          f"+{gram_bytes / gib:.1f} GiB")
    print(f"--distill-topk {a.top_k} instead of the online teacher, {a.steps} steps x {a.grad_accum} x "
          f"{tokens_step} tokens = {run_tokens:,} tokens x {a.top_k} x 6 B: {topk_bytes / gib:.1f} GiB of CPU memory")


if __name__ == "__main__":
    main()
