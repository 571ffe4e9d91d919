"""``atdiff sample``: generate images from a pipeline folder into PNGs, a grid (PNG or JPEG) or an npz.

Every image ``i`` has its own noise generator (seeded from ``--seed`` and ``i``) and its own class
label, so it is the same image whatever the batch size or the order of the runs. That makes
sampling resumable: PNGs are written one by one (atomically), and a rerun of the same command
samples only the missing indices. A grid or npz is assembled from such PNGs in ``OUT.partial/``
once all of them exist. Each output records the settings it was sampled with (a folder in
``atdiff_sample.json``, a grid or npz inside the file), and is never filled or replaced with others.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from .config import SamplingConfig, read_yaml, section_from_dict
from .devices import check_device
from .errors import UsageError, one_line, writing_to
from .files import atomic_path, check_writable, write_atomic
from .integrity import read_model_index
from .limits import check_disk, check_forward, check_memory, model_batch, png_folder_bytes
from .objectives import ObjectiveConfig
from .pipelines import SCHEDULER_NAMES, ImageDiffusionPipeline, scheduler_by_name
from .pipelines.trust import check_no_code_from_folder
from .settings import check_range, check_section, rule_of

SETTINGS_FILE = "atdiff_sample.json"
RECORD_KEY = "atdiff_sample"  # where a grid (PNG text chunk, JPEG comment) or npz keeps its settings
GRID_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}
OUTPUT_FIX = "free space or write elsewhere"


@dataclass
class SampleRecord:
    """What determines a folder's images; a folder is only ever filled with one of these."""

    pipeline: str
    sampling: SamplingConfig
    class_labels: list[int] | None = None  # cycled over image indices; None: index % num_classes

    def flat(self) -> dict:
        """As ``atdiff_sample.json`` (and a grid's or npz's metadata) holds it."""
        return {"pipeline": self.pipeline, **asdict(self.sampling), "class_labels": self.class_labels}


# The sampling flags of `sample`, `fid` and `compare`, and the SamplingConfig field each one sets.
SAMPLING_FLAGS = {"scheduler": "scheduler", "steps": "num_inference_steps", "guidance": "guidance_scale",
                  "guidance_channels": "guidance_channels", "seed": "seed"}


def add_sampling_arguments(parser, defaults: str = "the run's config.yaml `sampling` section") -> None:
    """``--scheduler --steps --guidance --guidance-channels --seed`` on ``parser`` (or an argument
    group); unset flags leave ``defaults`` (described in the help) alone, see ``sampling_overrides``."""
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES, help=f"sampler (sampling.scheduler); default: {defaults}, else the model's own")
    parser.add_argument("--steps", type=int, help=f"sampler steps (sampling.num_inference_steps); default: {defaults}")
    parser.add_argument("--guidance", type=float, help=f"classifier-free guidance scale, 1: none (sampling.guidance_scale); default: {defaults}")
    parser.add_argument(
        "--guidance-channels", type=int, metavar="N",
        help=f"guide only the first N channels (3: DiT/SiT's convention on 4-channel latents, as in their papers; "
        f"sampling.guidance_channels); default: {defaults}, else all",
    )
    parser.add_argument("--seed", type=int, help=f"image i's noise depends only on (seed, i) (sampling.seed); default: {defaults}")


# How a range error names a field: its value came from the flag or from a config's sampling section.
FLAG_NAMES = {key: f"--{flag.replace('_', '-')} (sampling.{key})" for flag, key in SAMPLING_FLAGS.items()}


def check_sampling(sampling: SamplingConfig) -> None:
    check_section("sampling", sampling, FLAG_NAMES)


def sampling_overrides(args: argparse.Namespace) -> dict:
    """The SamplingConfig fields the user set with sampling flags."""
    return {key: getattr(args, flag) for flag, key in SAMPLING_FLAGS.items() if getattr(args, flag, None) is not None}


def sampling_for(pipeline_dir: Path, given: SamplingConfig | dict | None = None) -> SamplingConfig:
    """How to sample ``pipeline_dir``: ``given`` when complete, else the run's own ``sampling``
    section (its ``config.yaml``, written by ``atdiff train``) with the fields ``given`` sets."""
    sampling = given if isinstance(given, SamplingConfig) else replace(run_sampling_defaults(pipeline_dir), **(given or {}))
    check_sampling(sampling)
    return sampling


