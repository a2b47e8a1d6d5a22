"""Planned subcommands that do not exist yet say so and exit non-zero."""

from __future__ import annotations

import argparse

from ..errors import NotImplementedYetError


def add_stub_parser(subparsers: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=f"{help_text} [not implemented yet]", description=help_text)
    parser.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        raise NotImplementedYetError(f"'lorashear {name}' is not implemented yet")

    parser.set_defaults(func=run)
    return parser
