"""A samples folder: ``000000.png ...`` plus the record of what they were sampled with, filled resumably
by one process or by all the processes of an ``accelerate launch``.

A folder holds the images of one ``SampleRecord`` (``atdiff_sample.json``) and is never filled with
others. Each PNG is written atomically, so a killed run leaves only whole images, and a rerun samples
only the missing indices. Under several processes each takes every n-th missing index: images depend
only on (seed, index, label) (``drawing``), so the folder is the same whatever the number of processes.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from PIL import Image
from tqdm.auto import tqdm

from ..devices import OneProcess, check_device, process_state
from ..errors import UsageError, one_line, writing_to
from ..files import atomic_path, write_atomic
from ..limits import check_disk, check_forward, model_batch, png_folder_bytes
from ..pipelines import ImageDiffusionPipeline
from .drawing import check_drawable, draw
from .loading import load_pipeline
from .settings import SamplingConfig

SETTINGS_FILE = "atdiff_sample.json"
OUTPUT_FIX = "free space or write elsewhere"
PROGRESS_POLL_S = 1.0  # how often the main process's bar counts the other processes' images once its own are done


@dataclass
class SampleRecord:
    """What determines a folder's images; a folder is only ever filled with one of these."""

    pipeline: str
    sampling: SamplingConfig
    class_labels: list[int] | None = None  # cycled over image indices; None: index % num_classes
    num_images: int | None = None  # set where the count is part of what is made (a grid, an npz); a folder can grow

    def flat(self) -> dict:
        """As ``atdiff_sample.json`` (and a grid's or npz's metadata) holds it."""
        extra = {} if self.num_images is None else {"num_images": self.num_images}
        return {"pipeline": self.pipeline, **asdict(self.sampling), "class_labels": self.class_labels, **extra}


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def png_names(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name.endswith(".png")} if folder.is_dir() else set()


def missing_indices(folder: Path, num_images: int) -> list[int]:
    present = png_names(folder)  # one listing, not a stat per index: a large --num-images starts at once
    return [i for i in range(num_images) if image_path(folder, i).name not in present]


def read_images(folder: Path, indices) -> np.ndarray:
    """uint8 (N, H, W, C) of the PNGs ``indices``, which must all have the first one's size."""
    first = read_image(folder, indices[0])
    return np.stack([first, *(read_image(folder, i, first.shape) for i in indices[1:])])


def read_image(folder: Path, index: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """uint8 (H, W, C) of PNG ``index``, refused (naming it) unless it is what ``save_png_atomically``
    writes, an 8-bit gray or RGB PNG (of ``shape``, if given): a folder can be edited between runs."""
    path, fix = image_path(folder, index), "delete it and rerun to sample it again"
    try:
        with Image.open(path) as file:
            if file.format != "PNG" or file.mode not in ("L", "RGB"):
                raise UsageError(f"{path} is a {file.format} image in mode {file.mode}, not an 8-bit gray or RGB PNG "
                                 f"as `atdiff sample` writes; {fix}")
            image = np.asarray(file)
    except OSError as err:  # not an image, or a truncated one
        raise UsageError(f"{path} is not a readable image ({one_line(str(err))}); {fix}") from None
    image = image[..., None] if image.ndim == 2 else image
    if shape is not None and image.shape != shape:
        raise UsageError(f"{path} is {image.shape}, {image_path(folder, 0)} is {shape}; the images of one output have one size")
    return image


def save_png_atomically(image: np.ndarray, path: Path) -> None:
    # A run killed mid-write must not leave a truncated PNG that a resumed run would take as done.
    with atomic_path(path) as partial:
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(partial, format="PNG")


# ------------------------------------------------------------------------------------------------
# The record
# ------------------------------------------------------------------------------------------------


def folder_settings(folder: Path) -> dict | None:
    """The settings ``folder`` was filled with (its ``atdiff_sample.json``); None when it has none we wrote."""
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):  # missing, or not the JSON atdiff sample writes
        return None
    return settings if isinstance(settings, dict) else None


def check_same_settings(path: Path, previous: dict, current: dict) -> None:
    if previous != current:
        keys = dict.fromkeys([*current, *previous])
        changed = ", ".join(f"{k}: {previous.get(k)!r} -> {current.get(k)!r}" for k in keys if previous.get(k) != current.get(k))
        raise UsageError(f"{path} holds images sampled with other settings ({changed}); use a new --out or the same settings")


def check_claim(folder: Path, record: SampleRecord) -> None:
    """Refuse a folder filled with other settings, or holding files atdiff sample did not write."""
    if (previous := folder_settings(folder)) is not None:
        check_same_settings(folder, previous, record.flat())
    elif folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty and was not written by `atdiff sample`; use a new or empty --out")


def claim_folder(folder: Path, record: SampleRecord) -> None:
    """Make ``folder`` hold images of ``record`` only."""
    check_claim(folder, record)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / SETTINGS_FILE, json.dumps(record.flat(), indent=2) + "\n")


def is_complete(folder: Path, record: SampleRecord, num_images: int) -> bool:
    return folder_settings(folder) == record.flat() and not missing_indices(folder, num_images)


# ------------------------------------------------------------------------------------------------
# Filling
# ------------------------------------------------------------------------------------------------


