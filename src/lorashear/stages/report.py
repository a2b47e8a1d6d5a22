"""The run report: one ``report.md`` at the top of a ``lorashear run`` directory.

It is assembled from what the stages wrote (``config.yaml``, ``records/``, ``knowledge/knowledge.json``,
``pruned/prune_report.json``, ``recovered/recover_report.json``, ``eval/eval.json``,
``export/*.json``) and links their plots, so it can be rebuilt at any time from a finished
or partly finished run::

    write_run_report("runs/lorashear")

Sections: the before/after table (parameters, size on disk, perplexity, zero-shot accuracy per
task, speed), the settings that define the run, where the knowledge sits (heatmap and the
protected blocks), the pruning curves and the kept width of every layer, the recovery rounds
(sampling weights and degradation per source), the exported files, and how to load and serve
the model. A stage that did not run is said to be missing, never invented.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from .layout import REPORT_FILE, RunLayout
from .records import read_record


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return lines + [""]


def _num(value: Any, spec: str = ",.0f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return format(value, spec)


def _mib(n: Any) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f} MiB"


def _ratio(a: Any, b: Any) -> str:
    if a is None or b in (None, 0):
        return "-"
    return f"{a / b:.3f}"


def _within_stderr(dense: dict[str, Any] | None, pruned: dict[str, Any] | None) -> str | None:
    """``"same within s.e."`` when two accuracies differ by no more than their standard errors combined (a ratio
    of two scores on 50 items would otherwise read as a real 1.27x or 0.57x); None otherwise."""
    if not dense or not pruned or dense.get("acc_stderr") is None or pruned.get("acc_stderr") is None:
        return None
    combined = math.hypot(dense["acc_stderr"], pruned["acc_stderr"])
    return "same within s.e." if abs(pruned["acc"] - dense["acc"]) <= combined else None


def _before_after(ev: dict[str, Any], layout: RunLayout) -> list[str]:
    models = {m["role"]: m for m in ev.get("models", [])}
    base, model = models.get("baseline"), models.get("model")
    cols = [m for m in (base, model) if m is not None]
    if not cols:
        return ["No model was evaluated.", ""]
    header = ["", *(("dense" if m["role"] == "baseline" else "pruned") for m in cols)]
    if base and model:
        header.append("pruned / dense")

    def row(label: str, get, spec: str = ",.0f", fmt=None) -> list[str]:
        vals = [get(m) for m in cols]
        shown = [(fmt(v) if fmt else _num(v, spec)) if v is not None else "-" for v in vals]
        out = [label, *shown]
        if base and model:
            out.append(_ratio(vals[-1], vals[0]))
        return out

    def speed(m: dict[str, Any], key: str) -> Any:
        return (m.get("speed") or {}).get(key)

    def batch(m: dict[str, Any], bs: int, key: str) -> Any:
        for b in (m.get("speed") or {}).get("batches", []):
            if b.get("batch_size") == bs:
                return b.get(key)
        return None

    ppl_source = next(((m.get("perplexity") or {}).get("source") for m in cols if m.get("perplexity")), None)
    rows = [
        row("parameters", lambda m: speed(m, "num_parameters")),
        row("checkpoint on disk", lambda m: speed(m, "checkpoint_bytes"), fmt=_mib),
        row(f"perplexity ({ppl_source or 'held-out'})", lambda m: (m.get("perplexity") or {}).get("perplexity"),
            ".2f"),
    ]
    for source in ev.get("config", {}).get("ppl_more_sources", []):
        rows.append(row(f"perplexity ({source})",
                        lambda m, s=source: ((m.get("more_perplexity") or {}).get(s) or {}).get("perplexity"), ".2f"))
    rows.append(row("factual recall (%)", lambda m: 100 * m["recall"]["accuracy"] if m.get("recall") else None,
                    ".1f"))
    tasks: list[str] = []
    for m in cols:
        for t in (m.get("tasks") or {}).get("tasks", []):
            if t["task"] not in tasks:
                tasks.append(t["task"])

    def task_result(m: dict[str, Any], task: str) -> dict[str, Any] | None:
        for t in (m.get("tasks") or {}).get("tasks", []):
            if t["task"] == task and t.get("error") is None and t.get("acc") is not None:
                return t
        return None

    for task in tasks:
        cells = row(f"zero-shot acc, `{task}` (%)",
                    lambda m, task=task: 100 * t["acc"] if (t := task_result(m, task)) else None, ".1f")
        if base and model:
            cells[-1] = _within_stderr(task_result(base, task), task_result(model, task)) or cells[-1]
        rows.append(cells)
    batch_sizes = sorted({b["batch_size"] for m in cols for b in (m.get("speed") or {}).get("batches", [])})
    for bs in batch_sizes:
        rows.append(row(f"decode, batch {bs} (tok/s)", lambda m, bs=bs: batch(m, bs, "decode_tokens_per_s"), ".1f"))
    rows.append(row("peak memory", lambda m: speed(m, "peak_memory_bytes"), fmt=_mib))
    env = ev.get("environment", {})
    note = (f"Measured by the eval stage on {env.get('device', '?')} ({ev.get('config', {}).get('dtype', '?')}); "
            f"zero-shot tasks on at most {ev.get('config', {}).get('limit') or 'all'} documents each. "
            f"Details and standard errors: [{layout.relative(layout.eval_report)}]({layout.relative(layout.eval_report)}).")
    return _table(header, rows) + [note, ""]


def _settings(cfg: dict[str, Any], timings: dict[str, float], prune: dict[str, Any] | None,
              layout: RunLayout) -> list[str]:
    keys = [("model", "model"), ("recipe", "recipe"), ("target ratio", "ratio"), ("stages", "stages"),
            ("training data", "data"), ("sequence length", "seq_len"), ("steps", "steps"),
            ("batch size", "batch_size"), ("learning rate", "lr"), ("LoRA rank / alpha", None),
            ("saliency", "saliency"), ("allocation", "allocation"), ("quota", "quota"),
            ("pruning ends at (fraction of steps)", "prune_end"), ("distillation weight", "distill_weight"),
            ("distillation weight before pruning (warm-up)", "distill_before_pruning"),
            ("distillation weight after pruning", "distill_after_pruning"),
            ("knowledge proxy / gamma", None), ("dtype", "dtype")]
    rows = []
    for label, key in keys:
        if key is None:
            if label.startswith("LoRA"):
                value = f"{cfg.get('lora_r', '?')} / {cfg.get('lora_alpha', '?')}"
            else:
                value = f"{cfg.get('analyze_proxy', '?')} / {cfg.get('analyze_gamma', '?')}"
        else:
            value = cfg.get(key, "-")
        if key in ("distill_after_pruning", "distill_before_pruning") and value is None:
            value = "same as during pruning"
        if isinstance(value, (list, tuple)):
            value = ", ".join(map(str, value))
        rows.append([label, f"`{value}`"])
    if prune:
        params = prune.get("params", {})
        rows.append(["removed", f"{_num(params.get('removed'))} of {_num(params.get('before'))} parameters "
                                f"({100 * params.get('ratio_removed', 0):.2f}%)"])
        rows.append(["training tokens (prune)", _num(prune.get("tokens_seen"))])
    for stage, seconds in timings.items():
        rows.append([f"time: {stage}", f"{seconds / 60:.1f} min"])
    out = ["| setting | value |", "|---|---|"] + ["| " + " | ".join(r) + " |" for r in rows]
    config = layout.relative(layout.config)
    return out + ["", f"Every setting: [{config}]({config}) (`lorashear run --config {config}` re-runs it).", ""]


def _knowledge(know: dict[str, Any] | None, layout: RunLayout) -> list[str]:
    out = ["## Where the knowledge is", ""]
    if know is None:
        return out + [f"The knowledge analysis did not run (no `{layout.relative(layout.knowledge)}`).", ""]
    if layout.knowledge_plot.is_file():
        out += [f"![knowledge distribution]({layout.relative(layout.knowledge_plot)})", ""]
    protected = know.get("unprunable", [])
    out.append(f"Deviation of the loss when each block alone is pruned at ratios {know.get('ratios')} "
               f"({know.get('metric')}, proxy {know.get('config', {}).get('proxy')}); the top "
               f"{100 * float(know.get('gamma', 0)):.0f}% are protected from pruning: "
               + (", ".join(f"`{p}`" for p in protected) if protected else "none") + ".")
    return out + [""]


def _kept_widths(prune: dict[str, Any]) -> list[str]:
    kept = prune.get("kept_per_layer") or {}
    kinds = [k for k in ("attention_head", "kv_group", "mlp_channel") if k in kept]
    if not kinds:
        return []
    # an attention_head group is a query-head slot: one query head of every KV group (9 heads = 3 slots x 3 groups)
    labels = {"attention_head": "query-head slots (per KV group)", "kv_group": "KV groups",
              "mlp_channel": "MLP channels"}
    layers = sorted({int(i) for k in kinds for i in kept[k]})
    rows = []
    for i in layers:
        row = [str(i)]
        for k in kinds:
            c = kept[k].get(str(i))
            row.append("-" if c is None else f"{c['kept']} / {c['total']}")
        rows.append(row)
    return ["Kept width per layer (kept / original). A query-head slot is one query head from every KV group (the "
            "heads that share keys and values keep equal numbers): k slots are k x (KV groups) query heads, e.g. "
            "`2 / 3` with 3 KV groups is 6 of 9.", "", *_table(["layer", *(labels[k] for k in kinds)], rows)]


def _pruning(prune: dict[str, Any] | None, layout: RunLayout) -> list[str]:
    out = ["## Pruning", ""]
    if prune is None:
        return out + [f"The prune stage has not finished (no `{layout.relative(layout.prune_report)}`).", ""]
    if layout.prune_plot.is_file():
        out += [f"![LHSPG loss and sparsity; kept width per layer]({layout.relative(layout.prune_plot)})", ""]
    sched = prune.get("schedule", {})
    out.append(f"LHSPG: {sched.get('warmup_steps')} warm-up steps, {sched.get('num_periods')} pruning periods "
               f"ending at step {sched.get('prune_end')}, {prune.get('steps')} steps in all. The compacted model "
               f"matches the masked one to a max logit difference of "
               f"{_num(prune.get('verify', {}).get('compacted_vs_masked_max_abs_logit_diff'), '.2e')}.")
    return out + ["", *_kept_widths(prune)]


def _recovery(rec: dict[str, Any] | None, layout: RunLayout) -> list[str]:
    out = ["## Recovery", ""]
    if rec is None:
        return out + ["Recovery did not run (add `recover` to `--stages` to run it).", ""]
    if layout.recover_plot.is_file():
        out += [f"![sampling weights and degradation per round]({layout.relative(layout.recover_plot)})", ""]
    rows = []
    for r in rec.get("rounds", []):
        for name, s in r.get("sources", {}).items():
            rows.append([str(r["round"]), f"`{name}`", _num(s.get("weight"), ".3f"), _num(s.get("delta"), ".4f"),
                         _num(s.get("delta_after"), ".4f"), _num(s.get("tokens"))])
    out += _table(["round", "source", "weight", "degradation before", "after", "tokens"], rows)
    out.append(f"{_num(rec.get('tokens_seen'))} tokens in {len(rec.get('rounds', []))} rounds; loss: "
               f"{rec.get('loss', {}).get('kind', '?')}. Degradation = validation loss of the pruned model minus "
               "the dense model's, per source, on held-out sequences never trained on.")
    return out + [""]


def _exports(layout: RunLayout) -> list[str]:
    files = sorted(layout.export.glob("*.gguf")) if layout.export.is_dir() else []
    if not files:
        return []
    rows = []
    for f in files:
        meta = _read_json(f.with_suffix(".json")) or {}
        gguf = meta.get("gguf", {})
        fallbacks = gguf.get("fallbacks") or []
        link = layout.relative(f)
        rows.append([f"[{link}]({link})", f"`{gguf.get('arch', '?')}`", f"`{gguf.get('outtype', '?')}`",
                     _mib(f.stat().st_size), str(len(fallbacks))])
    return ["## Exported files", "", *_table(["file", "architecture", "type", "size", "tensors kept at f16"], rows)]


def _serving(model_dir: str | None, non_uniform: bool) -> list[str]:
    if not model_dir:
        return []
    rel = model_dir  # as the run was given it: relative to where the run was started
    out = ["## Load and serve", "", "In Python:", "", "```python"]
    if non_uniform:
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                "# layers of different widths (per_layer_config): the directory carries its own modelling file",
                f"model = AutoModelForCausalLM.from_pretrained(\"{rel}\", trust_remote_code=True)",
                f"tokenizer = AutoTokenizer.from_pretrained(\"{rel}\")",
                f"# or, with lorashear installed: model = lorashear.load_pretrained(\"{rel}\")"]
    else:
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f"model = AutoModelForCausalLM.from_pretrained(\"{rel}\")   # every layer has the same widths",
                f"tokenizer = AutoTokenizer.from_pretrained(\"{rel}\")"]
    out += ["```", "", "With llama.cpp (one GGUF file; layers of different widths are written as the `deci` "
            "architecture, which llama.cpp builds per layer):", "", "```bash",
            f"lorashear export {rel} --out model-q8_0.gguf --outtype q8_0",
            "llama-cli -m model-q8_0.gguf -p \"Hello\" -n 64",
            "```", "", "or from Python with llama-cpp-python: "
            "`llama_cpp.Llama(model_path=\"model-q8_0.gguf\")(\"Hello\", max_tokens=64)`.", ""]
    if non_uniform:
        out += ["Its layers differ (the knowledge analysis protects some blocks, and the recipe gives layers "
                "different shares), so plain transformers needs `trust_remote_code=True` (lm-eval: "
                "`--model_args pretrained=DIR,trust_remote_code=True`), and vLLM cannot load it. For a model every "
                "engine loads as it is, prune every layer alike: `--uniform-per-layer` without the knowledge "
                "analysis (`--stages prune,eval`).", ""]
    return out


def _settings_of_the_run(layout: RunLayout) -> dict[str, Any]:
    """Every setting as ``config.yaml`` holds it, the prune stage's as its record holds them (the model was
    pruned with those, whatever the last run was given)."""
    cfg = _read_yaml(layout.config)
    record = read_record(layout.record("prune"))
    return {**cfg, **(record.settings if record is not None else {})}


def write_run_report(run_dir: str | Path, *, model_dir: str | None = None,
                     timings: dict[str, float] | None = None) -> Path:
    """Write ``run_dir/report.md`` from the stage outputs found there; return its path."""
    layout = RunLayout(Path(run_dir))
    cfg = _settings_of_the_run(layout)
    know = _read_json(layout.knowledge)
    prune = _read_json(layout.prune_report)
    rec = _read_json(layout.recover_report)
    ev = _read_json(layout.eval_json)
    if timings is None:
        timings = (_read_json(layout.result) or {}).get("seconds", {})
    if model_dir is None:
        model_dir = next((str(d) for d in (layout.recovered, layout.pruned) if (d / "config.json").is_file()), None)
    non_uniform = False
    if model_dir and Path(model_dir, "config.json").is_file():
        non_uniform = bool((_read_json(Path(model_dir, "config.json")) or {}).get("per_layer_config"))
    ratio = (prune or {}).get("params", {}).get("ratio_removed")
    title = f"# lorashear run: `{cfg.get('model', '?')}`" + (f", {100 * ratio:.1f}% of parameters removed"
                                                          if ratio is not None else "")
    out = [title, "", f"Written {_dt.datetime.now().isoformat(timespec='seconds')} from the outputs under "
           f"`{layout.root}`" + (f"; final model: `{model_dir}`." if model_dir else "."), ""]
    out += ["## Before and after", ""]
    out += _before_after(ev, layout) if ev else [f"The eval stage has not run (no `{layout.relative(layout.eval_json)}`).", ""]
    out += ["## Settings", "", *_settings(cfg, timings, prune, layout)]
    out += _knowledge(know, layout)
    out += _pruning(prune, layout)
    out += _recovery(rec, layout)
    out += _exports(layout)
    out += _serving(model_dir, non_uniform)
    atomic_write_text(layout.report, "\n".join(out))
    return layout.report


__all__ = ["REPORT_FILE", "write_run_report"]
