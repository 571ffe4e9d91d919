"""The run folder (``training.output_dir``): checks before training, ``config.yaml``, and the
final diffusers pipeline folder it becomes."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import yaml

from ..config import ExperimentConfig
from ..errors import UsageError
from ..files import write_atomic
from ..pipelines import ImageDiffusionPipeline
from .checkpoint import list_checkpoints


def check_output_dir(output_dir: Path, cfg: ExperimentConfig, resume_from: Path | None) -> None:
    """Refuse to train over a finished or checkpointed run unless resuming, and refuse to resume
    with a model, objective or data that differ from the checkpoint's."""
    if resume_from is None:
        taken = [p.name for p in (output_dir / "model_index.json", *(p for _, p in list_checkpoints(output_dir))) if p.exists()]
        if taken:
            raise UsageError(
                f"{output_dir} already holds a run ({', '.join(taken[:3])}); continue it with --resume latest "
                f"or pass another --output-dir"
            )
        return
    saved_config = resume_from.parent / "config.yaml"
    if saved_config.is_file():
        saved, current = yaml.safe_load(saved_config.read_text()), cfg.to_dict()
        changed = [
            f"{section}.{key}"
            for section in ("model", "objective", "data")
            for key in sorted(set(saved.get(section, {})) | set(current[section]))
            if saved.get(section, {}).get(key) != current[section].get(key)
        ]
        if changed:
            raise UsageError(f"{resume_from} was trained with other values of {changed} (see {saved_config}); use the same config to resume")


def prepare_output_dir(output_dir: Path, cfg: ExperimentConfig) -> None:
    """Create the folder, clear what a run killed while saving left, and record the config."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob(".*.tmp"):  # left by a run killed while saving
        shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    write_atomic(output_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def save_pipeline(output_dir: Path, pipeline: ImageDiffusionPipeline) -> None:
    """Make ``output_dir`` a diffusers pipeline folder. Written aside and moved in with
    ``model_index.json`` last, so a folder that has it holds a complete pipeline."""
    staging = output_dir / ".pipeline.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    pipeline.save_pretrained(staging)
    for entry in sorted(staging.iterdir(), key=lambda p: p.name == "model_index.json"):
        target = output_dir / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()
