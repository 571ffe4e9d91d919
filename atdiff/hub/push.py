"""Share a finished run on the Hugging Face Hub: its pipeline, training record and sample grid, with
the model card of ``atdiff.hub.card`` as ``README.md``, in one commit through ``huggingface_hub``.

Everything the user gives is checked before the first request (the repo id, the run, the token), so
a refusal uploads nothing; what the Hub answers (a token it rejects, a name taken) is one line too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HFValidationError, HfHubHTTPError
from huggingface_hub.utils import validate_repo_id

from ..errors import UsageError, one_line
from .card import RunRecord, model_card, read_run


def check_repo_id(repo_id: str) -> None:
    """A full ``NAMESPACE/NAME`` id: the card's snippets name it, so it cannot be left to the token's owner."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {one_line(str(err))}") from None
    if "/" not in repo_id:
        raise UsageError(f"repo id {repo_id!r} has no namespace; write USER/{repo_id} or ORG/{repo_id}")


def resolve_token(token: str | None) -> str:
    """``token``, else huggingface_hub's own (``HF_TOKEN``, then the one ``hf auth login`` stored)."""
    token = token or get_token()
    if not token:
        raise UsageError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN, or pass --token (a write token)")
    return token


def push(folder: Path, repo_id: str, token: str | None = None, private: bool = False, license: str | None = None) -> str:
    """Upload the finished run in ``folder`` to the model repo ``repo_id`` (created if new); returns the commit URL."""
    check_repo_id(repo_id)
    run = read_run(folder)
    token = resolve_token(token)
    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set, so huggingface_hub makes no request; unset it to push")
    card = model_card(run, repo_id, license)
    api = HfApi(token=token)
    with hub_errors(repo_id):
        api.create_repo(repo_id, private=private, exist_ok=True)
        public = not api.model_info(repo_id).private
    if private and public:  # an existing repo keeps its visibility: --private must not publish
        raise UsageError(f"{repo_id} already exists and is public; make it private on the Hub first, or push without --private")
    with hub_errors(repo_id):
        commit = api.create_commit(repo_id, upload_operations(run, str(card)), commit_message=f"atdiff push: {folder.name} at step {run.stats['steps']}")
    return commit.commit_url


@contextmanager
def hub_errors(repo_id: str) -> Iterator[None]:
    """What the Hub answers, or the network fails with, as one line."""
    try:
        yield
    except HfHubHTTPError as err:
        raise UsageError(f"the Hub refused the upload to {repo_id}: {one_line(str(err))}") from None
    except httpx2.TransportError as err:
        raise UsageError(f"cannot reach the Hub ({constants.ENDPOINT}): {one_line(str(err))}") from None
    except ValueError as err:  # the Hub's check of the card's metadata (e.g. --license), or its LFS answers
        raise UsageError(f"the Hub refused the upload to {repo_id}: {one_line(str(err))}") from None


def upload_operations(run: RunRecord, card: str) -> list[CommitOperationAdd]:
    files = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=run.folder / name) for name in run.files()]
    return files + [CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode())]
