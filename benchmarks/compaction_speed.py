"""Wall time of the prune stage with and without compaction at the end of pruning (issue 26, rows a and b).

Reads rows that ``quality.py`` trained in one process, one after the other, under the same load
(``--rows lorashear-masked,lorashear``), and their kept prune reports. For every ratio and seed it prints the
prune stage's train-loop wall time of the masked run (a: full width to the last step) and of the compacted run
(b: compacted when the last pruning period ends), their ratio, the FLOPs of each, the throughput before and
after the compaction step, and the validation perplexities (the two runs differ only in dropout's draws after
compaction).

    python benchmarks/quality.py --rows lorashear-masked,lorashear --ratios 0.2,0.5 --seeds 0 --steps 100 \\
        --threads 1 --splits validation --ppl-windows 32 --work benchmarks/results/quality/speed100 \\
        --models ~/.cache/lorashear/speed100 --out benchmarks/results/compaction_speed100_rows
    python benchmarks/compaction_speed.py --work benchmarks/results/quality/speed100 \\
        --models ~/.cache/lorashear/speed100 --out benchmarks/results/compaction_speed100
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

MASKED, COMPACTED = "lorashear-masked", "lorashear"


def _report(models: Path, key: str) -> dict[str, Any] | None:
    path = models / key / "prune_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _throughput(report: dict[str, Any], compacted: bool) -> float | None:
    """Mean logged tokens/s after pruning: the compacted phase of run b, the steps past the schedule's end of
    pruning of run a."""
    end = report["schedule"]["prune_end"]
    after = [e["tokens_per_s"] for e in report["log"] if e.get("tokens_per_s")
             and (e.get("phase") == "compacted" if compacted else e["step"] > end)]
    return statistics.mean(after) if after else None


def rows(work: Path, models: Path, compacted: str = COMPACTED, masked: str = MASKED) -> list[dict[str, Any]]:
    """Every (``masked``, ``compacted``) pair of rows at the same ratio, seed and step count."""
    found = {}
    for path in sorted(work.glob("*.json")):
        rec = json.loads(path.read_text())
        if rec.get("row") in (masked, compacted):
            found[(rec["row"], rec["ratio"], rec["seed"], rec["steps"])] = (path.stem, rec)
    out = []
    for (row, ratio, seed, steps), (key, rec) in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][2])):
        if row != compacted or (masked, ratio, seed, steps) not in found:
            continue
        pair = {}
        for name, (k, r) in (("a", found[(masked, ratio, seed, steps)]), ("b", (key, rec))):
            rep = _report(models, k)
            pair[name] = {
                "key": k, "train_s": rep["train_wall_time_s"] if rep else r["train_s"],
                "stage_s": r["train_s"], "pflops": r["compute"]["flops"] / 1e15,
                "compaction_step": _compaction_steps((rep or {}).get("compaction", {})),
                "compaction_at": (rep or {}).get("compaction", {}).get("at"),
                "tokens_per_s_after": _throughput(rep, name == "b") if rep else None,
                "ppl": {s: v["ppl"] for s, v in r["ppl"].items()}}
        pair.update(ratio=ratio, seed=seed, steps=steps,
                    speedup=pair["a"]["train_s"] / pair["b"]["train_s"],
                    stage_speedup=pair["a"]["stage_s"] / pair["b"]["stage_s"])
        out.append(pair)
    return out


#: how each row trained, by its report's ``compaction.at``
HOW = {"end": "masked to the last step", "prune_end": "compacted at the end of pruning",
       "period_end": "cut at every period end"}


def _compaction_steps(compaction: dict[str, Any]) -> str | None:
    """The step of the compaction, or the first and last of the cuts at every period end."""
    rounds = compaction.get("rounds")
    if rounds:
        return f"{rounds[0]['step']}..{rounds[-1]['step']}"
    return None if compaction.get("step") is None else str(compaction["step"])


def table(pairs: list[dict[str, Any]]) -> str:
    specs = sorted({s for p in pairs for s in p["a"]["ppl"]})
    head = ("| ratio | seed | steps | row | compacted at | train loop (s) | prune stage (s) | tokens/s after pruning "
            "| PFLOPs | " + " | ".join(f"`{s}`" for s in specs) + " |")
    lines = [head, "|---|---|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(specs)]
    for p in pairs:
        b_row = p["b"]["key"].rsplit("_r", 1)[0]
        a_row = p["a"]["key"].rsplit("_r", 1)[0]
        b_how = HOW.get(p["b"]["compaction_at"] or "prune_end", "compacted at the end of pruning")
        a_how = HOW.get(p["a"]["compaction_at"] or "end", "masked to the last step")
        b_label = f"(b) {b_how}" + ("" if b_row == COMPACTED else f" (`{b_row}`)")
        a_label = f"(a) {a_how}" + ("" if a_row == MASKED else f" (`{a_row}`)")
        for name, label in (("a", a_label), ("b", b_label)):
            r = p[name]
            tps = "—" if r["tokens_per_s_after"] is None else f"{r['tokens_per_s_after']:.1f}"
            lines.append(f"| {p['ratio']:.0%} | {p['seed']} | {p['steps']} | {label} | {r['compaction_step'] or '—'} | "
                         f"{r['train_s']:.0f} | {r['stage_s']:.0f} | {tps} | {r['pflops']:.3f} | "
                         + " | ".join(f"{r['ppl'].get(s, float('nan')):.2f}" for s in specs) + " |")
        lines.append(f"| {p['ratio']:.0%} | {p['seed']} | {p['steps']} | **a / b** | | **{p['speedup']:.2f}x** | "
                     f"{p['stage_speedup']:.2f}x | | {p['a']['pflops'] / p['b']['pflops']:.2f}x |" + " |" * len(specs))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="quality.py's --work with both rows")
    p.add_argument("--models", required=True, help="quality.py's --models (the kept prune reports)")
    p.add_argument("--compacted", default=COMPACTED,
                   help="the row compared with the masked one (a variant of the recipe, e.g. lorashear-cheapteacher)")
    p.add_argument("--masked", default=MASKED,
                   help="the masked row (the same recipe with --compact-at end, e.g. lorashear-1205-long-masked)")
    p.add_argument("--out", default=None, help="path without suffix for the pairs as JSON (the table goes to stdout)")
    a = p.parse_args(argv)
    pairs = rows(Path(a.work).expanduser(), Path(a.models).expanduser(), a.compacted, a.masked)
    if not pairs:
        print(f"no (masked, compacted) pair of rows in {a.work}; run quality.py with "
              f"--rows {a.masked},{a.compacted} first", file=sys.stderr)
        return 2
    text = table(pairs)
    print(text)
    if a.out:
        out = Path(a.out)
        tmp = out.with_name(out.name + ".json.tmp")
        tmp.write_text(json.dumps(pairs, indent=1) + "\n")
        tmp.replace(out.with_name(out.name + ".json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
