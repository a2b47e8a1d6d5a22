"""``knowledge.png``: deviation by layer (x) and block (attention / MLP rows)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .result import KnowledgeResult, ratio_key

_METRIC_LABEL = {
    "relative_ppl": "|ppl_pruned - ppl_full| / ppl_full",
    "loss_increase": "|loss_pruned - loss_full| (nats/token)",
}
_BLOCK_LABEL = {"attention": "attention", "mlp": "MLP"}


def plot_knowledge(result: KnowledgeResult, path: str | os.PathLike[str]) -> Path:
    """Heatmap of the mean deviation per node group, unprunable cells outlined, and below it
    the deviation per ratio along the layers (log scale). Returns the written path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    path = Path(path)
    if path.suffix != ".png":
        path = path / "knowledge.png"
    path.parent.mkdir(parents=True, exist_ok=True)

    layers, scores = result.matrix()
    blocks = [b for b in ("attention", "mlp") if b in scores]
    grid = np.array([scores[b] for b in blocks], dtype=float)  # (blocks, layers)
    finite = grid[np.isfinite(grid)]
    positive = finite[finite > 0]
    shown = np.where(np.isinf(grid), positive.max() if positive.size else 1.0, grid)
    if positive.size and positive.max() / positive.min() > 20:
        norm = LogNorm(vmin=positive.min(), vmax=positive.max())
        shown = np.where(shown > 0, shown, positive.min())
    else:
        norm = Normalize(vmin=0.0, vmax=float(finite.max()) if finite.size and finite.max() > 0 else 1.0)

    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(max(8.0, 0.38 * len(layers) + 3), 6.4),
                                  gridspec_kw={"height_ratios": [1.0, 1.5]}, constrained_layout=True)
    im = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="magma_r", norm=norm,
                   interpolation="nearest")
    ax.set_yticks(range(len(blocks)), [_BLOCK_LABEL[b] for b in blocks])
    step = 1 if len(layers) <= 32 else max(1, len(layers) // 16)
    ax.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("layer")
    pos = {layer: i for i, layer in enumerate(layers)}
    for n in result.node_groups:
        if n.unprunable:
            ax.add_patch(Rectangle((pos[n.layer] - 0.5, blocks.index(n.block) - 0.5), 1, 1,
                                   fill=False, edgecolor="#1f9e89", linewidth=2.5))
    cbar = fig.colorbar(im, ax=ax, pad=0.01)
    cbar.set_label("mean deviation", fontsize=8)
    ratios = ", ".join(f"{r:g}" for r in result.ratios)
    ax.set_title(f"Knowledge distribution: mean deviation over p in {{{ratios}}}; "
                 f"outlined = unprunable (top gamma={result.gamma:g}, "
                 f"{len(result.unprunable_node_groups())}/{len(result.node_groups)})", fontsize=10)

    styles = {"attention": "-", "mlp": "--"}
    for block in blocks:
        nodes = sorted((n for n in result.node_groups if n.block == block), key=lambda n: n.layer)
        for r in result.ratios:
            key = ratio_key(r)
            ys = [n.deviation.get(key, math.nan) for n in nodes]
            ax2.plot([n.layer for n in nodes], ys, styles[block], marker="o", markersize=3,
                     label=f"{_BLOCK_LABEL[block]}, p={r:g}")
    if positive.size:
        ax2.set_yscale("log")
    ax2.set_xlim(layers[0] - 0.5, layers[-1] + 0.5)
    ax2.set_xlabel("layer")
    ax2.set_ylabel(_METRIC_LABEL.get(result.metric, result.metric), fontsize=8)
    ax2.grid(True, which="major", alpha=0.3)
    ax2.legend(fontsize=8, ncol=2)
    model = result.model.get("name") or result.model.get("model_type") or "model"
    data = result.data
    ax2.set_title(f"{model}: full ppl {result.full_perplexity:.2f} on {data.get('spec', 'eval set')} "
                  f"({data.get('num_sequences')} x {data.get('seq_len')} tokens)", fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
