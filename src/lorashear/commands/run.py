"""``lorashear run [MODEL]``: the whole pipeline (analyze -> prune -> eval) through the stage functions.

Every option of every component is a flag (``lorashear run --help``) and a key of ``--config``;
``--stages eval`` re-runs one stage of an existing run; a stage whose output exists is skipped
unless ``--force``. The defaults are sized for the built-in reference model on a CPU.
"""

from __future__ import annotations

import argparse

from ..stages.pipeline import PIPELINE_OWNED, PipelineConfig
from ._stage import add_stage_options, stage_config


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "run", help="the whole pipeline: analyze -> prune (LHSPG) -> eval, on MODEL",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=None,
                        help="hub id, local directory or built-in name (default: the offline reference model)")
    add_stage_options(parser, PipelineConfig, exclude=PIPELINE_OWNED)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..stages import pipeline

    config = stage_config(PipelineConfig, args, model=args.model)
    result = pipeline.run(config)
    timings = ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()) or "nothing to do"
    print(f"run finished: {result.out} ({timings})")
    if result.model_dir:
        print(f"pruned model: {result.model_dir}")
    if result.report:
        print(f"report: {result.report}")
    return 0
