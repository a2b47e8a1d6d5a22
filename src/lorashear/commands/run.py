"""``lorashear run [MODEL]``: the whole pipeline (analyze -> prune -> [recover] -> eval -> [export] -> report).

Every option of every component is a flag (``lorashear run --help``) and a key of ``--config``;
``--stages eval`` re-runs one stage of an existing run. A stage whose output was made with this run's
settings and inputs (models compared by content) is reused; one made with other settings runs again,
and so do the stages after it (``--no-rerun`` refuses instead; ``--force`` re-runs everything).
``--dry-run`` prints that plan after every up-front check and writes nothing. The defaults are sized
for the built-in reference model on a CPU; ``--quick`` is a smoke test of every stage in a few minutes.
"""

from __future__ import annotations

import argparse

from ..stages.pipeline import PIPELINE_OWNED, PipelineConfig
from ._stage import add_stage_options, stage_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="the whole pipeline: analyze -> prune (LHSPG) -> [recover] -> eval -> [export] -> report.md",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="hub id, local directory or built-in name (default: the offline reference model)")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve every stage's settings, inputs and outputs, make every check a stage would "
                             "make, print the plan (what runs, what is reused or re-run, and why) and write nothing")
    add_stage_options(parser, PipelineConfig, exclude=PIPELINE_OWNED)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..stages import pipeline

    config = stage_config(PipelineConfig, args, model=args.model)
    if args.dry_run:
        print(pipeline.plan(config).describe())
        return 0
    result = pipeline.run(config)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) or "nothing to do"
    print(f"run finished: {result.out} ({timings})")
    if result.model_dir:
        kind = "recovered" if result.recover is not None or result.model_dir.endswith("recovered") else "pruned"
        print(f"{kind} model: {result.model_dir}")
    for path in result.exports:
        print(f"exported: {path}")
    if result.run_report:
        print(f"report: {result.run_report}")
    return 0
