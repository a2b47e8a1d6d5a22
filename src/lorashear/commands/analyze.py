"""`lorashear analyze` (planned)."""

from __future__ import annotations

import argparse

from ._stub import add_stub_parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stub_parser(subparsers, "analyze", "knowledge distribution analysis: find the structures that must never be pruned")
