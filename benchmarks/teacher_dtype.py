"""The online teacher's forward pass in float32 against bfloat16 (``--distill-teacher-dtype``), side by side.

    python benchmarks/teacher_dtype.py --threads 1 --out benchmarks/results/teacher_dtype_smollm2

One process loads the reference model twice (float32, and the bf16 copy ``make_teacher`` builds), then times
the teacher's forward pass on training sequences of ``builtin:calibration`` (a batch of ``--batch-size`` x
``--seq-len`` tokens, the prune stage's), interleaved: fp32, bf16, fp32, bf16, ... after one warm-up pass each.
It also reports how far the bf16 teacher's next-token distribution is from the fp32 one (mean per-token
KL(fp32 || bf16) over the next-token positions, in nats, by the training loss's own ``kl_to_teacher``) and how often their top-1 tokens agree, over the same tokens.
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5, help="timed passes per dtype")
    p.add_argument("--out", default=None, help="path without suffix for the result (JSON and markdown)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import lorashear
    from lorashear.data import load_texts, pack_texts
    from lorashear.training.losses import kl_to_teacher, make_teacher, native_bf16

    model = lorashear.load_model(a.model)
    tokenizer = lorashear.load_tokenizer(a.model)
    ids = pack_texts(load_texts("builtin:calibration"), tokenizer, a.seq_len, seed=0)
    batches = [ids[i * a.batch_size:(i + 1) * a.batch_size] for i in range(a.repeats + 1)]
    teachers = {"float32": make_teacher(model), "bfloat16": make_teacher(model, "bfloat16")}
    times: dict[str, list[float]] = {name: [] for name in teachers}
    kls, agree = [], []
    with torch.no_grad():
        for name, t in teachers.items():  # warm-up pass each
            t(input_ids=batches[0], use_cache=False)
        for batch in batches[1:]:
            logits = {}
            for name, t in teachers.items():
                t0 = time.perf_counter()
                logits[name] = t(input_ids=batch, use_cache=False).logits.float()
                times[name].append(time.perf_counter() - t0)
            kls.append(float(kl_to_teacher(logits["bfloat16"], logits["float32"])))  # KL(fp32 || bf16)
            agree.append(float((logits["float32"].argmax(-1) == logits["bfloat16"].argmax(-1)).float().mean()))
    med = {name: statistics.median(v) for name, v in times.items()}
    result = {
        "command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "threads": a.threads, "native_bf16": native_bf16(torch.device("cpu")),
        "tokens_per_pass": a.batch_size * a.seq_len, "seconds": times, "median_s": med,
        "speedup": med["float32"] / med["bfloat16"], "kl_fp32_bf16_nats": statistics.mean(kls),
        "top1_agreement": statistics.mean(agree)}
    text = (f"teacher forward, {a.batch_size} x {a.seq_len} tokens, {a.threads} thread(s): float32 "
            f"{med['float32']:.2f} s, bfloat16 {med['bfloat16']:.2f} s (median of {a.repeats}) = "
            f"{result['speedup']:.2f}x; KL(fp32 || bf16) {result['kl_fp32_bf16_nats']:.4f} nats per token, "
            f"top-1 agreement {result['top1_agreement']:.3f} (native bf16: {result['native_bf16']})")
    print(text)
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        out.with_suffix(".md").write_text(
            "# The online teacher in float32 against bfloat16\n\n"
            f"```\n{result['command']}\n```\n\nMachine: {result['machine']}; nothing else running.\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
