"""`atdiff` command line: ``atdiff COMMAND ...`` or ``python -m atdiff COMMAND ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the module of the command being run is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError

COMMANDS = {
    "info": ("atdiff.info", "build the attention and ATConv models of a config; print parameters and forward time"),
    "train": ("atdiff.training.cli", "train a diffusion model from a YAML config (Accelerate)"),
    "sample": ("atdiff.sampling", "generate images from a trained pipeline folder"),
    "fid": ("atdiff.eval.fid", "FID/KID (torch-fidelity) between two image sets"),
    "compare": ("atdiff.eval.compare", "train, sample and evaluate attention vs ATConv configs; write a report"),
    "bench": ("atdiff.eval.bench", "benchmark ATConv vs attention: mixers and whole models"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atdiff", description="Diffusion with ATConv instead of attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in COMMANDS else None
    args = build_parser(command).parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except UsageError as err:
        print(f"atdiff {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
