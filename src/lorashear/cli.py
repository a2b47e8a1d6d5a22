"""The ``lorashear`` console script: one entry point, one subcommand per stage.

Only this module configures logging. Each subcommand lives in
``lorashear.commands.<name>`` and exposes ``add_parser(subparsers)``, which
registers its options and sets ``func`` to the function that runs it.
User errors (:class:`~lorashear.errors.LorashearError`) print one line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from . import __version__
from .errors import LorashearError

#: Subcommands in the order ``--help`` lists them (module names under lorashear.commands).
COMMANDS: tuple[str, ...] = ("run", "groups", "analyze", "prune", "recover", "eval", "reference")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorashear",
        description="Structured pruning with LoRA (LoRAShear) for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"lorashear {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no progress bars")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"lorashear.commands.{name.replace('-', '_')}")
        module.add_parser(sub)
    return parser


def configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # Our own loggers follow -v; the libraries' stay at WARNING unless -vv.
    logging.getLogger("lorashear").setLevel(level)
    if verbose < 2:
        for noisy in ("transformers", "datasets", "accelerate", "peft", "urllib3", "httpx", "filelock", "fsspec"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        import warnings

        warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    if quiet:
        os.environ.setdefault("LORASHEAR_DISABLE_PROGRESS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose, args.quiet)
    try:
        result = args.func(args)
    except LorashearError as exc:
        print(f"lorashear {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorashear {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
