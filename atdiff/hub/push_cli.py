"""``atdiff push RUN REPO_ID``: upload a finished run to the Hugging Face Hub with its model card."""

from __future__ import annotations

import argparse
from pathlib import Path

from .push import push


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", metavar="RUN", help="a finished `atdiff train` folder")
    parser.add_argument("repo_id", metavar="REPO_ID", help="the model repo, USER/NAME or ORG/NAME (created if new)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--token", help="a Hub write token (default: HF_TOKEN, else the one `hf auth login` stored)")
    parser.add_argument("--license", help="license id for the card's metadata, e.g. apache-2.0, mit, cc-by-4.0")


def run(args: argparse.Namespace) -> int:
    url = push(Path(args.run), args.repo_id, token=args.token, private=args.private, license=args.license)
    print(f"pushed {args.run} to {url}")
    return 0
