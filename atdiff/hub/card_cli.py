"""``atdiff card RUN``: write the model card ``atdiff push`` would upload, without pushing."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError

from ..files import write_atomic
from .card import model_card, read_run
from .push import check_repo_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished `atdiff train` folder")
    parser.add_argument("--out", help="where to write the card (default: RUN/README.md)")
    parser.add_argument("--repo-id", help="the Hub repo the card's snippets load from (default: the folder)")
    parser.add_argument("--license", help="license id for the card's metadata, e.g. apache-2.0, mit, cc-by-4.0")


def run(args: argparse.Namespace) -> int:
    if args.repo_id is not None:
        check_repo_id(args.repo_id)
    folder = Path(args.run)
    out = Path(args.out) if args.out else folder / "README.md"
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; name the card's file, e.g. {out / 'README.md'}")
    card = model_card(read_run(folder), args.repo_id, args.license)
    write_atomic(out, str(card))
    print(f"wrote {out}")
    return 0
