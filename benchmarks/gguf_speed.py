"""Size on disk and speed in llama.cpp of a pruned model's GGUF export against the dense model's.

Both models are exported the same way (``lorashear export``, one file per ``--outtypes``) and run in
llama.cpp through llama-cpp-python in one process, one after another, each with ``--threads`` CPU
threads: prefill = one ``eval`` of a ``--prompt-len``-token prompt, decode = ``--new-tokens`` greedy
steps of one token each (argmax of the last logits). The median of ``--repeats`` timed runs after one
warm-up is reported, with the pruned/dense ratios measured in the same run. ``--pruned`` may be given
several times (``LABEL=DIR`` names a row); ``--dense-as-deci`` adds the dense model written as ``deci``
(the same weights through llama.cpp's per-layer graph: what the graph itself costs).

    python benchmarks/gguf_speed.py --pruned runs/lorashear/pruned --out benchmarks/results/gguf_speed_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dense", default="smollm2-135m-instruct", help="the dense model (directory or built-in name)")
    p.add_argument("--pruned", required=True, action="append",
                   help="a pruned model directory, or LABEL=DIR; may be repeated")
    p.add_argument("--dense-as-deci", action="store_true", help="also run the dense model written as deci")
    p.add_argument("--outtypes", default="f16,q8_0")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="where the GGUF files go (default: a temporary directory)")
    p.add_argument("--out", default=None, help="report path without suffix (.md and .json)")
    return p.parse_args(argv)


def measure(path: Path, prompt_len: int, new_tokens: int, repeats: int, threads: int) -> dict[str, float]:
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=prompt_len + new_tokens + 8, n_batch=prompt_len,
                          n_threads=threads, n_threads_batch=threads, verbose=False, seed=0)
    n_vocab = llm.n_vocab()
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, n_vocab - 100, size=prompt_len)]
    prefill, decode = [], []
    for i in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new_tokens):
            last = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)  # the last evaluated token's logits
            nxt = int(np.argmax(np.ctypeslib.as_array(last, shape=(n_vocab,))))
            llm.eval([nxt])
        t2 = time.perf_counter()
        if i:  # the first run warms up
            prefill.append(t1 - t0)
            decode.append(t2 - t1)
    del llm
    return {"prefill_tokens_per_s": prompt_len / statistics.median(prefill),
            "decode_tokens_per_s": new_tokens / statistics.median(decode),
            "prefill_ms": 1000 * statistics.median(prefill), "decode_ms_per_token": 1000 * statistics.median(decode) / new_tokens}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import llama_cpp

    from lorashear.export import export_gguf

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="gguf-speed-"))
    rows: list[dict[str, Any]] = []
    models: list[tuple[str, str, str | None]] = [("dense", args.dense, None)]
    if args.dense_as_deci:
        models.append(("dense as deci", args.dense, "deci"))
    for value in args.pruned:
        label, _, directory = value.rpartition("=")
        models.append((label or ("pruned" if len(args.pruned) == 1 else directory), directory, None))
    for outtype in args.outtypes.split(","):
        for role, model, arch in models:
            path = work / f"{role.replace(' ', '_').replace('/', '_')}-{outtype}.gguf"
            written = export_gguf(model, path, outtype=outtype, arch=arch)
            print(f"exported {role} {outtype}: {written.arch}, {path.stat().st_size / 2**20:.1f} MiB, "
                  f"{len(written.fallbacks)} tensors kept f16", flush=True)
            speed = measure(path, args.prompt_len, args.new_tokens, args.repeats, args.threads)
            rows.append({"model": role, "source": model, "outtype": outtype, "arch": written.arch,
                         "bytes": path.stat().st_size, "fallbacks": len(written.fallbacks), **speed})
            print(json.dumps(rows[-1]), flush=True)
    by = {(r["model"], r["outtype"]): r for r in rows}
    lines = ["| type | model | arch | size (MiB) | size / dense | prefill (tok/s) | prefill / dense | decode (tok/s) "
             "| decode / dense | tensors kept f16 |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = by[("dense", r["outtype"])]
        lines.append(f"| {r['outtype']} | {r['model']} | `{r['arch']}` | {r['bytes'] / 2**20:.1f} | "
                     f"{r['bytes'] / d['bytes']:.3f} | {r['prefill_tokens_per_s']:.0f} | "
                     f"{r['prefill_tokens_per_s'] / d['prefill_tokens_per_s']:.3f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['decode_tokens_per_s'] / d['decode_tokens_per_s']:.3f} | {r['fallbacks']} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                   "llama_cpp_python": llama_cpp.__version__, "threads": args.threads}
        command = "python benchmarks/gguf_speed.py " + " ".join(sys.argv[1:] if argv is None else argv)
        Path(args.out).with_suffix(".json").write_text(json.dumps({"command": command, "machine": machine,
                                                                    "rows": rows}, indent=2) + "\n")
        Path(args.out).with_suffix(".md").write_text(
            f"# GGUF size and llama.cpp speed: pruned vs dense\n\nCommand: `{command}`\n\nMachine: {machine}\n\n"
            f"{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
