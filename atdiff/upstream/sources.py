"""What ``atdiff import SRC`` reads: a DiT/SiT state dict, a ``train.py`` checkpoint, or a diffusers
``DiTTransformer2DModel`` / ``DiTPipeline`` folder, recognised by its keys and files."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..files import read_json_object
from ..integrity import verify_pipeline
from .loading import load_checkpoint_file
from .keymap import DIFFUSERS_SIGNATURE, TIMM_SIGNATURE, Weights

TRAIN_CHECKPOINT_KEYS = ("model", "ema", "opt", "args")
WEIGHT_CHOICES = ("ema", "model")
DIFFUSERS_TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
FOLDER_FIX = "pass a diffusers DiTPipeline or DiTTransformer2DModel folder as save_pretrained wrote it"


@dataclass
class Source:
    """An upstream checkpoint as found, in its own key layout (``"timm"`` or ``"diffusers"``)."""

    path: Path
    layout: str
    weights: Weights
    args: dict[str, Any] = field(default_factory=dict)  # a train.py checkpoint's args
    diffusers_config: dict[str, Any] | None = None
    scheduler_config: dict[str, Any] | None = None
    vae_dir: Path | None = None  # a DiTPipeline folder's VAE


def read_source(path: Path, weights: str = "ema") -> Source:
    if not path.exists():
        raise UsageError(f"{path}: no such file or folder")
    if path.is_dir():
        return read_diffusers_folder(path)
    return read_checkpoint(path, weights)


# ------------------------------------------------------------------------------------------------
# DiT / SiT / ATConv-SiT files
# ------------------------------------------------------------------------------------------------


def read_checkpoint(path: Path, weights: str) -> Source:
    """A raw state dict (released DiT/SiT weights) or a ``train.py`` dict (``ema`` unless ``weights="model"``)."""
    obj = load_checkpoint_file(path)
    expected = (
        f"expected a DiT/SiT state dict (keys such as {', '.join(TIMM_SIGNATURE)}) or a train.py checkpoint "
        f"(keys {', '.join(TRAIN_CHECKPOINT_KEYS)})"
    )
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}; {expected}")
    args: dict[str, Any] = {}
    if any(k in obj for k in WEIGHT_CHOICES):
        if weights not in obj:
            raise UsageError(f"{path} has no {weights!r} weights (it has {sorted(k for k in obj if k in WEIGHT_CHOICES)}); pass --weights accordingly")
        raw_args = obj.get("args") or {}
        args = vars(raw_args) if isinstance(raw_args, argparse.Namespace) else dict(raw_args)
        obj = obj[weights]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state or len(state) != len(obj):
        raise UsageError(f"{path}: the weights are not a flat mapping of names to tensors; {expected}")
    if all(k in state for k in TIMM_SIGNATURE):
        return Source(path, "timm", state, args)
    if all(k in state for k in DIFFUSERS_SIGNATURE):
        raise UsageError(f"{path} holds DiTTransformer2DModel weights; import the diffusers folder they belong to (it has the config)")
    found = ", ".join(list(state)[:4])
    raise UsageError(f"{path} is not a DiT/SiT checkpoint (its first keys: {found}); {expected}")


# ------------------------------------------------------------------------------------------------
# diffusers folders
# ------------------------------------------------------------------------------------------------


def read_diffusers_folder(path: Path) -> Source:
    """A ``DiTPipeline`` folder (``model_index.json``, ``transformer/``, ``vae/``, ``scheduler/``) or a
    ``DiTTransformer2DModel`` folder; loaded by diffusers itself (safetensors, or torch.load weights_only)."""
    from diffusers import DiTTransformer2DModel

    pipeline = (path / "model_index.json").is_file() and (path / "transformer").is_dir()
    transformer_dir = path / "transformer" if pipeline else path
    config_file = transformer_dir / "config.json"
    class_name = read_json_object(config_file, FOLDER_FIX).get("_class_name") if config_file.is_file() else None
    if class_name not in DIFFUSERS_TRANSFORMER_CLASSES:
        raise UsageError(
            f"{path} is a folder but not a diffusers DiTPipeline (model_index.json and transformer/) or "
            f"DiTTransformer2DModel folder (config.json naming {' or '.join(DIFFUSERS_TRANSFORMER_CLASSES)}); "
            f"DiT/SiT checkpoints are single files"
        )
    if pipeline:
        verify_pipeline(path)  # one atdiff export wrote; upstream folders have no manifest
    transformer = DiTTransformer2DModel.from_pretrained(transformer_dir)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    return Source(
        path,
        "diffusers",
        transformer.state_dict(),
        diffusers_config=dict(transformer.config),
        scheduler_config=read_json_object(scheduler_file, FOLDER_FIX) if pipeline and scheduler_file.is_file() else None,
        vae_dir=path / "vae" if pipeline and (path / "vae" / "config.json").is_file() else None,
    )
