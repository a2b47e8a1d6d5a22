"""One-shot screening of the peers' settings on the VALIDATION split (no retraining).

Every variant prunes the reference model at each ratio and is scored by perplexity on
``builtin:heldout-validation`` and ``builtin:heldout-docs-validation`` (never a ``-test`` alias):
``lorashear.evaluation.perplexity.perplexity`` over the whole token stream of each split
(``load_eval_texts`` + ``token_stream``), ``--windows`` windows of ``--seq-len`` tokens.

Calibration is computed once per kind and reused by every variant and ratio (the prune functions
take precomputed statistics): one forward pass with both FLAP's moments and Minitron's activation
importance hooked, and one per-sample forward+backward pass for LLM-Pruner (gradient and Fisher
diagonal, from which every ``importance`` variant follows). Statistics and finished rows are cached
under ``--work`` so an interrupted screening resumes.

    OMP_NUM_THREADS=1 python benchmarks/peers/screen_oneshot.py --out benchmarks/results/peers_oneshot_smollm2.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import flap  # noqa: E402
import llm_pruner  # noqa: E402
import minitron  # noqa: E402
from _common import calibration_ids, count_params, decoder_layers  # noqa: E402
from lorashear.errors import ConfigError  # noqa: E402

logger = logging.getLogger("benchmarks.peers.screen")

MODEL = "smollm2-135m-instruct"
SOURCES = ("builtin:heldout-validation", "builtin:heldout-docs-validation")

#: every variant's base settings (the screening's starting point; a variant's options override them), so
#: that the rows do not depend on the modules' defaults, which were set to the winners afterwards
BASE: dict[str, dict[str, Any]] = {
    "llm_pruner": {"importance": "param_first", "ranking": "global", "head_reduce": "sum", "normalizer": "none",
                   "attention_share": None, "kinds": ("attention_head", "mlp_channel"), "align_heads": True,
                   "layer_start": 4, "layer_end": -2},
    "minitron": {"allocation": "global", "attention_share": None, "seq_agg": "mean", "batch_agg": "l2",
                 "align_heads": True, "layer_start": 0, "layer_end": 0},
    "flap": {"metric": "WIFV", "structure": "AL-AM", "attention_score": "official", "bias": True,
             "kinds": ("attention_head", "mlp_channel"), "align_heads": True, "layer_start": 0, "layer_end": 0},
}
#: variant -> (peer, options over BASE). LLM-Pruner variants all use 64 calibration sequences.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llmp-block": ("llm_pruner", {"ranking": "block"}),
    "llmp-global": ("llm_pruner", {"ranking": "global"}),
    "llmp-global-all": ("llm_pruner", {"ranking": "global", "layer_start": 0, "layer_end": 0}),
    "llmp-kind": ("llm_pruner", {"ranking": "kind"}),
    "llmp-kind-mean": ("llm_pruner", {"ranking": "kind", "normalizer": "mean", "head_reduce": "mean"}),
    "llmp-global-mix": ("llm_pruner", {"ranking": "global", "importance": "param_mix"}),
    "llmp-global-mix-all": ("llm_pruner", {"ranking": "global", "importance": "param_mix", "layer_start": 0,
                                           "layer_end": 0}),
    "llmp-kind-mean-all": ("llm_pruner", {"ranking": "kind", "normalizer": "mean", "head_reduce": "mean",
                                          "layer_start": 0, "layer_end": 0}),
    "llmp-kind-mean-mix": ("llm_pruner", {"ranking": "kind", "normalizer": "mean", "head_reduce": "mean",
                                          "importance": "param_mix"}),
    "llmp-global-mean": ("llm_pruner", {"ranking": "global", "normalizer": "mean"}),
    "llmp-kind-mean-mlp": ("llm_pruner", {"ranking": "kind", "normalizer": "mean", "head_reduce": "mean",
                                          "attention_share": 0.0}),
    "llmp-block-mlp": ("llm_pruner", {"ranking": "block", "attention_share": 0.0}),
    "llmp-block-all": ("llm_pruner", {"ranking": "block", "layer_start": 0, "layer_end": 0}),
    "minitron-global": ("minitron", {}),
    "minitron-uniform": ("minitron", {"allocation": "uniform"}),
    "minitron-global-mlp": ("minitron", {"attention_share": 0.0}),
    "minitron-uniform-mlp": ("minitron", {"allocation": "uniform", "attention_share": 0.0}),
    "minitron-uniform-share10": ("minitron", {"allocation": "uniform", "attention_share": 0.1}),
    "flap": ("flap", {}),
    "flap-head-sum": ("flap", {"attention_score": "head_sum"}),
    "flap-nobias": ("flap", {"bias": False}),
    "flap-ulum": ("flap", {"structure": "UL-UM"}),
    "flap-kv": ("flap", {"kinds": ("attention_head", "kv_group", "mlp_channel")}),
}
CONFIGS = {"llm_pruner": llm_pruner.LLMPrunerConfig, "minitron": minitron.MinitronConfig, "flap": flap.FlapConfig}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--ratios", default="0.2,0.5")
    p.add_argument("--windows", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--forward-calib", type=int, default=1024, help="calibration sequences of the forward pass "
                                                                    "(FLAP, Minitron)")
    p.add_argument("--grad-calib", type=int, default=64, help="calibration sequences of LLM-Pruner's gradients")
    p.add_argument("--calib-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default=None, help="cache of statistics and rows (default: $LORASHEAR_CACHE/peers_screen)")
    p.add_argument("--out", default=None, help="markdown report (default: print only)")
    p.add_argument("--smoke", action="store_true", help="tiny calibration and 2 windows (a wiring check)")
    return p.parse_args(argv)


def _to_plain(value: Any) -> Any:
    """FLAP's moment objects as plain dicts of tensors (``weights_only`` loading accepts nothing else)."""
    if isinstance(value, flap.ChannelMoments):
        return {"__moments__": True, "n": value.n, "sum": value.sum, "sumsq": value.sumsq}
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _from_plain(value: Any) -> Any:
    if isinstance(value, dict) and value.get("__moments__"):
        moments = flap.ChannelMoments(value["sum"].numel())
        moments.n, moments.sum, moments.sumsq = value["n"], value["sum"], value["sumsq"]
        return moments
    if isinstance(value, dict):
        return {k: _from_plain(v) for k, v in value.items()}
    return value


