"""The whole method at an equal total budget: lorashear (prune + recover) against the peer given the same tokens.

Reads rows that the other benchmarks cached and writes one table; it trains nothing itself:

- ``lorashear`` prune rows of ``quality.py`` (``--prune-work``, e.g. ``lorashear_r20_s0_100.json``: steps x
  batch x seq-len tokens) and the recovery of that pruned model by ``recover_bench.py`` (``--recover-work``,
  tag ``r20_100``: the row's ``tokens``); the pruned model's perplexity is the recovery benchmark's ``before``
  row when there is one (the model that was recovered);
- the peer with LoRA and distillation (``quality.py --rows peer_lora_kd``) at as many steps as the prune and
  recovery tokens together (``--peer-work``), and at the prune budget alone for reference;
- ``lorashear`` pruned with that whole budget and no recovery (``--peer-work``): where the tokens do most.

Every number is held-out perplexity under ``quality.py``'s protocol.

    python benchmarks/whole_method.py --ratios 0.2,0.5 --prune-steps 100 --recover-row adaptive
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SOURCES = ("builtin:heldout", "builtin:heldout-docs")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prune-steps", type=int, default=100)
    p.add_argument("--recover-row", default="adaptive", help="recovery rows (comma-separated) of the same tokens")
    p.add_argument("--prune-row", default="lorashear", help="the quality.py row that made the pruned model")
    p.add_argument("--prune-work", default=str(RESULTS / "quality" / "dev100"))
    p.add_argument("--recover-work", default=str(RESULTS / "recover" / "rows"))
    p.add_argument("--peer-work", default=str(RESULTS / "quality" / "whole"))
    p.add_argument("--out", default=str(RESULTS / "whole_method_smollm2"), help="report path without suffix")
    return p.parse_args(argv)


def _read(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cells(row: dict[str, Any] | None) -> list[str]:
    if row is None:
        return ["not run"] * len(SOURCES)
    return [f"{row['ppl'][s]:.2f}" for s in SOURCES]


def build(args: argparse.Namespace) -> tuple[str, list[dict[str, Any]]]:
    lines = ["| ratio | model | training tokens | " + " | ".join(f"ppl {s}" for s in SOURCES) + " |",
             "|---|---|---:|" + "---:|" * len(SOURCES)]
    records: list[dict[str, Any]] = []
    for ratio in (float(r) for r in args.ratios.split(",")):
        pct = f"r{round(ratio * 100)}"
        prune = _read(Path(args.prune_work) / f"{args.prune_row}_{pct}_s{args.seed}_{args.prune_steps}.json")
        tag = f"{pct}_{args.prune_steps}"
        befores = sorted(Path(args.recover_work).glob(f"{tag}_before_s{args.seed}_*.json"))
        before = _read(befores[0]) if befores else None
        prune_tokens = prune["tokens"] if prune else args.prune_steps * 2 * 256
        per_step = (prune["batch_size"] * prune["seq_len"]) if prune else 512
        recovered_rows = []
        for name in args.recover_row.split(","):
            recs = sorted(Path(args.recover_work).glob(f"{tag}_{name}_s{args.seed}_*.json"))
            recovered_rows.append((name, _read(recs[0]) if recs else None))
        rec_tokens = next((r["tokens"] for _, r in recovered_rows if r), None)
        total = prune_tokens + (rec_tokens or 0)
        peer_steps = total // per_step
        peer_same = _read(Path(args.peer_work) / f"peer_lora_kd_{pct}_s{args.seed}_{peer_steps}.json")
        lorashear_same = _read(Path(args.peer_work) / f"lorashear_{pct}_s{args.seed}_{peer_steps}.json")
        peer_prune_only = _read(Path(args.prune_work) / f"peer_lora_kd_{pct}_s{args.seed}_{args.prune_steps}.json")
        rows = [(f"lorashear prune ({args.prune_steps} steps)", prune_tokens, before or prune)]
        for name, rec in recovered_rows:
            rows.append((f"lorashear prune + recover ({name}, {rec['rounds']} x "
                         f"{rec['steps_per_round']} steps x {rec['batch_size']})" if rec else
                         f"lorashear prune + recover ({name})", prune_tokens + rec["tokens"] if rec else None, rec))
        rows += [
            (f"lorashear prune ({peer_steps} steps: the same total, no recovery)" if rec_tokens else
             "lorashear prune (the prune + recover total)", peer_steps * per_step if rec_tokens else None,
             lorashear_same),
            (f"peer + LoRA + KD ({args.prune_steps} steps)", prune_tokens, peer_prune_only),
            (f"peer + LoRA + KD ({peer_steps} steps: the same total)" if rec_tokens else
             "peer + LoRA + KD (the prune + recover total)", peer_steps * per_step if rec_tokens else None, peer_same),
        ]
        for name, tokens, row in rows:
            lines.append(f"| {ratio:.0%} | {name} | {tokens:,} | " if tokens is not None else
                         f"| {ratio:.0%} | {name} | — | ")
            lines[-1] += " | ".join(_cells(row)) + " |"
            records.append({"ratio": ratio, "model": name, "tokens": tokens,
                            "ppl": row["ppl"] if row else None})
    return "\n".join(lines), records


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    table, records = build(args)
    print(table)
    sys.path.insert(0, str(HERE))
    from quality import replace_table

    replace_table(Path(args.out).with_suffix(".md"), table + "\n",
                  "# The whole method at an equal total budget (SmolLM2-135M-Instruct, CPU)")
    Path(args.out).with_suffix(".json").write_text(json.dumps({"rows": records}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
