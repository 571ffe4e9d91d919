"""Sharing a finished run: its model card (``card``) and its upload to the Hugging Face Hub (``push``);
``atdiff card`` and ``atdiff push`` are their command lines (``card_cli``, ``push_cli``)."""

from .card import RunRecord, model_card, read_run
from .push import push

__all__ = ["RunRecord", "model_card", "push", "read_run"]
