"""Checkpoint folders of a run: ``output_dir/checkpoint-<step>/``, listed, found, saved, loaded.

A checkpoint is an ``accelerator.save_state`` folder written under a temporary name and renamed
once complete, so a kill during saving leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel

from ..config import build_model, load_config
from ..errors import UsageError
from ..objectives import build_objective
from ..pipelines import ImageDiffusionPipeline

CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (partial ones have a temporary name), oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_NAME.fullmatch(p.name))]
    return sorted(found)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_NAME.fullmatch(path.name).group(1))


def find_checkpoint(output_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint ``--resume`` names: the newest in ``output_dir`` for ``latest`` (None when
    there is none yet, so one command both starts and continues a run), or a checkpoint folder."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            print(f"--resume latest: {output_dir} has no checkpoint yet; starting from scratch", flush=True)
        return checkpoints[-1][1] if checkpoints else None
    path = Path(resume)
    if not (path.is_dir() and CHECKPOINT_NAME.fullmatch(path.name) and any(path.glob("model*.safetensors"))):
        raise UsageError(f"--resume: {resume!r} is not a checkpoint-<step> folder; pass one, or 'latest'")
    return path


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, keep: int | None) -> Path:
    """``accelerator.save_state`` into ``.checkpoint-<step>.tmp``, renamed once complete; then
    keep the newest ``keep`` (all with None). Pruning happens after the rename, so a kill at
    any point leaves at least one complete checkpoint."""
    acc = accelerator
    final = output_dir / f"checkpoint-{step}"
    partial = output_dir / f".checkpoint-{step}.tmp"
    if acc.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    acc.wait_for_everyone()
    acc.save_state(str(partial))  # every process writes its own RNG state
    acc.wait_for_everyone()
    if acc.is_main_process:
        if final.exists():  # from an earlier attempt at this run (resumed from an older checkpoint)
            shutil.rmtree(final)
        os.replace(partial, final)
        for _, old in list_checkpoints(output_dir)[:-keep] if keep else []:
            shutil.rmtree(old)
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Path) -> int:
    """Restore everything registered with ``accelerator`` from ``checkpoint``; returns its step."""
    accelerator.load_state(str(checkpoint))
    return checkpoint_step(checkpoint)


def pipeline_at_checkpoint(checkpoint: Path) -> ImageDiffusionPipeline:
    """The pipeline of a run's EMA weights as they were at ``checkpoint`` (for FID over training).

    Rebuilds the model from the run's ``config.yaml`` and copies in the EMA parameters that
    ``save_state`` stored (the EMA is the first object registered for checkpointing).
    """
    cfg = load_config(checkpoint.parent / "config.yaml")
    model = build_model(cfg.model)
    ema = EMAModel(model.parameters())
    ema.load_state_dict(torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=True))
    ema.copy_to(model.parameters())
    return ImageDiffusionPipeline(model=model.eval(), scheduler=build_objective(cfg.objective).make_scheduler())
