"""What one side of an FID comparison names: a set of images or a statistics file. Nothing here samples.

A source is an image folder, an ``.npz`` of uint8 images, a statistics ``.npz`` (``mu``, ``sigma``:
ADM reference batches, pytorch-fid, clean-fid, ``atdiff fid --save-stats``), a dataset spec
``NAME[:SPLIT][@RESOLUTION]`` (``fashion-mnist:test@32``), a YAML config (its ``data`` section) or a
pipeline folder written by ``atdiff train``. It is typed by what it is on disk or by a prefix
(``folder:``, ``npz:``, ``stats:``, ``dataset:``, ``config:``, ``pipeline:``); one that could be read
two ways (a folder named like a dataset) is refused with both readings.

``resolve_source`` turns one into an ``ImageSet``, ``FidStatistics`` (a ``ReferenceBatch`` when an
ADM batch also holds images) or, for a pipeline folder, a ``PipelineSource`` that its caller samples
(``atdiff.eval.fid``) and hands back as the ``ImageSet`` of the samples.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.utils import glob_samples_paths

from atdiff.config import load_config
from atdiff.data import DATASETS, DataConfig, load_dataset, read_image
from atdiff.errors import UsageError
from atdiff.generation.folder import SETTINGS_FILE, image_path, png_names

from .fid_statistics import FidStatistics, is_statistics_file, read_statistics
from .npz_images import NpzImages

SUBSET_SEED = 0  # --num-real/--num-fake pick the same images on every run
IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's own default for folders
SPEC_PATTERN = re.compile(r"(?P<dataset>[a-z0-9_-]+)(?::(?P<split>train|test))?(?:@(?P<resolution>\d+))?")
SOURCE_KINDS = ("folder", "npz", "stats", "dataset", "config", "pipeline")  # the prefixes that type a source
# ------------------------------------------------------------------------------------------------
# What a source resolves to
# ------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """A real dataset (``atdiff.data``) and how many of its images to use (None: all)."""

    data: DataConfig
    num: int | None = None

    @property
    def cache_name(self) -> str:
        """Everything that decides the pixels and the count, readable in the cache folder's file names."""
        d = self.data
        parts = [d.dataset, d.split, f"{d.resolution}px", d.resize_mode, f"c{d.num_channels}"]
        if d.root is not None:
            parts.append("root" + hashlib.sha1(str(Path(d.root).expanduser().resolve()).encode()).hexdigest()[:8])
        parts.append(f"n{self.num}" if self.num else "all")
        return "-".join(parts)

    def __str__(self) -> str:
        return f"{self.data.dataset}:{self.data.split}@{self.data.resolution}" + (f" ({self.num} images)" if self.num else "")


class ImageSet(Dataset):
    """One side of a comparison: uint8 (3, H, W) images, as torch-fidelity consumes them.

    ``reads`` counts the images loaded, so a caller can tell a cache hit (nothing read) from a miss.
    """

    def __init__(self, images: Dataset, description: str, cache_name: str | None = None, to_rgb: Callable | None = None):
        self.images, self.description, self.cache_name = images, description, cache_name
        self.to_rgb = to_rgb or (lambda image: image)
        self.reads = 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        self.reads += 1
        return self.to_rgb(self.images[index])


@dataclass
class ReferenceBatch(FidStatistics):
    """An ADM reference batch: statistics of the whole reference set (``mu``, ``sigma``, ``mu_s``,
    ``sigma_s``) plus images of it (``arr_0``), whose features precision/recall and KID need."""

    images: ImageSet | None = None


@dataclass(frozen=True)
class PipelineSource:
    """A pipeline folder (``model_index.json``): its images exist once someone samples them."""

    path: Path


Side = ImageSet | FidStatistics  # what metrics are computed on


def image_set(source, num: int | None = None) -> ImageSet:
    """The images ``source`` names (see the module docstring), ``num`` of them (None: all)."""
    images = resolve_source(source, num)
    if isinstance(images, PipelineSource):
        raise UsageError(f"{images.path} is a pipeline folder: sample it first (`atdiff sample`, or `atdiff fid` samples it)")
    if isinstance(images, ReferenceBatch):
        return images.images
    if isinstance(images, FidStatistics):
        raise UsageError(f"{source} holds FID statistics (mu, sigma), not images; pass the images it came from")
    return images


