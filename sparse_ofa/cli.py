"""sparse-ofa: Prune Once for All and sparse-INT8 inference for BERT-family encoders.

Each subcommand lives in its own module exposing
`add_parser(subparsers)` that sets `func`; COMMANDS lists them in help order."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "sparse_ofa.commands.demo",
    "sparse_ofa.commands.prune",
    "sparse_ofa.commands.finetune",
    "sparse_ofa.commands.quantize",
    "sparse_ofa.commands.evaluate",
    "sparse_ofa.commands.tools",
    "sparse_ofa.commands.bench",
]
TRAINING_COMMANDS = ("prune", "finetune", "quantize")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sparse-ofa", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(name).add_parser(sub)
    args = parser.parse_args(argv)
    try:
        if args.command in TRAINING_COMMANDS:  # torchrun / accelerate: one process group per command
            from .commands._shared import distributed

            with distributed():
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError, FileNotFoundError) as exc:
        print(f"sparse-ofa {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
