"""Loading checkpoint files safely: tensors, containers and the few classes these files need.

``torch.load(weights_only=True)`` unpickles tensors, dicts, lists and plain values only; a checkpoint
written by a ``train.py`` of DiT/SiT/the ATConv authors also holds its ``argparse.Namespace``, which
is allow-listed here and nowhere else. Anything else in a file (a class, a function) is refused, so
loading never runs code a file carries.
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
import zlib
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from ..errors import UsageError

# The only classes a checkpoint may hold besides what weights_only allows anyway.
ALLOWED_GLOBALS = [argparse.Namespace]
REFUSED_GLOBAL = re.compile(r"Unsupported global: GLOBAL (\S+)")


def load_checkpoint_file(path: Path) -> Any:
    """The object stored in a ``.safetensors`` file or a ``torch.save`` file, loaded without unpickling
    anything but tensors, containers and ``argparse.Namespace``; a UsageError for anything else."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own SafetensorError on a bad header
            raise UsageError(f"{path} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    check_zip_crcs(path)
    try:
        with torch.serialization.safe_globals(ALLOWED_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        refused = REFUSED_GLOBAL.search(str(err))
        what = f"an object of {refused.group(1)}" if refused else "objects"
        raise UsageError(
            f"{path} holds {what}, which atdiff does not unpickle (it could run code): only tensors, "
            f"containers, plain values and argparse.Namespace are loaded. Save the weights as a plain state dict "
            f"(torch.save(model.state_dict(), ...)) or as safetensors"
        ) from None
    # Not a zip and not a valid pickle stream: the weights-only unpickler then fails with whatever the
    # bytes trigger (KeyError, IndexError, ValueError, UnicodeDecodeError, ...), hence the broad catch.
    except Exception as err:
        if isinstance(err, OSError) and not path.is_file():
            raise UsageError(f"{path}: no such file") from None
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}") from None


def check_zip_crcs(path: Path) -> None:
    """Refuse a ``torch.save`` zip with a member that fails its CRC: ``torch.load`` never checks them, so
    a flipped byte in a tensor's data would load as other weights. (Legacy non-zip files carry none.)"""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
        raise UsageError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {err}") from None
    if damaged is not None:
        what = "a tensor's data" if "/data/" in damaged else "the file's structure"
        raise UsageError(f"{path}: member {damaged} ({what}) fails its CRC check: the file is corrupted; download or copy it again")