def run_sampling_defaults(pipeline_dir: Path) -> SamplingConfig:
    """The ``sampling`` section of the run's ``config.yaml``, else SamplingConfig's defaults."""
    config = pipeline_dir / "config.yaml"
    if not config.is_file():
        return SamplingConfig()
    raw = read_yaml(config, "the config `atdiff train` wrote, a mapping of sections")
    return section_from_dict(SamplingConfig, raw.get("sampling") or {}, f"{config}: sampling")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", metavar="PIPELINE_DIR", help="folder written by `atdiff train` (or save_pretrained)")
    parser.add_argument("--num-images", type=int, required=True, help="images to generate")
    parser.add_argument("--out", required=True, help="DIR (one PNG per image, 000000.png ...), FILE.png or FILE.jpg (a grid) or FILE.npz (uint8 NHWC in arr_0)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call (does not change the images)")
    add_sampling_arguments(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", metavar="LABEL", help="labels cycled over the images; default: image index %% num_classes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")


# ------------------------------------------------------------------------------------------------
# Checking the input
# ------------------------------------------------------------------------------------------------


def check_pipeline_dir(path: Path) -> None:
    index = path / "model_index.json"
    if not index.is_file():
        from .training.run_dir import LOCK_NAME  # here only: the training package imports Accelerate

        if (path / LOCK_NAME).is_file():
            raise UsageError(
                f"{path} is an `atdiff train` run without its final pipeline (written when training ends); wait for "
                f"it, or finish it with `atdiff train --config {path / 'config.yaml'} --output-dir {path} --resume latest`"
            )
        raise UsageError(f"{path} is not a pipeline folder (no model_index.json); pass the --output-dir of `atdiff train`")
    class_name = read_model_index(path).get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, list) else class_name
    if class_name != ImageDiffusionPipeline.__name__:
        raise UsageError(f"{path} holds a {class_name}, not an atdiff {ImageDiffusionPipeline.__name__}; pass a folder written by `atdiff train`")
    check_no_code_from_folder(path, ImageDiffusionPipeline)
    check_scheduler_tables(path / "scheduler" / "scheduler_config.json")


def check_scheduler_tables(config: Path) -> None:
    """A scheduler builds tables of ``num_train_timesteps`` entries as it loads: the objective's range
    applies (a hand-edited 10^9 would be gigabytes)."""
    try:
        steps = json.loads(config.read_text()).get("num_train_timesteps", 1)
    except (OSError, ValueError, AttributeError):  # no such file, or not a JSON object: loading says so
        return
    if type(steps) is not int:
        raise UsageError(f"{config}: num_train_timesteps must be an integer, got {steps!r}")
    check_range(f"{config}: num_train_timesteps", steps, rule_of(ObjectiveConfig, "num_train_timesteps"))


def output_kind(out: Path) -> str:
    """``"dir"``, ``"grid"`` or ``"npz"``, from the suffix of ``--out``."""
    suffix = out.suffix.lower()
    if suffix in GRID_FORMATS:
        return "grid"
    if suffix == ".npz":
        return "npz"
    if suffix in Image.registered_extensions():
        raise UsageError(f"--out {out}: a grid is written as .png or .jpg; pass one of those, a .npz or a folder")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is an existing file; pass a folder, a .png or .jpg (grid) or a .npz")
    return "dir"


def check_positive(args: argparse.Namespace) -> None:
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")


def check_same_settings(path: Path, previous: dict, current: dict) -> None:
    if previous != current:
        changed = ", ".join(f"{k}: {previous.get(k)!r} -> {v!r}" for k, v in current.items() if previous.get(k) != v)
        raise UsageError(f"{path} holds images sampled with other settings ({changed}); use a new --out or the same settings")


def folder_settings(folder: Path) -> dict | None:
    """The settings ``folder`` was filled with (its ``atdiff_sample.json``); None when it has none we wrote."""
    try:
        settings = json.loads((folder / SETTINGS_FILE).read_text())
    except (OSError, ValueError):  # missing, or not the JSON atdiff sample writes
        return None
    return settings if isinstance(settings, dict) else None


def claim_folder(folder: Path, record: SampleRecord) -> None:
    """Make ``folder`` hold images of ``record`` only: refuse one filled with other settings or other files."""
    record_file = folder / SETTINGS_FILE
    if (previous := folder_settings(folder)) is not None:
        check_same_settings(folder, previous, record.flat())
    elif folder.is_dir() and any(folder.iterdir()):
        raise UsageError(f"{folder} is not empty and was not written by `atdiff sample`; use a new or empty --out")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(record_file, json.dumps(record.flat(), indent=2) + "\n")


# ------------------------------------------------------------------------------------------------
# Sampling
# ------------------------------------------------------------------------------------------------


def image_generator(seed: int, index: int) -> torch.Generator:
    # SeedSequence mixes (seed, index) into independent streams; seed + index would make the runs of
    # seeds 0 and 1 share all but one image.
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))


def image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"


