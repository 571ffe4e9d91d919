"""State dicts (optimizer, LR schedule, EMA, RNG) as safetensors files that load without pickle.

A state dict is a tree of dicts, lists, tuples, scalars and tensors. Its tensors go into the
safetensors file; its structure, as JSON with each tensor replaced by a reference, goes into the
file's metadata. ``torch.save`` would keep it in one call, but loading a pickle can run code, and
``weights_only=True`` still needs every non-tensor type allow-listed; this keeps exactly the types
JSON and safetensors know, and refuses anything else on both ways.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

STRUCTURE_KEY = "atdiff.tree"
SCALARS = (str, int, float, bool, type(None))


def save_tree(path: Path, tree: Any) -> None:
    tensors: dict[str, torch.Tensor] = {}
    structure = encode(tree, tensors)
    with os_errors(path):
        save_file(tensors, str(path), metadata={STRUCTURE_KEY: json.dumps(structure)})


@contextmanager
def os_errors(path: Path) -> Iterator[None]:
    """safetensors reports a failed write (disk full, read-only folder) as a SafetensorError with
    the OS error code in its text; raise it as the OSError naming ``path`` that Python's own writes give."""
    try:
        yield
    except SafetensorError as err:
        code = re.search(r"os error (\d+)", str(err))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from err


def load_tree(path: Path) -> Any:
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        if STRUCTURE_KEY not in metadata:
            raise ValueError(f"{path.name} holds no {STRUCTURE_KEY} metadata")
        tensors = {key: file.get_tensor(key) for key in file.keys()}
    return decode(json.loads(metadata[STRUCTURE_KEY]), tensors)


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for ``obj``; containers are tagged so that tuples stay tuples and integer keys
    (an optimizer's parameter ids) stay integers."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().contiguous()
        return {"tensor": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, SCALARS) for k in obj):
            raise TypeError(f"cannot store dict keys {[k for k in obj if not isinstance(k, SCALARS)][:3]}")
        return {"dict": [[k, encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {type(obj).__name__: [encode(v, tensors) for v in obj]}
    if isinstance(obj, SCALARS):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, SCALARS):
        return node
    if not (isinstance(node, dict) and len(node) == 1):
        raise ValueError(f"malformed state structure: {str(node)[:80]}")
    (tag, value), = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "dict":
        return {k: decode(v, tensors) for k, v in value}
    if tag == "list":
        return [decode(v, tensors) for v in value]
    if tag == "tuple":
        return tuple(decode(v, tensors) for v in value)
    raise ValueError(f"malformed state structure: unknown tag {tag!r}")
