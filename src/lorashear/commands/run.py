"""``lorashear run [MODEL]``: the whole pipeline as one recipe over the stage commands.

Stages, each the same code as its own subcommand, all writing under ``--out``:

1. ``analyze``  knowledge distribution analysis -> ``knowledge/knowledge.json``
2. ``prune``    LHSPG progressive pruning + compaction -> ``pruned/`` (+ report)
3. ``eval``     the pruned model against the dense one -> ``eval/report.md``

``--stages`` picks a subset (e.g. ``--stages eval`` on an existing run; a stage whose output
already exists is skipped unless ``--force``). The defaults are sized for the built-in
reference model on a CPU; raise ``--steps`` (and use a GPU) for real models.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from ..errors import ConfigError
from ..models.reference import REFERENCE_MODEL_NAME

logger = logging.getLogger(__name__)

STAGES = ("analyze", "prune", "eval")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="the whole pipeline: analyze -> prune (LHSPG) -> eval, on MODEL",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=REFERENCE_MODEL_NAME,
                        help=f"hub id, local directory or built-in name (default: {REFERENCE_MODEL_NAME})")
    parser.add_argument("--out", default="runs/lorashear", help="run directory (default: runs/lorashear)")
    parser.add_argument("--ratio", type=float, default=0.2, help="fraction of parameters to remove (default 0.2)")
    parser.add_argument("--data", default="builtin:calibration", help="calibration/training text (data spec)")
    parser.add_argument("--eval-data", default="builtin:heldout", help="held-out text for perplexity (data spec)")
    parser.add_argument("--steps", type=int, default=200, help="LHSPG optimizer steps (default 200)")
    parser.add_argument("--seq-len", type=int, default=256, help="training sequence length (default 256)")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per step (default 2)")
    parser.add_argument("--tasks", default=None, help="zero-shot tasks for eval (default: eval's default)")
    parser.add_argument("--limit", type=int, default=50, help="examples per zero-shot task (default 50)")
    parser.add_argument("--analyze-sequences", type=int, default=8,
                        help="calibration sequences of 128 tokens for the knowledge analysis (default 8)")
    parser.add_argument("--speed", action=argparse.BooleanOptionalAction, default=True,
                        help="measure latency/throughput in the eval stage (default: on)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"stages to run (default: {','.join(STAGES)})")
    parser.add_argument("--force", action="store_true", help="re-run stages whose outputs exist")
    parser.set_defaults(func=run)
    return parser


def _stage(argv: list[str]) -> int:
    from ..cli import build_parser

    ns = build_parser().parse_args(argv)
    logger.info("stage: lorashear %s", " ".join(argv))
    return int(ns.func(ns) or 0)


def run(args: argparse.Namespace) -> int:
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if not 0.0 < args.ratio < 1.0:
        raise ConfigError(f"--ratio must be in (0, 1), got {args.ratio}")
    out = Path(args.out)
    knowledge_dir, pruned_dir, eval_dir = out / "knowledge", out / "pruned", out / "eval"
    timings: dict[str, float] = {}

    if "analyze" in stages and (args.force or not (knowledge_dir / "knowledge.json").is_file()):
        t = time.perf_counter()
        _stage(["analyze", args.model, "--data", args.data, "--out", str(knowledge_dir),
                "--num-sequences", str(args.analyze_sequences), "--seq-len", "128"])
        timings["analyze"] = time.perf_counter() - t
    if "prune" in stages and (args.force or not (pruned_dir / "prune_report.json").is_file()):
        t = time.perf_counter()
        argv = ["prune", args.model, "--ratio", str(args.ratio), "--data", args.data, "--out", str(pruned_dir),
                "--steps", str(args.steps), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                "--eval-data", args.eval_data, "--checkpoint-every", "50"]
        if (knowledge_dir / "knowledge.json").is_file():
            argv += ["--knowledge", str(knowledge_dir / "knowledge.json")]
        if (pruned_dir / "checkpoints").is_dir():
            argv += ["--resume"]
        _stage(argv)
        timings["prune"] = time.perf_counter() - t
    if "eval" in stages:
        model_dir = pruned_dir / "model" if (pruned_dir / "model" / "config.json").is_file() else pruned_dir
        if not (model_dir / "config.json").is_file():
            raise ConfigError(f"no pruned model under {pruned_dir}; run the prune stage first")
        t = time.perf_counter()
        argv = ["eval", str(model_dir), "--baseline", args.model, "--out", str(eval_dir),
                "--limit", str(args.limit), "--ppl-source", args.eval_data]
        if args.tasks:
            argv += ["--tasks", args.tasks]
        if not args.speed:
            argv += ["--no-speed"]
        _stage(argv)
        timings["eval"] = time.perf_counter() - t
    summary = {"model": args.model, "ratio": args.ratio, "stages": stages, "seconds": timings}
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"run finished: {out} ({', '.join(f'{k} {v:.0f} s' for k, v in timings.items()) or 'nothing to do'})")
    return 0