def labels_of(indices: list[int], class_labels: list[int] | None, num_classes: int) -> list[int] | None:
    """Class label of each image index (None for an unconditional model): ``class_labels`` cycled, else balanced."""
    if not num_classes:
        return None
    return [class_labels[i % len(class_labels)] if class_labels else i % num_classes for i in indices]


def save_png_atomically(image: np.ndarray, path: Path) -> None:
    # A run killed mid-write must not leave a truncated PNG that a resumed run would take as done.
    with atomic_path(path) as partial:
        Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(partial, format="PNG")


def fill_folder(
    pipe: ImageDiffusionPipeline, folder: Path, record: SampleRecord, num_images: int, batch_size: int, progress: bool = True
) -> tuple[int, float]:
    """Sample the images ``0..num_images-1`` that ``folder`` lacks; return (number sampled, seconds)."""
    present = png_names(folder)  # one listing, not a stat per index: a large --num-images starts at once
    missing = [i for i in range(num_images) if image_path(folder, i).name not in present]
    if not missing:
        return 0, 0.0
    num_classes = pipe.num_classes
    start = time.perf_counter()
    with tqdm(total=len(missing), unit="img", desc="sampling", disable=not progress) as bar:
        for first in range(0, len(missing), batch_size):
            indices = missing[first : first + batch_size]
            try:
                images = pipe(
                    batch_size=len(indices),
                    class_labels=labels_of(indices, record.class_labels, num_classes),
                    num_inference_steps=record.sampling.num_inference_steps,
                    guidance_scale=record.sampling.guidance_scale,
                    guidance_channels=record.sampling.guidance_channels,
                    generator=[image_generator(record.sampling.seed, i) for i in indices],
                    output_type="np",
                ).images
            except ValueError as err:  # the arguments were checked: non-finite samples
                raise UsageError(f"images {indices[0]}..{indices[-1]}, none of them written: {err}") from None
            for i, image in zip(indices, images):
                save_png_atomically((image * 255).round().astype(np.uint8), image_path(folder, i))
            bar.update(len(indices))
    return len(missing), time.perf_counter() - start


def png_names(folder: Path) -> set[str]:
    return {name for name in os.listdir(folder) if name.endswith(".png")} if folder.is_dir() else set()


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


def read_images(folder: Path, num_images: int) -> np.ndarray:
    """uint8 (N, H, W, C) from ``000000.png ...``."""
    images = [np.asarray(Image.open(image_path(folder, i))) for i in range(num_images)]
    return np.stack([im[..., None] if im.ndim == 2 else im for im in images])


def write_grid(images: np.ndarray, path: Path, record: dict) -> None:
    """A grid image (PNG or JPEG, by suffix) that carries ``record`` in its metadata."""
    from torchvision.utils import make_grid

    grid = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=math.ceil(math.sqrt(len(images))), padding=2)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    format = GRID_FORMATS[path.suffix.lower()]
    with atomic_path(path) as partial:
        if format == "PNG":
            info = PngInfo()
            info.add_text(RECORD_KEY, json.dumps(record))
            image.save(partial, format=format, pnginfo=info)
        else:
            image.save(partial, format=format, quality=95, comment=json.dumps({RECORD_KEY: record}))


def write_npz(images: np.ndarray, labels: np.ndarray | None, path: Path, record: dict) -> None:
    # The ADM evaluator's layout: uint8 NHWC in arr_0, class labels (if any) in arr_1.
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    with atomic_path(path) as partial, open(partial, "wb") as file:  # a file: np.savez would append .npz to a name
        np.savez(file, **arrays, **{RECORD_KEY: np.array(json.dumps(record))})


def read_record(path: Path) -> dict | None:
    """The settings a grid or npz written by ``atdiff sample`` carries; None for any other file."""
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path) as data:
                record = json.loads(str(data[RECORD_KEY])) if RECORD_KEY in data else None
        else:
            with Image.open(path) as image:
                if RECORD_KEY in image.info:  # PNG text chunk
                    record = json.loads(image.info[RECORD_KEY])
                else:
                    record = json.loads(image.info["comment"])[RECORD_KEY]  # JPEG comment
    except (OSError, ValueError, KeyError, TypeError):  # not ours, or not readable: treat it as foreign
        return None
    return record if isinstance(record, dict) else None  # JSON under our key, but not a record we wrote


def check_existing_file(out: Path, record: dict) -> None:
    """Refuse a grid/npz ``out`` that was sampled with other settings or not by ``atdiff sample``."""
    previous = read_record(out)
    if previous is None:
        raise UsageError(f"{out} exists and was not written by `atdiff sample`; use a new --out")
    check_same_settings(out, previous, record)


