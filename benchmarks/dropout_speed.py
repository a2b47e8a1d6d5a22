"""LoRA dropout drawn by torch (one random number per element) against by its gaps, side by side.

    python benchmarks/dropout_speed.py --threads 2 --out benchmarks/results/dropout_speed_smollm2

One process times (1) one dropout call on the shapes LoRA's inputs have in the reference model (a batch of
``--batch-size`` x ``--seq-len`` tokens: the hidden size for q/k/v/o/gate/up, the MLP width for down), and
(2) a LoRA training step of the reference model (forward, cross-entropy, backward; LoRA on every projection,
the recipe's rank and dropout) on ``builtin:calibration`` sequences, once with ``dropout_sampler="torch"``
and once with ``"gaps"``, interleaved: torch, gaps, torch, gaps, ... after a warm-up step each. It reports
the medians and their ratios; the masks' distribution is tested in ``tests/test_gap_dropout.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=5, help="timed training steps per sampler")
    p.add_argument("--out", default=None, help="path without suffix for the result (JSON and markdown)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import lorashear
    from lorashear.data import load_texts, pack_texts
    from lorashear.models.gap_dropout import gap_dropout
    from lorashear.models.lora import LoraSettings, attach_lora

    model_cfg = lorashear.load_model(a.model).config
    calls = {}
    for name, width in (("hidden", model_cfg.hidden_size), ("mlp", model_cfg.intermediate_size)):
        x = torch.randn(a.batch_size, a.seq_len, width)
        calls[name] = {
            "shape": list(x.shape),
            "torch_ms": _median_ms(lambda: torch.nn.functional.dropout(x, a.dropout, training=True), 50),
            "gaps_ms": _median_ms(lambda: gap_dropout(x, a.dropout), 50)}
        calls[name]["ratio"] = calls[name]["torch_ms"] / calls[name]["gaps_ms"]

    tokenizer = lorashear.load_tokenizer(a.model)
    ids = pack_texts(load_texts("builtin:calibration"), tokenizer, a.seq_len, seed=0)
    batches = [ids[i * a.batch_size:(i + 1) * a.batch_size] for i in range(a.repeats + 1)]
    models = {}
    for sampler in ("torch", "gaps"):
        torch.manual_seed(0)
        m = attach_lora(lorashear.load_model(a.model), LoraSettings(dropout=a.dropout, dropout_sampler=sampler))
        m.train()
        models[sampler] = m
    step_s: dict[str, list[float]] = {name: [] for name in models}

    def step(m, batch):
        out = m(input_ids=batch, labels=batch, use_cache=False)
        out.loss.backward()
        m.zero_grad(set_to_none=True)

    for name, m in models.items():  # warm-up step each
        step(m, batches[0])
    for batch in batches[1:]:
        for name, m in models.items():
            t0 = time.perf_counter()
            step(m, batch)
            step_s[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(v) for name, v in step_s.items()}
    result = {
        "model": a.model, "threads": a.threads, "batch_size": a.batch_size, "seq_len": a.seq_len,
        "dropout": a.dropout, "calls": calls, "step_s": step_s, "step_median_s": med,
        "step_ratio": med["torch"] / med["gaps"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "command": "python benchmarks/dropout_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    lines = [f"one dropout call, {v['shape']}: torch {v['torch_ms']:.3f} ms, gaps {v['gaps_ms']:.3f} ms "
             f"= {v['ratio']:.2f}x" for v in calls.values()]
    lines.append(f"LoRA training step (forward, backward), {a.batch_size} x {a.seq_len} tokens, {a.threads} "
                 f"thread(s): torch {med['torch']:.3f} s, gaps {med['gaps']:.3f} s (median of {a.repeats}) = "
                 f"{result['step_ratio']:.2f}x")
    print("\n".join(lines))
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        md = ["# LoRA dropout: torch's draws against the gaps' (`models/gap_dropout.py`)", "", "```",
              result["command"], "```", "", f"Machine: {result['machine']}.", "", *lines, ""]
        out.with_suffix(".md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
