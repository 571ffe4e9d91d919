"""`atdiff` command line: ``atdiff COMMAND ...`` or ``python -m atdiff COMMAND ...``.

Each command lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``;
only the module of the command being run is imported.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError, os_error_line
from .processes import end_with_parent

COMMANDS = {
    "info": ("atdiff.info", "build the attention and ATConv models of a config; print parameters and forward time"),
    "encode": ("atdiff.encode", "precompute a latent config's VAE latents into a latent store (resumable, multi-GPU)"),
    "train": ("atdiff.train_cli", "train a diffusion model from a YAML config (Accelerate)"),
    "sample": ("atdiff.generation.cli", "generate images from a trained pipeline folder"),
    "fid": ("atdiff.eval.fid", "FID (and sFID, KID, IS, precision/recall: ADM's table) between two image sets"),
    "card": ("atdiff.hub.card_cli", "write the model card (README.md) of a finished run"),
    "push": ("atdiff.hub.push_cli", "upload a finished run to the Hugging Face Hub with its model card"),
    "compare": ("atdiff.eval.compare", "train, sample and evaluate attention vs ATConv configs; write a report"),
    "bench": ("atdiff.eval.bench", "benchmark ATConv vs attention: mixers and whole models"),
    "import": ("atdiff.upstream.importing", "a DiT/SiT/ATConv-SiT/diffusers checkpoint as an atdiff pipeline folder"),
    "export": ("atdiff.upstream.exporting", "an atdiff DiTModel pipeline as a DiT/SiT checkpoint or diffusers folder"),
}


def build_parser(command: str | None) -> tuple[argparse.ArgumentParser, argparse.ArgumentParser | None]:
    """The ``atdiff`` parser and the parser of ``command`` (None when ``command`` is not one)."""
    parser = argparse.ArgumentParser(prog="atdiff", description="Diffusion with ATConv instead of attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    command_parser = None
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(sp)
            command_parser = sp
    return parser, command_parser


def parse_args(argv: list[str]) -> argparse.Namespace:
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser, command_parser = build_parser(command)
    if command_parser is None:
        return parser.parse_args(argv)  # help, or the error that lists the commands
    # KEY=VALUE overrides are a positional list; parse_args ends it at the first flag, so `a=1 --max-steps 3
    # b=2` would leave b=2 unparsed. parse_intermixed_args takes flags anywhere, but refuses a parser with
    # subcommands: the command's own parser reads what follows the command name.
    args = command_parser.parse_intermixed_args(argv[1:])
    args.command = command
    return args


def main(argv: list[str] | None = None) -> int:
    end_with_parent()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return module.run(args) or 0
    except UsageError as err:
        print(f"atdiff {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave that cannot be read or written: the OS says why
        print(f"atdiff {args.command}: error: {os_error_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"atdiff {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:  # a command that never imported torch joined no process group
            from .devices import end_process_group

            end_process_group()


if __name__ == "__main__":
    sys.exit(main())