def load_pipeline(pipeline_dir: Path, scheduler: str | None, device: str) -> ImageDiffusionPipeline:
    """The pipeline of an ``atdiff train`` folder on ``device``, with scheduler ``scheduler`` (a name
    from ``SCHEDULER_NAMES``; None keeps the folder's own)."""
    check_device(device)
    check_pipeline_dir(pipeline_dir)
    try:
        pipe = ImageDiffusionPipeline.from_pretrained(pipeline_dir)
    except UsageError:  # already one line naming the file (a damaged or refused one)
        raise
    # diffusers' errors for a folder whose files do not describe a loadable pipeline (a class the library
    # lacks, weights that do not fit the config, ...): the folder is the user's input.
    except (ValueError, TypeError, KeyError, AttributeError, RuntimeError) as err:
        raise UsageError(f"{pipeline_dir} does not load as an atdiff pipeline: {one_line(str(err))}") from err
    return use_scheduler(pipe, scheduler).to(device)


def use_scheduler(pipe: ImageDiffusionPipeline, scheduler: str | None) -> ImageDiffusionPipeline:
    """``pipe`` sampling with the scheduler named ``scheduler`` (None: its own), built from its saved config."""
    if scheduler is not None:
        try:
            pipe.scheduler = scheduler_by_name(scheduler, pipe.scheduler.config, pipe.config.prediction_type)
        except ValueError as err:
            raise UsageError(str(err)) from None
    return pipe


def sample_into_folder(
    pipeline: ImageDiffusionPipeline | str | Path,
    folder: Path,
    record: SampleRecord,
    num_images: int,
    batch_size: int,
    device: str = "cpu",
    progress: bool = True,
) -> tuple[int, float]:
    """Make ``folder`` hold images ``0..num_images-1`` of ``record`` (only the missing ones are
    sampled); ``pipeline`` is a loaded pipeline (with ``record.sampling.scheduler`` already set) or
    a pipeline folder (loaded only if work is left). Returns (number sampled, seconds)."""
    if folder_settings(folder) == record.flat():
        if all(image_path(folder, i).is_file() for i in range(num_images)):
            return 0, 0.0
    pipe = pipeline if isinstance(pipeline, ImageDiffusionPipeline) else load_pipeline(Path(pipeline), record.sampling.scheduler, device)
    try:
        pipe.check_guidance(record.sampling.guidance_scale)
        pipe.check_guidance_channels(record.sampling.guidance_channels)
        if record.class_labels is not None:
            pipe.check_class_labels(torch.tensor(record.class_labels))
        # Some schedulers take at most num_train_timesteps steps; ask on a copy, before any image.
        copy.deepcopy(pipe.scheduler).set_timesteps(record.sampling.num_inference_steps)
    except ValueError as err:
        raise UsageError(one_line(str(err))) from None
    check_sampling_fits(pipe.model.config, pipe.device, folder, record.sampling, num_images, batch_size)
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per batch
    with writing_to(folder, OUTPUT_FIX):
        claim_folder(folder, record)
        return fill_folder(pipe, folder, record, num_images, batch_size, progress)


def run(args: argparse.Namespace) -> int:
    check_positive(args)
    check_device(args.device)
    pipeline_dir, out = Path(args.pipeline_dir), Path(args.out)
    check_pipeline_dir(pipeline_dir)
    kind = output_kind(out)
    settings = SampleRecord(str(pipeline_dir.resolve()), sampling_for(pipeline_dir, sampling_overrides(args)), args.class_labels)
    record = {**settings.flat(), "num_images": args.num_images}
    if kind != "dir" and out.exists():
        check_existing_file(out, record)
        print(f"{out} already holds these {args.num_images} images; nothing to sample")
        return 0
    check_writable(out)
    folder = out if kind == "dir" else out.with_name(out.name + ".partial")

    pipe = load_pipeline(pipeline_dir, settings.sampling.scheduler, args.device)
    if kind != "dir":  # assembled in memory: the images, then the grid or the npz's copy of them
        check_memory(f"--out {out}: {args.num_images} images in one file", 2 * args.num_images * image_bytes(pipe), "cpu",
                     "write them to a folder (--out DIR)")
    sampled, seconds = sample_into_folder(pipe, folder, settings, args.num_images, args.batch_size)

    if kind != "dir":
        images = read_images(folder, args.num_images)
        with writing_to(out, OUTPUT_FIX):
            if kind == "grid":
                write_grid(images, out, record)
            else:
                labels = labels_of(list(range(args.num_images)), settings.class_labels, pipe.num_classes)
                write_npz(images, None if labels is None else np.array(labels, dtype=np.int64), out, record)
        shutil.rmtree(folder)
    if sampled:
        print(f"sampled {sampled} images in {seconds:.1f} s: {sampled / seconds:.2f} images/s -> {out}")
    else:
        print(f"all {args.num_images} images already in {out}; nothing to sample")
    return 0