def resolve_source(source, num: int | None = None) -> ImageSet | FidStatistics | PipelineSource:
    """The images or the statistics ``source`` names, ``num`` images of it (None: all): a string typed
    by ``source_kind``, a ``DataConfig``/``DatasetSpec``, or an ``ImageSet``/``FidStatistics`` (as is)."""
    if isinstance(source, FidStatistics):
        if num is not None:
            _refuse_count(source.description)
        return source
    if isinstance(source, ImageSet):
        return _subset(source, num)
    if isinstance(source, DataConfig):
        source = DatasetSpec(dataclasses.replace(source))
    if isinstance(source, DatasetSpec):
        return _dataset_images(source, num)
    kind, text = source_kind(str(source))
    path = Path(text)
    if kind == "stats":
        if num is not None:
            _refuse_count(text)
        return _statistics_file(path)
    if kind == "dataset":
        spec = parse_dataset_spec(text)
        if spec is None:
            raise UsageError(f"dataset:{text}: not a dataset spec NAME[:SPLIT][@RESOLUTION] with NAME one of {_spec_names()}")
        return _dataset_images(spec, num)
    if kind == "config":
        return _dataset_images(DatasetSpec(load_config(path).data), num)
    if not path.exists():
        raise UsageError(f"{kind}:{text}: no such {'file' if kind == 'npz' else 'folder'}")
    if kind == "pipeline":
        if not (path / "model_index.json").is_file():
            raise UsageError(f"pipeline:{text}: not a pipeline folder (no model_index.json)")
        return PipelineSource(path)
    if kind == "npz":
        return _subset(ImageSet(_npz_images(path), str(path), to_rgb=gray_to_rgb), num)
    if num is not None and (path / SETTINGS_FILE).is_file():
        return sampled_images(path, num, str(path))
    files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
    if not files:
        raise UsageError(f"{path}: no {IMAGE_EXTENSIONS} images directly in it (subfolders are not searched)")
    return _subset(ImageSet(ImageFiles(files), str(path)), num)


def sampled_images(folder: Path, num: int, description: str) -> ImageSet:
    """The first ``num`` images of an ``atdiff sample`` folder. Image i depends only on (seed, i), so
    these are the set a run of ``num`` images writes, whatever else the folder holds."""
    present = png_names(folder)  # one listing: a huge --num-fake is refused at once, not stat by stat
    if num > len(present):
        raise UsageError(f"{folder} holds {len(present)} samples, fewer than the {num} asked for; "
                         f"fill it with `atdiff sample` first or ask for fewer")
    files = [image_path(folder, i) for i in range(num)]
    missing = sum(file.name not in present for file in files)
    if missing:
        raise UsageError(f"{folder} lacks {missing} of the first {num} samples; fill it with `atdiff sample` first")
    return ImageSet(ImageFiles([str(file) for file in files]), description)


def _refuse_count(text: str) -> None:
    raise UsageError(f"{text} holds statistics: --num-real/--num-fake cannot pick images from it")


def _statistics_file(path: Path) -> FidStatistics:
    stats = read_statistics(path)
    if not _npz_members(path) >= {"arr_0"}:
        return stats
    # An ADM reference batch: its statistics are what it is for, its images serve precision/recall.
    images = ImageSet(_npz_images(path), f"{path} (images)", to_rgb=gray_to_rgb)
    return ReferenceBatch(**{f.name: getattr(stats, f.name) for f in dataclasses.fields(stats)}, images=images)


# ------------------------------------------------------------------------------------------------
# Typing a source
# ------------------------------------------------------------------------------------------------


def source_kind(text: str) -> tuple[str, str]:
    """(kind, rest) of a source: from a ``KIND:`` prefix, else from what ``text`` can be read as, which
    must be exactly one thing."""
    prefix, colon, rest = text.partition(":")
    if colon and prefix in SOURCE_KINDS:
        return prefix, rest
    readings = _readings(text)
    if len(readings) == 1:
        return readings[0], text
    if readings:
        listed = " or ".join(f"{kind}:{text}" for kind in readings)
        raise UsageError(f"{text} is ambiguous: it could be read as {', '.join(readings)}; write {listed}")
    raise UsageError(
        f"{text}: not an image folder, .npz (images or statistics), config .yaml, pipeline folder or dataset spec "
        f"NAME[:SPLIT][@RESOLUTION] with NAME one of {_spec_names()}"
    )


