"""The quality benchmark: lorashear against the peer at equal training tokens, row by row, cached.

Every row is a pruned model of the reference model made with the same training data in the same
order (``builtin:calibration`` packed ``--seq-len`` tokens, seed = the row's seed), ``--steps``
optimizer steps of ``--batch-size`` sequences (equal tokens for every trained row), LoRA r=8 /
alpha 16 / dropout 0.05 on the family's projections, AdamW lr 2e-4. Rows:

- ``dense``: the unpruned model;
- ``peer``: Torch-Pruning 1.6.1, LLM-Pruner-style Taylor importance from 8 calibration sequences,
  uniform in layers 4..27 (``benchmarks/peers/torch_pruning_llm.py``), no training;
- ``peer_lora``: ``peer`` then LoRA fine-tuning for the whole budget (cross-entropy);
- ``peer_lora_kd``: the same with the distillation we use (``--distill-weight`` of KL to the dense model);
- ``paper``: ``lorashear prune --recipe paper`` (+ the magnitude-proxy knowledge analysis ``--knowledge``);
- ``lorashear``: ``lorashear prune --recipe lorashear`` (+ the fisher-proxy knowledge analysis);
- ``lorashear_v3``: the ``lorashear`` recipe before 2026-12-02 evening (the same share of every unprotected
  layer: ``allocation=layer``, ``uniform_per_layer``);
- ``lorashear_v2``: the recipe before that (also magnitude-proxy analysis, KL share 0.5 throughout);
- ``lorashear-X`` / ``lorashear_v3-X``: that recipe with component X reverted to the paper's (ablations, see
  ``ABLATIONS``; the allocation ablation only exists for ``lorashear_v3``: the recipe's allocation is the paper's);
- ``paper_mask_lora`` / ``lorashear_mask_lora``: that row's final mask applied one-shot to the dense
  model, then LoRA fine-tuning for the whole budget (diagnostic: is it the mask or the schedule?);
  ``..._mask_lora_kd`` the same with the peer's distillation; ``..._mask``: the mask with no training
  (needs the row it takes the mask from, at the same ``--steps`` and ``--tag``).

Each finished row is saved as JSON under ``--work`` (``ROW_r20_s0_400.json``) and reused; the
report (``--out``.md/.json) is rebuilt from whatever rows exist, so a matrix can be finished over
several sessions. Held-out perplexity: sliding windows of ``--ppl-seq-len`` tokens, ``--ppl-windows``
windows, on ``builtin:heldout`` (Austen + Wikipedia held-out documents) and ``builtin:heldout-docs``
(Python documentation: no training corpus contains it).

    python benchmarks/quality.py --rows peer_lora,lorashear --ratios 0.2 --seeds 0 --steps 400
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

logger = logging.getLogger("benchmarks.quality")

MODEL = "smollm2-135m-instruct"
EVAL_SOURCES = ("builtin:heldout", "builtin:heldout-docs")
#: the knowledge analyses of the reference model: the paper's magnitude proxy, and the fisher proxy of our recipe
KNOWLEDGE = HERE / "results" / "knowledge_smollm2.json"
KNOWLEDGE_FISHER = HERE / "results" / "knowledge_smollm2_fisher.json"

#: lorashear rows: PruneConfig options (flat names) on top of a recipe
LORASHEAR_ROWS: dict[str, dict[str, Any]] = {
    "paper": {"recipe": "paper", "knowledge": str(KNOWLEDGE)},
    "paper_noknowledge": {"recipe": "paper"},
    "lorashear": {"recipe": "lorashear", "knowledge": str(KNOWLEDGE_FISHER)},
}
#: the allocation of the recipe until 2026-12-02 evening: the same share of every unprotected layer
_UNIFORM_ALLOCATION = {"allocation": "layer", "uniform_per_layer": True}
LORASHEAR_ROWS["lorashear_v3"] = {**LORASHEAR_ROWS["lorashear"], **_UNIFORM_ALLOCATION}
# the recipe before that: also the magnitude-proxy knowledge analysis and the same KL share throughout
LORASHEAR_ROWS["lorashear_v2"] = {**LORASHEAR_ROWS["lorashear_v3"], "knowledge": str(KNOWLEDGE),
                                  "distill_after_pruning": 0.5}
#: one ablation per component of the new recipe: the component reverted to the paper's setting
ABLATIONS: dict[str, dict[str, Any]] = {
    "saliency": {"saliency": ["magnitude", "avg_magnitude", "cosine", "taylor_first", "taylor_second"]},
    # uniform_per_layer fixes every layer's count, so the allocation rule only matters without it
    "allocation": {"allocation": "global", "uniform_per_layer": False},
    "schedule": {"quota": "even", "prune_end": 0.7, "merge_at_period_end": True},
    "distill": {"distill_weight": 0.0},
    "knowledge": {"knowledge": None},
    "knowledge_proxy": {"knowledge": str(KNOWLEDGE)},
}
for _base in ("lorashear", "lorashear_v3"):
    for _name, _opts in ABLATIONS.items():
        if _base == "lorashear" and _name == "allocation":
            continue  # the recipe's allocation is the paper's: nothing to revert
        LORASHEAR_ROWS[f"{_base}-{_name}"] = {**LORASHEAR_ROWS[_base], **_opts}
#: diagnostics: a row's final mask applied one-shot to the dense model -> (that row, training after it)
MASK_ROWS: dict[str, tuple[str, str | None]] = {
    f"{base}_mask{suffix}": (base, training)
    for base in ("paper", "lorashear")
    for suffix, training in (("", None), ("_lora", "lora"), ("_lora_kd", "lora_kd"))
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="dense,peer,peer_lora,peer_lora_kd,paper,lorashear")
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--distill-weight", type=float, default=0.5, help="KD weight of the peer_lora_kd row")
    p.add_argument("--ppl-seq-len", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[], metavar="OPTION=VALUE",
                   help="extra prune option for every lorashear row (YAML value), e.g. --set num_periods=5")
    p.add_argument("--tag", default="", help="suffix of the cached row names (with --set)")
    p.add_argument("--work", default=str(HERE / "results" / "quality" / "rows"), help="cached rows (JSON)")
    p.add_argument("--models", default=None, help="where pruned models go (default: $LORASHEAR_CACHE/quality)")
    p.add_argument("--out", default=str(HERE / "results" / "quality_smollm2"), help="report path without suffix")
    p.add_argument("--report-only", action="store_true")
    return p.parse_args(argv)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        from lorashear.paths import cache_root

        self.args = args
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.models = Path(args.models) if args.models else cache_root() / "quality"
        self.models.mkdir(parents=True, exist_ok=True)
        self._tok = None
        self._streams: dict[str, Any] = {}
        self.extra = {}
        import yaml

        for item in args.set:
            key, _, value = item.partition("=")
            self.extra[key.strip()] = yaml.safe_load(value)

    @property
    def tokenizer(self):
        if self._tok is None:
            import lorashear

            self._tok = lorashear.load_tokenizer(MODEL)
        return self._tok

    def key(self, row: str, ratio: float | None, seed: int) -> str:
        if row == "dense":
            return "dense"
        steps = "" if row == "peer" else f"_{self.args.steps}"
        tag = f"_{self.args.tag}" if self.args.tag and row not in ("dense", "peer", "peer_lora", "peer_lora_kd") \
            else ""
        return f"{row}_r{round(100 * ratio)}_s{seed}{steps}{tag}"

    def row_file(self, key: str) -> Path:
        return self.work / f"{key}.json"

    # -- evaluation ------------------------------------------------------------------------------
    def stream(self, source: str):
        if source not in self._streams:
            from lorashear.evaluation.perplexity import load_eval_texts, token_stream

            a = self.args
            self._streams[source] = token_stream(load_eval_texts(source), self.tokenizer,
                                                 max_tokens=a.ppl_seq_len * a.ppl_windows)
        return self._streams[source]

    def evaluate(self, model) -> dict[str, float]:
        from lorashear.evaluation.perplexity import perplexity

        a = self.args
        out = {}
        for source in EVAL_SOURCES:
            out[source] = perplexity(model, self.stream(source), seq_len=a.ppl_seq_len, max_windows=a.ppl_windows,
                                     source=source).perplexity
        return out

    # -- rows --------------------------------------------------------------------------------------
    def train_ids(self, seed: int):
        from lorashear.data import load_texts, pack_texts

        return pack_texts(load_texts("builtin:calibration"), self.tokenizer, self.args.seq_len, seed=seed)

    def finetune(self, model, seed: int, distill: float):
        from lorashear.config import config_from_dict
        from lorashear.recovery import FinetuneConfig, finetune
        from lorashear.training.losses import DistillConfig, distillation_loss, lm_loss, make_teacher

        a = self.args
        cfg = config_from_dict(FinetuneConfig, {"steps": a.steps, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                                "seed": seed, "progress": False, "log_every": 10})
        loss = lm_loss
        if distill > 0:
            import lorashear

            loss = distillation_loss(make_teacher(lorashear.load_model(MODEL)), DistillConfig(weight=distill))
        return finetune(model, self.tokenizer, self.train_ids(seed), cfg, loss_fn=loss)

    def peer(self, ratio: float, seed: int):
        import lorashear
        from torch_pruning_llm import TorchPruningConfig, calibration_ids, prune_with_torch_pruning

        cfg = TorchPruningConfig(ratio=ratio, seed=seed, verify=False)
        model = lorashear.load_model(MODEL)
        model, report = prune_with_torch_pruning(model, calibration_ids(self.tokenizer, cfg), cfg)
        return model, report

    def lorashear_row(self, row: str, ratio: float, seed: int) -> dict[str, Any]:
        import lorashear
        from lorashear.config import config_from_dict
        from lorashear.stages import prune
        from lorashear.stages.prune import PruneConfig

        a = self.args
        out = self.models / self.key(row, ratio, seed)
        values = {"model": MODEL, "out": str(out), "ratio": ratio, "steps": a.steps, "batch_size": a.batch_size,
                  "seq_len": a.seq_len, "seed": seed, "progress": False, "log_every": 10,
                  **LORASHEAR_ROWS[row], **self.extra}
        values = {k: v for k, v in values.items() if v is not None}
        config = config_from_dict(PruneConfig, values)
        t0 = time.perf_counter()
        result = prune.run(config)
        wall = time.perf_counter() - t0
        model = lorashear.load_pretrained(out)
        rep = result.report
        return {"params": result.params_after, "ratio_removed": result.ratio_removed, "train_s": wall,
                "tokens": result.tokens_seen, "options": values, "selected_ids": rep["groups"]["selected_ids"],
                "loss_last": statistics.mean(r["loss"] for r in rep["log"][-3:]),
                "kept_per_layer": rep["kept_per_layer"], "ppl": self.evaluate(model)}

    def run_row(self, row: str, ratio: float, seed: int) -> dict[str, Any]:
        import lorashear
        from lorashear.models.params import count_params

        a = self.args
        t0 = time.perf_counter()
        if row == "dense":
            model = lorashear.load_model(MODEL)
            rec = {"params": count_params(model), "ppl": self.evaluate(model)}
        elif row in ("peer", "peer_lora", "peer_lora_kd"):
            model, report = self.peer(ratio, seed)
            rec = {"params": count_params(model), "peer_prune_s": report.get("wall_time_s")}
            if row == "peer":
                rec["ppl"] = self.evaluate(model)
            else:
                distill = a.distill_weight if row == "peer_lora_kd" else 0.0
                res = self.finetune(model, seed, distill)
                rec.update(train_s=res.wall_time_s, tokens=res.tokens_seen, distill_weight=distill,
                           loss_last=statistics.mean(res.losses[-3:]), ppl=self.evaluate(res.model))
        elif row in MASK_ROWS:
            base, training = MASK_ROWS[row]
            src = self.row_file(self.key(base, ratio, seed))
            if not src.is_file():
                raise SystemExit(f"{row} needs the {base} row first ({src})")
            ids = set(json.loads(src.read_text())["selected_ids"])
            from lorashear.compaction import compact
            from lorashear.graph.discover import discover

            model = lorashear.load_model(MODEL)
            graph = discover(model)
            drop = [g for g in graph.groups if g.id in ids]
            model = compact(model, drop)
            rec = {"params": count_params(model), "mask_groups": len(drop), "mask_of": src.name}
            if training is None:
                rec["ppl"] = self.evaluate(model)
            else:
                distill = a.distill_weight if training == "lora_kd" else 0.0
                res = self.finetune(model, seed, distill)
                rec.update(train_s=res.wall_time_s, tokens=res.tokens_seen, distill_weight=distill,
                           loss_last=statistics.mean(res.losses[-3:]), ppl=self.evaluate(res.model))
        elif row in LORASHEAR_ROWS:
            rec = self.lorashear_row(row, ratio, seed)
        else:
            raise SystemExit(f"unknown row {row!r}")
        rec.update(row=row, ratio=ratio, seed=seed, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
                   wall_s=time.perf_counter() - t0, extra=self.extra, machine=machine(),
                   threads=a.threads, command=shlex.join([Path(sys.executable).name, *sys.argv]))
        return rec


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}"


def fmt(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}"


def write_report(work: Path, out: Path) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(work.glob("*.json"))]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["row"], r.get("ratio"), r.get("steps") if r["row"] not in ("dense", "peer") else None,
               json.dumps(r.get("extra", {}), sort_keys=True))
        groups.setdefault(key, []).append(r)
    lines = ["| row | ratio | steps | extra | seeds | params | " + " | ".join(f"ppl {s}" for s in EVAL_SOURCES) + " |",
             "|---|---|---|---|---|---|" + "---|" * len(EVAL_SOURCES)]
    summary = []
    for (row, ratio, steps, extra), items in sorted(groups.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2] or 0,
                                                                                     kv[0][0], kv[0][3])):
        cells = []
        entry = {"row": row, "ratio": ratio, "steps": steps, "extra": json.loads(extra),
                 "seeds": sorted(i["seed"] for i in items), "params": items[0]["params"], "ppl": {}}
        for s in EVAL_SOURCES:
            by_seed = {i["seed"]: i["ppl"][s] for i in items if s in i.get("ppl", {})}
            vals = list(by_seed.values())
            mean = statistics.mean(vals) if vals else None
            spread = (max(vals) - min(vals)) / 2 if len(vals) > 1 else None
            entry["ppl"][s] = {"mean": mean, "values": vals, "half_range": spread, "by_seed": by_seed}
            cells.append(fmt(mean) + (f" ± {spread:.2f}" if spread is not None else ""))
        summary.append(entry)
        ratio_s = "—" if ratio is None or row == "dense" else f"{ratio:.0%}"
        lines.append(f"| {row} | {ratio_s} | {steps or '—'} | {extra if extra != '{}' else ''} | "
                     f"{','.join(map(str, entry['seeds']))} | {entry['params']:,} | " + " | ".join(cells) + " |")
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    table = "\n".join(lines) + "\n" + margin_table(summary)
    replace_table(out.with_suffix(".md"), table, "# Quality benchmark")
    print(table)


def margin_table(summary: list[dict], ours: str = "lorashear",
                 peers: tuple[str, ...] = ("peer_lora", "peer_lora_kd")) -> str:
    """How far ``ours`` is below each peer at every ratio and step count both ran (rows without extras).

    The margin is the difference of the means; it is set against the two rows' half-ranges added (the seed
    spread), and the paired differences (peer - ours) are listed for the seeds both rows ran.
    """
    plain = {(e["row"], e["ratio"], e["steps"]): e for e in summary if not e["extra"]}
    lines = []
    for (row, ratio, steps), mine in sorted(plain.items(), key=lambda kv: (kv[0][1] or 0, kv[0][2] or 0)):
        if row != ours:
            continue
        for peer in peers:
            other = plain.get((peer, ratio, steps))
            if other is None:
                continue
            for s in EVAL_SOURCES:
                a, b = mine["ppl"][s], other["ppl"][s]
                if a["mean"] is None or b["mean"] is None:
                    continue
                margin = b["mean"] - a["mean"]
                spread = (a["half_range"] or 0.0) + (b["half_range"] or 0.0)
                times = f"{margin / spread:.1f}x" if spread > 0 else "—"
                paired = [f"{seed}: {b['by_seed'][seed] - v:+.2f}" for seed, v in sorted(a["by_seed"].items())
                          if seed in b["by_seed"]]
                lines.append(f"| {ratio:.0%} | {steps} | {peer} | {s} | {','.join(map(str, sorted(a['by_seed'])))} "
                             f"/ {','.join(map(str, sorted(b['by_seed'])))} | {margin:+.2f} | {spread:.2f} | {times} "
                             f"| {'; '.join(paired)} |")
    if not lines:
        return ""
    head = [f"\nMargins of `{ours}` (peer mean - ours; positive: ours is lower; spread: the two half-ranges added; "
            "paired: peer - ours in each seed both ran):\n",
            "| ratio | steps | peer | source | seeds (ours / peer) | margin | spread | margin / spread | paired |",
            "|---|---|---|---|---|---:|---:|---:|---|"]
    return "\n".join(head + lines) + "\n"


def replace_table(md: Path, table: str, title: str) -> None:
    """Write ``table`` below the ``<!-- table -->`` marker of ``md``, keeping the hand-written text above it."""
    head = md.read_text().split("<!-- table -->")[0] if md.is_file() else title + "\n\n"
    md.write_text(head.rstrip() + "\n\n<!-- table -->\n" + table)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    os.environ.setdefault("LORASHEAR_DISABLE_PROGRESS", "1")
    import torch

    torch.set_num_threads(args.threads)
    bench = Bench(args)
    if not args.report_only:
        for row in [r.strip() for r in args.rows.split(",") if r.strip()]:
            for ratio in [float(x) for x in args.ratios.split(",")]:
                for seed in [int(x) for x in args.seeds.split(",")]:
                    key = bench.key(row, ratio, seed)
                    if bench.row_file(key).is_file():
                        logger.info("%s: cached", key)
                        continue
                    logger.info("%s: running", key)
                    rec = bench.run_row(row, ratio, seed)
                    bench.row_file(key).write_text(json.dumps(rec, indent=1) + "\n")
                    logger.info("%s: %s", key, rec["ppl"])
                    if row == "dense":
                        break
                if row == "dense":
                    break
    write_report(Path(args.work), Path(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
