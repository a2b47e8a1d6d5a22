"""Would compacting at every period end pay in wall time? Step times measured at every period's width (issue 26).

    python benchmarks/period_compaction_speed.py --threads 1 \
        --run ~/.cache/lorashear/speed100_long/lorashear-1205-long_r50_s0_100 \
        --out benchmarks/results/period_compaction_speed_r50

The prune stage compacts once, when the last pruning period ends. During period ``k`` the groups that periods
``0..k-1`` committed are exactly zero, yet the student still computes them. This script takes a finished run (its
``prune_report.json`` lists the groups each period selected), builds the student as it would be if every period's
groups were cut out when that period ends (a fresh copy of the dense model with LoRA, compacted by the groups of
periods ``0..k-1``, for every ``k``), and times, interleaved in one process, one training step at each width:

- during the warm-up and the pruning periods: the distillation step of the recipe (student forward and backward,
  the teacher's forward pass, the one-pass loss with KL share 0.5);
- after pruning: a cross-entropy step of the dense width (the masked model) and of the final width.

The prune stage's wall time is then composed from the run's schedule: (a) masked to the last step, (b) compacted
when pruning ends (today), (b') compacted at every period end. The LHSPG update (about 0.2 s per pruning step at
full width, ``prune_step_bench_fisher.md``), data loading, logging and the compactions themselves are left out of
all three; the step times are measured, the sums are arithmetic.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="a finished prune output directory (its prune_report.json)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (the median is kept)")
    p.add_argument("--out", default=None, help="path without suffix for the result (JSON and markdown)")
    a = p.parse_args(argv)

    import torch

    import lorashear
    from lorashear.compaction import compact
    from lorashear.graph.discover import discover
    from lorashear.models.lora import LoraSettings, attach_lora
    from lorashear.training.losses import make_teacher
    from lorashear.training.soft_targets import soft_target_loss

    report_path = Path(a.run).expanduser() / "prune_report.json"
    if not report_path.is_file():
        print(f"no prune_report.json in {a.run}: give --run a finished prune output directory", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    report = json.loads(report_path.read_text())
    settings = report["settings"]
    sched = report["schedule"]
    periods = [p_["selected"] for p_ in report["periods"]]
    lora = LoraSettings(**{k: v for k, v in settings["lora"].items() if k != "targets"})
    kl_share = settings["distill"]["weight"]
    batch_size, seq_len = settings["train"]["batch_size"], settings["data"]["seq_len"]

    dense = lorashear.load_model(settings["model"])
    teacher = make_teacher(dense, settings["distill"]["teacher_dtype"])
    vocab = dense.config.vocab_size
    torch.manual_seed(0)
    batch = torch.randint(0, vocab, (batch_size, seq_len))

    def student(removed: list[int]) -> torch.nn.Module:
        model = attach_lora(lorashear.load_model(settings["model"]), lora)
        if removed:
            graph = discover(model)
            compact(model, [graph.groups[i] for i in removed])
        model.train()
        return model

    # widths: "k" = the student during period k (periods 0..k-1 removed); "final" = every period removed
    removed_before = [sorted({g for sel in periods[:k] for g in sel}) for k in range(len(periods) + 1)]
    students = {f"period {k}": student(removed_before[k]) for k in range(len(periods))}
    students["final"] = student(removed_before[-1])
    params = {name: sum(p_.numel() for p_ in m.parameters() if not p_.requires_grad) for name, m in students.items()}

    def kd_step(model: torch.nn.Module) -> None:
        logits = model(input_ids=batch, use_cache=False).logits
        with torch.no_grad():
            t_logits = teacher(input_ids=batch, use_cache=False).logits
        soft_target_loss(logits, t_logits, batch, kl_share)[0].backward()
        model.zero_grad(set_to_none=True)

    def ce_step(model: torch.nn.Module) -> None:
        model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)

    cases = {f"KD step, {name}": (kd_step, m) for name, m in students.items() if name != "final"}
    cases["CE step, dense width"] = (ce_step, students["period 0"])
    cases["CE step, final width"] = (ce_step, students["final"])
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(a.repeats + 1):  # round 0 warms up
        for name, (fn, model) in cases.items():
            start = time.perf_counter()
            fn(model)
            if round_:
                times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(ts) for name, ts in times.items()}

    warmup, steps, prune_end = sched["warmup_steps"], settings["train"]["steps"], sched["prune_end"]
    bounds = sched["period_boundaries"]
    kd_dense, ce_dense, ce_final = med["KD step, period 0"], med["CE step, dense width"], med["CE step, final width"]
    pruning_steps = prune_end - warmup
    after = steps - prune_end
    masked = (warmup + pruning_steps) * kd_dense + after * ce_dense
    at_end = (warmup + pruning_steps) * kd_dense + after * ce_final
    per_period = warmup * kd_dense + sum((bounds[k + 1] - bounds[k]) * med[f"KD step, period {k}"]
                                         for k in range(len(periods))) + after * ce_final
    composed = {"masked": masked, "compact_at_prune_end": at_end, "compact_at_every_period_end": per_period}
    ratios = {"masked / at prune end": masked / at_end, "masked / at every period end": masked / per_period,
              "at prune end / at every period end": at_end / per_period}

    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"
    command = "python benchmarks/period_compaction_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ratio = settings["target"]["ratio"]
    lines = [f"# Compacting at every period end: step times at every period's width, {round(ratio * 100)}%", "",
             f"```\n{command}\n```", "",
             f"Run: `{Path(a.run).name}` (schedule: warm-up {warmup}, {len(periods)} periods, pruning ends at step "
             f"{prune_end} of {steps}); {batch_size} x {seq_len} tokens per step, torch threads {a.threads}, median "
             f"of {a.repeats} interleaved rounds; {machine}.", "",
             "| width | frozen parameters | step | median s |", "|---|---:|---|---:|"]
    for name, (fn, model) in cases.items():
        width = name.split(", ", 1)[1]
        key = "period 0" if width == "dense width" else ("final" if width == "final width" else width)
        lines.append(f"| {width} | {params[key]:,} | {'KD' if fn is kd_step else 'CE'} | {med[name]:.3f} |")
    lines += ["", "| prune stage, composed | s |", "|---|---:|"]
    lines += [f"| {name.replace('_', ' ')} | {sec:.0f} |" for name, sec in composed.items()]
    lines += [f"| **{name}** | **{r:.2f}x** |" for name, r in ratios.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        out = Path(a.out)
        out.with_suffix(".json").write_text(json.dumps({
            "run": str(a.run), "median_s": med, "frozen_params": params, "composed_s": composed, "ratios": ratios,
            "schedule": sched, "steps": steps, "threads": a.threads, "repeats": a.repeats, "machine": machine,
            "command": command}, indent=2))
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
