"""``recover.png``: each source's degradation and sampling weight, round by round."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def plot_recover(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Top: ``Delta_s`` of every source before the first round and after each round; bottom: the
    weight each source was sampled with in each round. Grey lines separate the stages."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report.get("rounds", [])
    stages = report.get("stages", [])
    fig, (ax_d, ax_w) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = [s for st in stages for s in st["sources"]]
    colour = {name: colours[i % len(colours)] for i, name in enumerate(names)}
    start = 0  # global round index before each stage's first round
    for st in stages:
        mine = [r for r in rounds if r["stage"] == st["stage"]]
        style = "-" if st["stage"] == 1 else "--"
        for name in st["sources"]:
            xs = [start] + [r["round"] for r in mine]
            ys = [st["initial_delta"][name]] + [r["sources"][name]["delta_after"] for r in mine]
            ax_d.plot(xs, ys, style, marker="o", ms=4, color=colour[name], label=f"{name} (stage {st['stage']})")
            if mine:
                ax_w.plot([r["round"] for r in mine], [r["sources"][name]["weight"] for r in mine], style,
                          marker="s", ms=4, color=colour[name])
        if start:
            for ax in (ax_d, ax_w):
                ax.axvline(start, color="0.8", lw=0.8, zorder=0)
        start += len(mine)
    ax_d.set_ylabel("degradation Delta_s (nats/token)")
    ax_d.set_title("dynamic knowledge recovery: degradation vs the dense model (round 0: before training)")
    ax_d.legend(fontsize=7, loc="best")
    ax_w.set_ylabel("sampling weight w_s")
    ax_w.set_xlabel("round (weights: the round's mix; degradation: after the round)")
    ax_w.set_ylim(0, 1.02)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
