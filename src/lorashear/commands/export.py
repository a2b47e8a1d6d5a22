"""`lorashear export MODEL --format gguf --out FILE.gguf [--outtype f32|f16|q8_0]`.

Writes one self-contained GGUF file (weights, hyperparameters, tokenizer) that llama.cpp runs:
a uniform model as the ``llama`` architecture, one whose layers differ as ``deci`` with
per-layer head counts and FFN widths (:func:`lorashear.stages.export.run`). Then, when
llama-cpp-python is installed, it evaluates a 2-token prompt of the file in a subprocess and
warns in one line (stderr) if this llama.cpp build cannot run it on this CPU.
"""

from __future__ import annotations

import argparse
import json

from ..stages.export import ExportConfig
from ._stage import add_stage_options, stage_config

EPILOG = """examples:
  lorashear export runs/lorashear/pruned --out pruned.gguf
  lorashear export runs/lorashear/pruned --out pruned-q8.gguf --outtype q8_0
  lorashear export runs/lorashear/pruned --out pruned.gguf --no-check-llama-cpp   # skip the llama.cpp check
  llama-cli -m pruned.gguf -p "The capital of France is" -n 32"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export", help="write a (pruned) model as a GGUF file for llama.cpp",
        description="Write MODEL as one GGUF file with its tokenizer: the llama architecture when every layer "
                    "has the same widths, deci (per-layer heads and FFN widths) when they differ.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", metavar="MODEL", nargs="?", default=None,
                        help="model directory (e.g. runs/lorashear/pruned), hub id or smollm2-135m-instruct "
                             "(or `model:` in --config)")
    parser.add_argument("--out", metavar="FILE.gguf", default=None, help="file to write (or `out:` in --config)")
    parser.add_argument("--json", action="store_true", help="print the full export record as JSON")
    add_stage_options(parser, ExportConfig)
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..stages import export

    config = stage_config(ExportConfig, args, model=args.model, out=args.out)
    if not config.model:
        raise ConfigError("name the model to export (MODEL, or `model:` in --config)")
    if not config.out:
        raise ConfigError("name the file to write (--out FILE.gguf, or `out:` in --config)")
    result = export.run(config)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    g = result.gguf
    layout = ("uniform" if g.uniform else "per-layer widths") + (
        f": {g.head_count[0]} heads, {g.head_count_kv[0]} KV heads, FFN {g.feed_forward_length[0]}" if g.uniform
        else f": heads {min(g.head_count)}-{max(g.head_count)}, KV heads {min(g.head_count_kv)}-"
             f"{max(g.head_count_kv)}, FFN {min(g.feed_forward_length)}-{max(g.feed_forward_length)}")
    print(f"exported {config.model} -> {g.path}: arch {g.arch}, {g.num_layers} layers ({layout}), {g.outtype}, "
          f"tokenizer pre '{g.tokenizer_pre}', {g.file_bytes / 2**20:.1f} MiB in {result.seconds:.1f} s")
    if g.fallbacks:
        names = ", ".join(f"{f['name']} ({f['shape'][0]})" for f in g.fallbacks)
        print(f"{len(g.fallbacks)} tensor(s) written as F16, row width not divisible by 32: {names}")
    for note in g.notes:
        print(f"note: {note}")
    if result.llama_cpp is not None and result.llama_cpp.ok:
        print(f"checked: {result.llama_cpp.message}")
    return 0