class Screen:
    def __init__(self, args: argparse.Namespace) -> None:
        import lorashear
        from lorashear.paths import cache_root

        self.args = args
        self.tag = "smoke" if args.smoke else f"f{args.forward_calib}_g{args.grad_calib}_l{args.calib_len}"
        self.work = Path(args.work) if args.work else cache_root() / "peers_screen"
        (self.work / "rows").mkdir(parents=True, exist_ok=True)
        self.tokenizer = lorashear.load_tokenizer(MODEL)
        self._streams: dict[str, torch.Tensor] = {}
        self._done: list[dict[str, Any]] = []

    # -- evaluation ------------------------------------------------------------------------------
    def stream(self, source: str) -> torch.Tensor:
        if source not in self._streams:
            from lorashear.evaluation.perplexity import load_eval_texts, token_stream

            self._streams[source] = token_stream(load_eval_texts(source), self.tokenizer)
        return self._streams[source]

    def evaluate(self, model) -> dict[str, Any]:
        from lorashear.evaluation.perplexity import perplexity

        out = {}
        windows = 2 if self.args.smoke else self.args.windows
        for source in SOURCES:
            r = perplexity(model, self.stream(source), seq_len=self.args.seq_len, max_windows=windows, source=source)
            out[source] = {"ppl": r.perplexity, "ci": [getattr(r, "ci_low", None), getattr(r, "ci_high", None)],
                           "protocol": r.protocol}
        return out

    # -- calibration -----------------------------------------------------------------------------
    def _cached(self, name: str, make):
        path = self.work / f"{name}_{self.tag}.pt"
        if path.is_file():  # tensors and plain containers only: no pickled object is ever loaded
            return _from_plain(torch.load(path, weights_only=True))
        t0 = time.perf_counter()
        value = make()
        value["seconds"] = time.perf_counter() - t0
        torch.save(_to_plain(value), path)
        return value

    def forward_stats(self) -> dict[str, Any]:
        def make():
            import lorashear

            a = self.args
            n = 4 if a.smoke else a.forward_calib
            ids = calibration_ids(self.tokenizer, "builtin:calibration", a.calib_len, n, 0)
            model = lorashear.load_model(MODEL)
            moments: dict[int, dict[str, flap.ChannelMoments]] = {}
            acts: dict[int, dict[str, minitron.ActivationImportance]] = {}
            handles = []
            for i, layer in enumerate(decoder_layers(model)):
                moments[i], acts[i] = {}, {}
                for name, mod in (("o_proj", layer.self_attn.o_proj), ("down_proj", layer.mlp.down_proj)):
                    moments[i][name] = flap.ChannelMoments(mod.in_features)
                    acts[i][name] = minitron.ActivationImportance(mod.in_features)

                    def hook(_m, inp, _o, mo=moments[i][name], ac=acts[i][name]):
                        mo.add(inp[0])
                        ac.add(inp[0])

                    handles.append(mod.register_forward_hook(hook))
            model.eval()
            with torch.no_grad():
                for k, batch in enumerate(ids.split(16)):
                    model(input_ids=batch, use_cache=False)
                    logger.info("forward calibration: %d/%d sequences", min((k + 1) * 16, len(ids)), len(ids))
            for h in handles:
                h.remove()
            return {"ids_shape": list(ids.shape), "ids": ids, "flap": moments,
                    "minitron": {i: {k: v.value for k, v in d.items()} for i, d in acts.items()}}

        return self._cached("forward", make)

    def grad_stats(self) -> dict[str, Any]:
        def make():
            import lorashear

            a = self.args
            n = 2 if a.smoke else a.grad_calib
            ids = calibration_ids(self.tokenizer, "builtin:calibration", a.calib_len, n, 0)
            model = lorashear.load_model(MODEL)
            return {"ids_shape": list(ids.shape), "ids": ids,
                    "stats": llm_pruner.importance_statistics_all(model, ids)}

        return self._cached("gradients", make)

    # -- rows ------------------------------------------------------------------------------------
    def row(self, variant: str, ratio: float) -> dict[str, Any]:
        path = self.work / "rows" / f"{variant}_r{round(100 * ratio)}_{self.tag}.json"
        if path.is_file():
            rec = json.loads(path.read_text())
            self._done.append(rec)
            return rec
        import lorashear

        peer, opts = VARIANTS[variant]
        a = self.args
        t0 = time.perf_counter()
        model = lorashear.load_model(MODEL)
        try:
            if peer == "llm_pruner":
                g = self.grad_stats()
                cfg = llm_pruner.LLMPrunerConfig(ratio=ratio, calib_sequences=g["ids_shape"][0],
                                                 seq_len=a.calib_len, **{**BASE[peer], **opts})
                model, report = llm_pruner.prune_llm_pruner(model, g["ids"], cfg, stats=g["stats"][cfg.importance])
            else:
                f = self.forward_stats()
                cfg = CONFIGS[peer](ratio=ratio, calib_sequences=f["ids_shape"][0], seq_len=a.calib_len,
                                    **{**BASE[peer], **opts})
                if peer == "flap":
                    model, report = flap.prune_flap(model, f["ids"], cfg, stats=f["flap"])
                else:
                    model, report = minitron.prune_minitron(model, f["ids"], cfg, importance=f["minitron"])
        except ConfigError as exc:  # e.g. a target the layer range cannot reach
            rec = {"variant": variant, "peer": peer, "options": {k: list(v) if isinstance(v, tuple) else v
                                                                for k, v in opts.items()},
                   "ratio": ratio, "error": str(exc)}
            path.write_text(json.dumps(rec, indent=2))
            return rec
        prune_s = time.perf_counter() - t0
        signature = f"{report['removed_ids']}|{report['head_permutations']}|{sorted(opts.items())}" \
            if peer == "flap" else f"{report['removed_ids']}|{report['head_permutations']}"
        same = next((r for r in self._done if r["signature"] == signature and r["ratio"] == ratio), None)
        ppl = same["ppl"] if same else self.evaluate(model)
        rec = {"variant": variant, "peer": peer, "options": {k: list(v) if isinstance(v, tuple) else v
                                                            for k, v in opts.items()},
               "ratio": ratio, "params": count_params(model), "ratio_removed": report["params"]["ratio_removed"],
               "ppl": ppl, "widths": report["widths"], "calibration": report["calibration"],
               "method": report["method"], "prune_s": prune_s, "eval_s": time.perf_counter() - t0 - prune_s,
               "threads": torch.get_num_threads(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
               "signature": signature, "same_selection_as": same["variant"] if same else None}
        self._done.append(rec)
        path.write_text(json.dumps(rec, indent=2, default=str))
        logger.info("%s r%.2f: %s", variant, ratio, {k: round(v["ppl"], 2) for k, v in ppl.items()})
        return rec

    def dense(self) -> dict[str, Any]:
        path = self.work / "rows" / f"dense_{'smoke' if self.args.smoke else 'w' + str(self.args.windows)}.json"
        if path.is_file():
            return json.loads(path.read_text())
        import lorashear

        model = lorashear.load_model(MODEL)
        rec = {"variant": "dense", "params": count_params(model), "ppl": self.evaluate(model)}
        path.write_text(json.dumps(rec, indent=2))
        return rec


def widths_summary(widths: dict) -> str:
    q = [w["q_heads"] for w in widths.values()]
    m = [w["mlp"] for w in widths.values()]
    return f"heads {min(q)}-{max(q)}, MLP {min(m)}-{max(m)}"


def report(dense: dict, rows: list[dict], args: argparse.Namespace, command: str, seconds: dict[str, float],
           seqs: dict[str, int]) -> str:
    ratios = sorted({r["ratio"] for r in rows})
    s0, s1 = SOURCES
    lines = [
        "# Peers: one-shot perplexity on the validation split (SmolLM2-135M-Instruct)",
        "",
        "No retraining: each variant prunes the dense model once and is scored at once. Validation split only",
        f"(`{s0}`, `{s1}`); no `-test` alias was read. Perplexity: "
        f"`lorashear.evaluation.perplexity.perplexity`, {args.windows} windows of {args.seq_len} tokens over the "
        "whole token stream of each split (`load_eval_texts` + `token_stream`), 95 % bootstrap interval over windows.",
        "",
        f"Command (one thread, `torch.set_num_threads({args.threads})`):",
        "",
        "```",
        command,
        "```",
        "",
        f"Calibration (`builtin:calibration`, seed 0, {args.calib_len} tokens per sequence): FLAP and Minitron share "
        f"one forward pass over {seqs.get('forward', '?')} sequences ({seconds.get('forward', 0):.0f} s); "
        f"LLM-Pruner one forward+backward pass per sequence over {seqs.get('gradients', '?')} sequences "
        f"({seconds.get('gradients', 0):.0f} s), "
        "from which the gradient (`param_first`) and the per-sample Fisher diagonal (`param_mix`) both follow.",
        "",
        "Base settings of every variant (a variant's options override them; `base` = none):",
        "",
        *[f"- {peer}: " + ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v}" for k, v in base.items())
          for peer, base in BASE.items()],
        "",
        f"Dense: {dense['params']:,} parameters, {s0} {dense['ppl'][s0]['ppl']:.2f}, "
        f"{s1} {dense['ppl'][s1]['ppl']:.2f}.",
        "",
    ]
    for ratio in ratios:
        lines += [f"## Ratio {ratio:.1f}", "",
                  f"| variant | options | removed | {s0.split(':')[1]} | {s1.split(':')[1]} | widths (min-max) |",
                  "|---|---|---|---|---|---|"]
        mine = sorted([r for r in rows if r["ratio"] == ratio and "error" not in r],
                      key=lambda r: r["ppl"][s0]["ppl"])
        for r in mine:
            def cell(src: str) -> str:
                v = r["ppl"][src]
                ci = v.get("ci") or [None, None]
                return f"{v['ppl']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci[0] is not None else "")

            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "base"
            if r.get("same_selection_as"):
                opts += f" (same selection as {r['same_selection_as']}: not re-evaluated)"
            lines.append(f"| {r['variant']} | {opts} | {100 * r['ratio_removed']:.2f}% | {cell(s0)} | {cell(s1)} | "
                         f"{widths_summary(r['widths'])} |")
        for r in (r for r in rows if r["ratio"] == ratio and "error" in r):
            opts = ", ".join(f"{k}={v}" for k, v in r["options"].items())
            lines.append(f"| {r['variant']} | {opts} | - | not run: {r['error'].split(';')[0]} | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    screen = Screen(args)
    dense = screen.dense()
    rows = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
        for ratio in (float(r) for r in args.ratios.split(",")):
            rows.append(screen.row(variant, ratio))
    seconds, seqs = {}, {}
    for name in ("forward", "gradients"):
        path = screen.work / f"{name}_{screen.tag}.pt"
        if path.is_file():
            saved = torch.load(path, weights_only=True)
            seconds[name] = float(saved.get("seconds", 0.0))
            seqs[name] = int(saved["ids_shape"][0])
    command = shlex.join(["OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", ""), "python",
                          os.path.relpath(__file__, Path.cwd()), *(argv if argv is not None else sys.argv[1:])])
    text = report(dense, rows, args, command, seconds, seqs)
    print(text)
    if args.out:
        out = Path(args.out)
        marker = "<!-- notes: written by hand, kept when the tables are regenerated -->"
        notes = ""
        if out.is_file() and marker in out.read_text():
            notes = "\n" + out.read_text()[out.read_text().index(marker):]
        out.write_text(text + "\n" + notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
