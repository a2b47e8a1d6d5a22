"""Dynamic knowledge recovery on a pruned reference model, at a fixed token budget, row by row, cached.

Every row recovers the same pruned model (``--pruned``, made by the prune stage) against the dense
reference model, with the same sources (``builtin:austen``, ``builtin:wikipedia``,
``builtin:debian-handbook``; stage 1 only), rounds of ``--steps`` LoRA steps of ``--batch-size`` x
``--seq-len`` tokens, ``--rounds`` rounds and no early stop (tolerance 0 stops only when a round makes
the worst source worse), so every row trains on the same number of tokens unless that happens (the
row records its tokens). Rows:

- ``adaptive``: sampling weights by degradation, beta 0.3 (the paper's adaptor);
- ``uniform``: beta 1.0 (every source the same share every round);
- ``adaptive_kd`` / ``uniform_kd``: the same with ``--distill-weight`` of KL to the dense model.

Rows use new LoRA factors each round (``lora_across_rounds: false``, as first measured; the stage's default
is now one LoRA through the rounds: ``--set lora_across_rounds=true``).
``--set OPTION=VALUE --variant NAME`` trains rows with a recover option changed (``lr``, ``lora_r``,
``lr_scheduler``, ...); they are cached and reported as ``ROW_NAME``.

Measured per row: the validation loss of each source before and after (held-out sequences of each
source, never trained on, as perplexity), and held-out perplexity on ``builtin:heldout`` and
``builtin:heldout-docs`` (the quality benchmark's protocol). ``before`` is the pruned model itself.

    python benchmarks/recover_bench.py --pruned ~/.cache/lorashear/quality/lorashear_r20_s0_400 --tag r20
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

ROWS: dict[str, dict[str, Any]] = {
    "adaptive": {"beta": 0.3, "distill": False},
    "uniform": {"beta": 1.0, "distill": False},
    "adaptive_kd": {"beta": 0.3, "distill": True},
    "uniform_kd": {"beta": 1.0, "distill": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pruned", required=True, help="the pruned model directory")
    p.add_argument("--tag", required=True, help="name of this input in the cached rows, e.g. r20")
    p.add_argument("--rows", default="before,adaptive,uniform,adaptive_kd,uniform_kd")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=25, help="LoRA steps per round")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--distill-weight", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--work", default=str(HERE / "results" / "recover" / "rows"))
    p.add_argument("--out", default=str(HERE / "results" / "recover_smollm2"), help="report path without suffix")
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra recover option for every trained row (YAML value), e.g. --set lr=1e-3")
    p.add_argument("--variant", default="", help="suffix of the row names (with --set)")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    if args.set and not args.variant:
        p.error("--set needs --variant NAME, so the rows it changes are cached and reported under their own name")
    return args


def extra_options(args: argparse.Namespace) -> dict[str, Any]:
    import yaml

    out = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: write OPTION=VALUE")
        out[key.strip()] = yaml.safe_load(value)
    return out


def heldout(model, args: argparse.Namespace) -> dict[str, float]:
    from quality import EVAL_SOURCES, Bench

    bench = Bench(argparse.Namespace(work=args.work, models=None, set=[], ppl_seq_len=args.ppl_seq_len,
                                     ppl_windows=args.ppl_windows))
    return {s: v for s, v in bench.evaluate(model).items() if s in EVAL_SOURCES}


def run_row(row: str, args: argparse.Namespace) -> dict[str, Any]:
    import lorashear
    from lorashear.config import config_from_dict
    from lorashear.paths import cache_root
    from lorashear.stages import recover

    t0 = time.perf_counter()
    if row == "before":
        model = lorashear.load_pretrained(args.pruned)
        return {"ppl": heldout(model, args), "wall_s": time.perf_counter() - t0}
    spec = ROWS[row]
    out = cache_root() / "recover_bench" / f"{args.tag}_{row}{args.variant and '_' + args.variant}_s{args.seed}"
    values = {"model": args.pruned, "teacher": "smollm2-135m-instruct", "out": str(out), "instruct_data": ["none"],
              "max_rounds": args.rounds, "tolerance": 0.0, "beta": spec["beta"], "steps": args.steps,
              "batch_size": args.batch_size, "seq_len": args.seq_len, "seed": args.seed, "progress": False,
              "log_every": 5, "distill_weight": args.distill_weight if spec["distill"] else 0.0,
              "lora_across_rounds": False,  # the rows as first measured; --set lora_across_rounds=true for the default
              **extra_options(args)}
    result = recover.run(config_from_dict(recover.RecoverConfig, values))
    rep = result.report
    stage = rep["stages"][0]
    model = lorashear.load_pretrained(out)
    return {
        "options": values, "tokens": rep["tokens_seen"], "rounds": len(rep["rounds"]),
        "stop_reason": stage.get("stop_reason"), "dense_loss": rep["dense_loss"],
        "source_ppl_before": {k: math.exp(v) for k, v in stage["initial_loss"].items()},
        "source_ppl_after": {k: math.exp(v) for k, v in stage["final_loss"].items()},
        "source_ppl_dense": {k: math.exp(v) for k, v in rep["dense_loss"].items()},
        "weights": [{k: s["weight"] for k, s in r["sources"].items()} for r in rep["rounds"]],
        "train_s": rep["train_wall_time_s"], "ppl": heldout(model, args), "wall_s": time.perf_counter() - t0,
    }


def write_report(args: argparse.Namespace) -> None:
    work = Path(args.work)
    rows = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    lines = []
    for tag in sorted({r["tag"] for r in rows}):
        items = [r for r in rows if r["tag"] == tag]
        sources = sorted({s for r in items for s in r.get("source_ppl_after", {})})
        heldouts = sorted({s for r in items for s in r.get("ppl", {})})
        lines += [f"### `{tag}`: {items[0]['pruned']}", "",
                  "| row | seed | tokens | rounds | " + " | ".join(f"val ppl {s}" for s in sources) + " | "
                  + " | ".join(f"ppl {s}" for s in heldouts) + " |",
                  "|---|---|---|---|" + "---|" * (len(sources) + len(heldouts))]
        dense = next((r["source_ppl_dense"] for r in items if "source_ppl_dense" in r), {})
        before = next((r["source_ppl_before"] for r in items if "source_ppl_before" in r), {})
        if dense:
            lines.append("| dense | | | | " + " | ".join(f"{dense[s]:.2f}" for s in sources) + " |"
                         + " |" * len(heldouts))
        order = ["before", *ROWS]
        for r in sorted(items, key=lambda r: (order.index(r.get("base_row", r["row"])), r["row"], r["seed"])):
            src = r.get("source_ppl_after", before if r["row"] == "before" else {})
            lines.append(f"| {r['row']} | {r['seed']} | {r.get('tokens', 0):,} | {r.get('rounds', 0)} | "
                         + " | ".join(f"{src[s]:.2f}" if s in src else "—" for s in sources) + " | "
                         + " | ".join(f"{r['ppl'][s]:.2f}" for s in heldouts) + " |")
        lines.append("")
        for r in items:
            if r.get("weights"):
                w = "; ".join("round %d: %s" % (i + 1, ", ".join(f"{k.split(':')[-1]} {v:.2f}" for k, v in ws.items()))
                              for i, ws in enumerate(r["weights"]))
                lines.append(f"- `{r['row']}` sampling weights: {w}")
        lines.append("")
    table = "\n".join(lines)
    from quality import replace_table

    replace_table(Path(args.out).with_suffix(".md"), table + "\n", "# Recovery benchmark")
    Path(args.out).with_suffix(".json").write_text(json.dumps(rows, indent=1) + "\n")
    print(table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("LORASHEAR_DISABLE_PROGRESS", "1")
    import torch

    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        for row in args.rows.split(","):
            name = row if row == "before" or not args.variant else f"{row}_{args.variant}"
            path = work / f"{args.tag}_{name}_s{args.seed}_{args.rounds}x{args.steps}.json"
            if path.is_file():
                continue
            rec = run_row(row, args)
            rec.update(row=name, base_row=row, extra=extra_options(args) if row != "before" else {}, tag=args.tag, seed=args.seed, pruned=args.pruned, rounds_max=args.rounds,
                       steps_per_round=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       threads=args.threads, command=shlex.join([Path(sys.executable).name, *sys.argv]))
            path.write_text(json.dumps(rec, indent=1) + "\n")
            logging.info("%s: %s", row, {k: round(v, 2) for k, v in rec["ppl"].items()})
    write_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
