"""`lorashear recover` (planned)."""

from __future__ import annotations

import argparse

from ._stub import add_stub_parser


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    return add_stub_parser(subparsers, "recover", "dynamic knowledge recovery: LoRA fine-tuning on an adaptive data mix")