def image_bytes(pipe: ImageDiffusionPipeline) -> int:
    """The size of one image ``pipe`` draws, as uint8 pixels (decoded by its VAE, if it has one)."""
    size = pipe.model.config.sample_size
    height, width = (size, size) if isinstance(size, int) else size
    scale, channels = 1, pipe.model.config.in_channels
    if pipe.vae is not None:
        scale, channels = 2 ** (len(pipe.vae.config.block_out_channels) - 1), pipe.vae.config.out_channels
    return height * width * scale**2 * channels


def check_sampling_fits(model_config: Mapping, device: torch.device | str, folder: Path, sampling: SamplingConfig, num_images: int,
                        batch_size: int) -> None:
    """Refuse, before any image, a batch whose model call cannot fit in ``device``'s memory and images
    that cannot fit on ``folder``'s disk."""
    images = min(batch_size, num_images)
    check_forward(f"sampling {images} images per model call", model_config, model_batch(images, sampling.guidance_scale), device,
                  "lower the batch size")
    missing = num_images - len(png_names(folder))
    check_disk(f"{missing} PNGs", png_folder_bytes(missing), folder, "sample fewer images, or free space")


def fill_folder(pipe: ImageDiffusionPipeline, folder: Path, record: SampleRecord, num_images: int, batch_size: int,
                progress: bool = True, state: PartialState | OneProcess | None = None) -> tuple[int, float]:
    """Sample the images ``0..num_images-1`` that ``folder`` lacks, this process's share of them (every
    ``num_processes``-th); return (number sampled by all processes, seconds). The main process shows
    one bar over all of them."""
    state = state or process_state()
    missing = missing_indices(folder, num_images)
    state.wait_for_everyone()  # every process has listed the folder before any of them writes into it
    if not missing:
        return 0, 0.0
    mine = missing[state.process_index :: state.num_processes]
    start, done_before = time.perf_counter(), num_images - len(missing)
    with tqdm(total=len(missing), unit="img", desc="sampling", disable=not (progress and state.is_main_process)) as bar:
        def show_progress() -> None:
            # With several processes the folder is the one count of everyone's images.
            done = len(missing) if state.num_processes == 1 else len(png_names(folder)) - done_before
            bar.update(min(done, len(missing)) - bar.n)

        for first in range(0, len(mine), batch_size):
            indices = mine[first : first + batch_size]
            try:
                images = draw(pipe, record.sampling, indices, record.class_labels)
            except ValueError as err:  # the arguments were checked: non-finite samples
                raise UsageError(f"images {indices[0]}..{indices[-1]}, none of them written: {err}") from None
            for i, image in zip(indices, images):
                save_png_atomically(image, image_path(folder, i))
            if state.num_processes == 1:
                bar.update(len(indices))
            elif state.is_main_process:
                show_progress()
        if state.is_main_process and state.num_processes > 1 and not bar.disable:
            while bar.n < len(missing):  # the others' last images
                time.sleep(PROGRESS_POLL_S)
                show_progress()
    state.wait_for_everyone()
    return len(missing), time.perf_counter() - start


def sample_into_folder(
    pipeline: ImageDiffusionPipeline | str | Path,
    folder: Path,
    record: SampleRecord,
    num_images: int,
    batch_size: int,
    device: str | None = None,
    progress: bool = True,
    alone: bool = False,
) -> tuple[int, float]:
    """Make ``folder`` hold images ``0..num_images-1`` of ``record`` (only the missing ones are
    sampled, by every process of the launch); ``pipeline`` is a loaded pipeline (with
    ``record.sampling.scheduler`` already set) or a pipeline folder (loaded only if work is left).
    It samples on ``device`` (``process_device``; None: this process's device, or a loaded
    pipeline's own). ``alone``: this process samples them all, whatever the launch (the main process
    of a training run evaluating). Returns (number sampled, seconds)."""
    state = process_state(alone)
    if is_complete(folder, record, num_images):
        return 0, 0.0
    if isinstance(pipeline, ImageDiffusionPipeline):
        pipe = pipeline if device is None else pipeline.to(process_device(device, state))
    else:
        pipe = load_pipeline(Path(pipeline), record.sampling.scheduler, process_device(device, state))
    check_drawable(pipe, record.sampling, record.class_labels)
    check_sampling_fits(pipe.model.config, pipe.device, folder, record.sampling, num_images, batch_size)
    check_claim(folder, record)  # every process refuses alike, before any waits for the others
    # ... and has checked before the main one claims: a process that looked while the record was being
    # written would find a folder "not written by atdiff sample" (the record's temporary file alone).
    state.wait_for_everyone()
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per batch
    with writing_to(folder, OUTPUT_FIX):
        if state.is_main_process:
            claim_folder(folder, record)
        return fill_folder(pipe, folder, record, num_images, batch_size, progress, state)


def process_device(requested: str | None, state: PartialState | OneProcess | None = None) -> str:
    """The device this process samples on: ``requested``, except that under several processes a
    device type (``cuda``) means this process's own device of that type (``cuda:RANK``)."""
    state = state or process_state()
    if requested is None:
        return str(process_state().device)
    check_device(requested)
    if state.num_processes > 1 and torch.device(requested).index is None and torch.device(requested).type == state.device.type:
        return str(state.device)
    return requested
