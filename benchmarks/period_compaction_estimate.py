"""What compacting at every period end (instead of once, when pruning ends) would save: a FLOPs estimate (issue 26).

    python benchmarks/period_compaction_estimate.py --out benchmarks/results/period_compaction_estimate

Not a run: the prune stage compacts once, when the last period ends (``--compact-at prune_end``). Until then the
student trains at full width although the groups committed in earlier periods are exactly zero. This script takes
the FLOPs a row measured (its compute column in ``benchmarks/results/quality/v2/``), the recipe's schedule and the
share of the structures each period commits (``period_quotas``), and recomputes the student's training FLOPs as if
every period's committed groups were cut out when that period ends. It assumes the FLOPs removed by a period are
proportional to its share of the removed groups (every kind follows the same quota shape; the last period's rounding
to 32 is ignored). The teacher's passes and the knowledge analysis do not change.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: the rows to estimate for, and the peer each is set against (the best peer at that ratio, 400 steps, seed 0)
ROWS = (("lorashear-1205-long", 0.2, "flap+lora_lr8e-4"), ("lorashear-1205-long", 0.5, "llmpruner+lora_lr1.6e-3"),
        ("lorashear-1205-long", 0.5, "flap+lora_lr8e-4"))


def row_file(work: Path, row: str, ratio: float, seed: int = 0, steps: int = 400) -> dict:
    return json.loads((work / f"{row}_r{round(ratio * 100)}_s{seed}_{steps}.json").read_text())


def estimate(rec: dict, dense_flops: float, knowledge_flops: float) -> dict:
    """The row's FLOPs, split into its parts, and the same with a compaction at every period end."""
    import quality
    from lorashear.config import config_from_dict
    from lorashear.lhspg.schedule import period_quotas
    from lorashear.stages.prune import PruneConfig

    opts = {k: v for k, v in quality.LORASHEAR_ROWS[rec["row"]].items() if k != "knowledge"}
    cfg = config_from_dict(PruneConfig, {**opts, "ratio": rec["ratio"], "steps": rec["steps"],
                                         "batch_size": rec["batch_size"], "seq_len": rec["seq_len"]})
    sched = cfg.lhspg.resolve(rec["steps"]).schedule
    per_step = rec["batch_size"] * rec["seq_len"]
    c = rec["compute"]
    dense_steps, small_steps = sched.prune_end, rec["steps"] - sched.prune_end
    teacher = c["teacher_fwd"] * dense_flops
    # what is left is the small model's steps: 2 x forward per token (LoRA)
    small_flops = (c["flops"] - 2 * dense_steps * per_step * dense_flops - teacher - knowledge_flops) / (
        2 * small_steps * per_step)
    quotas = period_quotas(10_000, sched.num_periods, cfg.lhspg.quota)
    saved = 0.0
    done = 0
    for k in range(sched.num_periods):  # during period k the groups of periods 0..k-1 are exactly zero
        share = done / 10_000
        saved += sched.period_steps * per_step * 2 * share * (dense_flops - small_flops)
        done += quotas[k]
    return {"row": rec["row"], "ratio": rec["ratio"], "flops": c["flops"], "dense_per_token": dense_flops,
            "small_per_token": small_flops, "teacher": teacher, "knowledge": knowledge_flops,
            "schedule": {"warmup": sched.warmup_steps, "periods": sched.num_periods,
                         "period_steps": sched.period_steps, "prune_end": sched.prune_end},
            "saved": saved, "flops_per_period_compaction": c["flops"] - saved}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", default=str(HERE / "results" / "quality" / "v2"), help="the quality rows")
    p.add_argument("--out", default=None, help="path without suffix for the result (JSON and markdown)")
    a = p.parse_args(argv)

    import quality
    import lorashear
    from lorashear.compute import Compute, forward_flops_per_token

    work = Path(a.work)
    dense = lorashear.load_model(quality.MODEL)
    results, lines = [], []
    for row, ratio, peer in ROWS:
        rec = row_file(work, row, ratio)
        knowledge = Compute()
        quality.add_knowledge_passes(knowledge, quality.LORASHEAR_ROWS[row]["knowledge"], dense)
        est = estimate(rec, forward_flops_per_token(dense, rec["seq_len"]), knowledge.flops)
        peer_flops = row_file(work, peer, ratio)["compute"]["flops"]
        est["peer"], est["peer_flops"] = peer, peer_flops
        results.append(est)
        lines.append(f"| {row} | {ratio:.0%} | {est['flops'] / 1e15:.3f} | {est['teacher'] / 1e15:.3f} | "
                     f"{est['knowledge'] / 1e15:.3f} | {est['saved'] / 1e15:.3f} "
                     f"({est['saved'] / est['flops']:.1%}) | {est['flops_per_period_compaction'] / 1e15:.3f} | "
                     f"{peer} {peer_flops / 1e15:.3f} | {est['flops'] / peer_flops:.2f}x -> "
                     f"{est['flops_per_period_compaction'] / peer_flops:.2f}x |")
    head = ["| row | ratio | PFLOPs (measured row) | of it: teacher | of it: knowledge analysis | saved by compacting "
            "at every period end (estimate) | PFLOPs then | peer (400 steps) | ours / peer: now -> then |",
            "|---|---|---:|---:|---:|---:|---:|---|---|"]
    table = "\n".join(head + lines)
    print(table)
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps({"rows": results, "machine": f"{platform.machine()}, "
                                                        f"python {platform.python_version()}"}, indent=1) + "\n")
        out.with_suffix(".md").write_text(
            "# Compacting at every period end: a FLOPs estimate (issue 26)\n\n"
            f"{__doc__.split(chr(10), 1)[1].strip()}\n\n```\npython benchmarks/period_compaction_estimate.py "
            f"--out {a.out}\n```\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