def _readings(text: str) -> list[str]:
    """Every kind of source ``text`` can be read as, without a prefix."""
    path, kinds = Path(text), []
    if path.is_dir():
        kinds.append("pipeline" if (path / "model_index.json").is_file() else "folder")
    elif path.is_file() and path.suffix == ".npz":
        # An ADM reference batch holds images (arr_0) and statistics: its statistics are what it is for.
        kinds.append("stats" if is_statistics_file(path) else "npz")
    elif path.is_file() and path.suffix in (".yaml", ".yml"):
        kinds.append("config")
    match = SPEC_PATTERN.fullmatch(text)
    if match is not None and match["dataset"] in DATASETS:
        kinds.append("dataset")
    return kinds


def _spec_names() -> list[str]:
    return [d for d in DATASETS if d != "imagefolder"]


# ------------------------------------------------------------------------------------------------
# Datasets
# ------------------------------------------------------------------------------------------------


def dataset_spec(data: DataConfig, num: int | None = None) -> DatasetSpec:
    """The reference set of a config's ``data`` section, ``num`` of its images (None: all)."""
    return DatasetSpec(dataclasses.replace(data), num)


def parse_dataset_spec(text: str) -> DatasetSpec | None:
    """``NAME[:SPLIT][@RESOLUTION]`` (``fashion-mnist``, ``fashion-mnist:test@32``), or None if ``text`` is none."""
    match = SPEC_PATTERN.fullmatch(text)
    if match is None or match["dataset"] not in DATASETS:
        return None
    if match["dataset"] == "imagefolder":
        raise UsageError(f"{text}: an imagefolder needs its root folder; pass the folder itself or a config naming it")
    fields = {k: v for k, v in match.groupdict().items() if v is not None}
    if "resolution" in fields:
        fields["resolution"] = int(fields["resolution"])
    return DatasetSpec(DataConfig(**fields))


def _dataset_images(spec: DatasetSpec, num: int | None) -> ImageSet:
    spec = DatasetSpec(spec.data, spec.num if num is None else num)
    images = load_dataset(spec.data)
    full = ImageSet(images, str(spec), spec.cache_name, to_rgb=lambda item: gray_to_rgb(to_uint8(item[0])))
    return _subset(full, spec.num)


def gray_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1 or 3, H, W) -> (3, H, W): gray is repeated over R, G, B, as PIL's ``convert("RGB")`` does."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8; exact for images that came from uint8 (``atdiff.data.to_unit_range``)."""
    return ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _subset(images: ImageSet, num: int | None) -> ImageSet:
    """``num`` images picked by a seeded permutation (datasets and folders are often sorted by class)."""
    if num is None:
        return images
    if not 1 <= num <= len(images):
        raise UsageError(f"{images.description}: asked for {num} images, it has {len(images)}")
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(SUBSET_SEED))[:num].sort().values
    return ImageSet(Subset(images.images, picked.tolist()), images.description, images.cache_name, images.to_rgb)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


class ImageFiles(ImagesPathDataset):
    """torch-fidelity's dataset of image files, naming the file that is unreadable or of another size."""

    def __init__(self, files: list[str]):
        super().__init__(files)
        self.size = read_image(files[0], "RGB").size  # every image must have the first one's size

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.files[index]
        image = read_image(path, "RGB")
        if image.size != self.size:
            (w, h), (w0, h0) = image.size, self.size
            raise UsageError(f"{path} is {w}x{h} but {self.files[0]} is {w0}x{h0}; an FID input needs images of one size")
        return self.transforms(image)


def _npz_members(path: Path) -> set[str]:
    with zipfile.ZipFile(path) as archive:
        return {name.removesuffix(".npy") for name in archive.namelist()}


def _npz_images(path: Path) -> NpzImages:
    """The images of an npz in ``arr_0`` (the ADM evaluator's layout) or alone, read lazily."""
    try:
        names = sorted(_npz_members(path))
        if "arr_0" not in names and {"mu", "sigma"} <= set(names):
            raise UsageError(f"{path} holds FID statistics (mu, sigma), not images; pass the images it came from")
        if "arr_0" not in names and len(names) != 1:
            raise UsageError(f"{path}: expected the images in arr_0 (or a single array), found {names}")
        return NpzImages(path, "arr_0" if "arr_0" in names else names[0])
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a readable .npz of images ({err})") from None
