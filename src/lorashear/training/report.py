"""``prune_report.json`` helpers and ``prune.png`` (loss and sparsity over steps; kept width per layer)."""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..graph.groups import Group


def kept_per_layer(all_groups: Sequence[Group], removed: Sequence[Group]) -> dict[str, dict[int, dict[str, int]]]:
    """``{kind: {layer: {"total": n, "kept": k}}}`` over the per-layer group kinds."""
    total: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    gone: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for g in all_groups:
        if g.layer is not None:
            total[g.kind][g.layer] += 1
    for g in removed:
        if g.layer is not None:
            gone[g.kind][g.layer] += 1
    return {kind: {layer: {"total": n, "kept": n - gone[kind][layer]} for layer, n in sorted(layers.items())}
            for kind, layers in total.items()}


def plot_prune(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Loss and group sparsity over steps (left), kept fraction per layer and kind (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = report.get("log", [])
    fig, (ax1, ax3) = plt.subplots(1, 2, figsize=(12, 4.5))
    steps = [r["step"] for r in log]
    # cross-entropy throughout (the mixed objective changes meaning when the KL share switches), KL apart
    ax1.plot(steps, [r.get("ce", r["loss"]) for r in log], color="tab:blue", lw=1, label="cross-entropy")
    kl = [(r["step"], r["kl"]) for r in log if "kl" in r]
    if kl:
        ax1.plot([k[0] for k in kl], [k[1] for k in kl], color="tab:green", lw=1, ls="--",
                 label="KL to the dense model")
        ax1.legend(loc="upper right")
    ax1.set_xlabel("optimizer step")
    ax1.set_ylabel("training loss (cross-entropy; KL dashed)", color="tab:blue")
    ax2 = ax1.twinx()
    ax2.plot(steps, [r["group_sparsity"] for r in log], color="tab:red", lw=1.5, label="group sparsity")
    ax2.set_ylabel("committed / candidate groups", color="tab:red")
    sched = report.get("schedule", {})
    for b in sched.get("period_boundaries", []):
        ax1.axvline(b, color="0.85", lw=0.8, zorder=0)
    ax1.set_title("LHSPG: cross-entropy, KL and sparsity (grey: period boundaries)")
    kept = report.get("kept_per_layer", {})
    labels = {"attention_head": "query-head slots", "kv_group": "KV groups", "mlp_channel": "MLP channels",
              "hidden_channel": "hidden channels"}
    for kind, layers in kept.items():
        xs = sorted(int(k) for k in layers)
        if not xs:
            continue
        ys = [layers[str(x)]["kept"] / layers[str(x)]["total"] if str(x) in layers else
              layers[x]["kept"] / layers[x]["total"] for x in xs]
        ax3.plot(xs, ys, marker="o", ms=3, label=labels.get(kind, kind))
    ax3.set_ylim(0, 1.05)
    ax3.set_xlabel("layer")
    ax3.set_ylabel("kept fraction of width")
    ratio = report.get("params", {}).get("ratio_removed")
    ax3.set_title("kept width per layer" + (f" (removed {100 * ratio:.2f}% of params)" if ratio is not None else ""))
    ax3.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
