"""`lorashear eval` (planned)."""

from __future__ import annotations

import argparse

from ._stub import add_stub_parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stub_parser(subparsers, "eval", "evaluate a (pruned) model: perplexity, zero-shot tasks, speed, report")
