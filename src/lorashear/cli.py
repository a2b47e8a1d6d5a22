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
COMMANDS: tuple[str, ...] = ("run", "groups", "analyze", "prune", "recover", "eval", "export", "reference")


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
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read when huggingface_hub is imported
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        if "transformers" in sys.modules:  # already imported: its "Loading weights" bar is on
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()


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
        print(f"lorashear {args.command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError) as exc:
        # only about a path the user named (--out, MODEL, a data file, ...): anything else is a bug
        if not _on_user_path(exc, args):
            raise
        print(f"lorashear {args.command}: error: cannot use {exc.filename}: {exc.strerror or exc}; "
              "check the path and its permissions", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lorashear {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def _one_line(text: str) -> str:
    return " ".join(text.split("\n")).strip()


#: argument names whose values are paths the user chose (model directories, --out, data files, ...)
PATH_ARGS = ("model", "out", "config", "baseline", "teacher", "knowledge", "data", "data_specs", "instruct_specs",
             "eval_data", "ppl_source")


def _user_paths(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``(argument, absolute path)`` for every path-valued argument given."""
    found: list[tuple[str, str]] = []
    for key in PATH_ARGS:
        value = getattr(args, key, None)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(item, str) or not item.strip() or item.startswith(("builtin:", "hf:")):
                continue
            if ":" in item and not os.path.exists(item):
                item = item.split(":", 1)[0]  # a data spec's options (notes.jsonl:field=text)
            found.append((key, os.path.abspath(os.path.expanduser(item))))
    return found


def _on_user_path(exc: OSError, args: argparse.Namespace) -> bool:
    """Whether ``exc`` is about a path the user named: the path itself or something inside it, and
    for ``--out`` also its parents and its hidden siblings (temporary directory, lock file)."""
    name = getattr(exc, "filename", None)
    if not isinstance(name, (str, os.PathLike)):
        return False
    failed = os.path.abspath(os.fspath(name))
    for key, path in _user_paths(args):
        if failed == path or failed.startswith(path + os.sep):
            return True
        if key == "out":
            sibling = os.path.dirname(failed) == os.path.dirname(path) and \
                os.path.basename(failed).startswith("." + os.path.basename(path) + ".")
            if sibling or path.startswith(failed + os.sep):
                return True
    return False


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
