"""Metrics of two image sets from their Inception features: FID, sFID, KID, precision/recall, Inception Score.

The sides are what ``atdiff.eval.sources`` resolves (image sets, statistics files, ADM reference
batches); nothing here samples. torch-fidelity extracts the features with the 2015-12-05 TF
Inception-v3 weights (``atdiff.eval.inception``, which adds ADM's spatial features) and computes KID,
precision/recall (k = 3, as ADM's evaluator) and its own Inception Score; FID and sFID come from the
statistics (``fid_statistics``). ``MetricChoices.adm()`` is the table ADM, DiT, SiT and REPA report
(guided-diffusion's ``evaluations/evaluator.py``): FID, sFID, Inception Score, precision, recall.

Features and statistics of dataset specs and configs are cached under ``cache_dir()/fid``
(``fid_cache``: safetensors, npz and JSON, never pickles), keyed by dataset, split, resolution, count
and weights, so repeated comparisons against one reference set extract its features once. Files are
never cached: they may change under the same name.

Under ``accelerate launch`` each process extracts the features of a contiguous share of every image
set and all of them get the whole set back, in order; the metrics are then computed once, on the
main process, and handed to the others.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch_fidelity
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather
from torch.utils.data import Dataset, Subset
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.metric_isc import isc_features_to_metric
from torch_fidelity.metric_kid import kid_features_to_metric
from torch_fidelity.metric_prc import prc_features_to_metric
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from atdiff.devices import check_device, process_state
from atdiff.errors import UsageError
from atdiff.files import cache_dir

from .fid_cache import FeatureCache
from .fid_statistics import FidStatistics, fid_from_statistics, spatial_statistics, write_statistics
from .inception import FEATURE_DIMS, FUSED_INCEPTION_NAME, SPATIAL_LAYER, InceptionWeights, resolve_inception_weights
from .sources import ImageSet, PipelineSource, ReferenceBatch, Side, resolve_source

# torch-fidelity's layers of its Inception: pool_3 for FID, KID and precision/recall; the classifier's
# logits without its bias for Inception Score, which is also what ADM's evaluator takes the softmax of.
FID_LAYER = FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("fid")
LOGITS_LAYER = FeatureExtractorInceptionV3.get_default_feature_layer_for_metric("isc")
KID_SUBSET_SIZE = 1000  # torch-fidelity's default; lowered to the set size for smaller sets
PRC_NEIGHBORHOOD = 3  # k of the k-NN balls: ADM's evaluator and torch-fidelity's default
ADM_ISC_SPLIT = 5000  # ADM's Inception Score: the mean over parts of this many images, in order


@dataclass(frozen=True)
class MetricChoices:
    """The metrics computed besides FID, which always is."""

    sfid: bool = False  # ADM's spatial FID ("sfid")
    kid: bool = False  # "kid_mean", "kid_std"
    prc: bool = False  # "precision", "recall", "f_score"
    isc: bool = False  # torch-fidelity's Inception Score over 10 shuffled parts: "isc_mean", "isc_std"
    adm_isc: bool = False  # ADM's Inception Score over 5000-image parts in order: "inception_score"
    kid_subset_size: int | None = None  # None: KID_SUBSET_SIZE, or the smaller set's size

    @classmethod
    def adm(cls, **others) -> MetricChoices:
        """ADM's evaluation table: FID, sFID, Inception Score, precision and recall."""
        return cls(**{"sfid": True, "prc": True, "adm_isc": True, **others})

    @property
    def needs_logits(self) -> bool:
        return self.isc or self.adm_isc

    @property
    def layers(self) -> list[str]:
        """The Inception layers these metrics read."""
        return [FID_LAYER] + [SPATIAL_LAYER] * self.sfid + [LOGITS_LAYER] * self.needs_logits


@dataclass(frozen=True)
class ExtractorSettings:
    """How Inception features are extracted."""

    inception_weights: str | Path | None = None  # None: see ``resolve_inception_weights``
    batch_size: int = 64  # images per Inception call
    cache: bool = True  # read and write the reference cache
    cache_root: str | Path | None = None  # None: cache_dir()/fid
    device: str | None = None  # None: cuda if available
    verbose: bool = False  # progress on stderr (the main process's only)
    # Under accelerate launch: share the work with the other processes, which must make the same call.
    # False: this process alone (the training loop's evals run on its main process only).
    all_processes: bool = True


# ------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------


class InceptionFeatures:
    """Inception features and statistics of image sets, through the reference cache, each set shared
    out over the launch's processes; the network is built on first use. Constructing one checks the
    settings, so bad ones stop a run before any work."""

    def __init__(self, settings: ExtractorSettings, layers: Sequence[str] = (FID_LAYER,)):
        if settings.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1, got {settings.batch_size}")
        self.weights: InceptionWeights = resolve_inception_weights(settings.inception_weights)
        if LOGITS_LAYER in layers and not self.weights.has_logits:
            raise UsageError(
                f"Inception Score needs the Inception classifier, and {self.weights.source} has none (it is the conv "
                f"stack only, as clean-fid/StyleGAN's FID file). Drop --isc/--adm, or pass torch-fidelity's own weights "
                f"with --inception-weights (weights-inception-2015-12-05-6726825d.pth, downloaded on first use online)"
            )
        self.cuda = _wants_cuda(settings.device)
        self.settings, self.layers = settings, sorted(set(layers))
        self.cache = FeatureCache((settings.cache_root or cache_dir() / "fid") if settings.cache else None)
        self.state = process_state(alone=not settings.all_processes)
        self._network: torch.nn.Module | None = None

    def features(self, images: ImageSet) -> dict[str, torch.Tensor]:
        """Every layer's features of ``images``, in their order: from the cache, else extracted."""
        key = self._cache_key(images)
        cached = self.cache.features(key, self.layers)
        if _everyone(cached is not None, self.state):  # a process that alone extracted would wait for the others forever
            return cached
        features = self._extract(images)
        if self.state.is_main_process:
            self.cache.store(key, features, self._statistics(images, features))
        return features

    def statistics_of(self, side: Side, features: dict[str, torch.Tensor] | None = None) -> FidStatistics:
        """The statistics of ``side``: its own for a statistics file, else from ``features``, the cache or extraction."""
        if isinstance(side, FidStatistics):
            return side
        if features is None:
            cached = self.cache.statistics(self._cache_key(side))
            usable = cached is not None and (SPATIAL_LAYER not in self.layers or cached.spatial is not None)
            if _everyone(usable, self.state):
                return cached
            features = self.features(side)
        return self._statistics(side, features)

    def _statistics(self, images: ImageSet, features: dict[str, torch.Tensor]) -> FidStatistics:
        return FidStatistics.of_features(features[FID_LAYER], images.description, self.weights.description, features.get(SPATIAL_LAYER))

    def _cache_key(self, images: ImageSet) -> str | None:
        # The weights are part of the key: statistics of other weights are other numbers.
        return None if images.cache_name is None else f"{images.cache_name}-w{self.weights.digest}-{FUSED_INCEPTION_NAME}"

    def _extract(self, images: ImageSet) -> dict[str, torch.Tensor]:
        state, total = self.state, len(images)
        if state.num_processes == 1:
            return self._run(images)
        # Contiguous shares: gathered in rank order they are the set in its order; only the last ones are short.
        share = math.ceil(total / state.num_processes)
        start, stop = min(total, state.process_index * share), min(total, (state.process_index + 1) * share)
        if stop > start:
            mine = self._run(Subset(images, range(start, stop)))
        else:
            mine = {layer: torch.empty(0, FEATURE_DIMS[layer]) for layer in self.layers}
        return {layer: _gather_shares(mine[layer], share, total, state) for layer in self.layers}

    def _run(self, images: Dataset) -> dict[str, torch.Tensor]:
        if self._network is None:
            self._network = create_feature_extractor(
                FUSED_INCEPTION_NAME, self.layers, cuda=self.cuda, verbose=self._verbose,
                feature_extractor_weights_path=self.weights.path,
            )
        # No DataLoader workers (save_cpu_ram): decoding 32x32 PNGs is <1% of the Inception's time, and on a
        # few cores worker processes only take CPU from its threads.
        return get_featuresdict_from_dataset(images, self._network, self.settings.batch_size, self.cuda, True, self._verbose)

    @property
    def _verbose(self) -> bool:
        return self.settings.verbose and self.state.is_main_process


def _gather_shares(mine: torch.Tensor, share: int, total: int, state: PartialState) -> torch.Tensor:
    """Every process's ``mine`` (at most ``share`` rows), concatenated in rank order, the first ``total`` rows."""
    padded = torch.zeros(share, *mine.shape[1:], dtype=mine.dtype)
    padded[: len(mine)] = mine
    return gather(padded.to(state.device))[:total].cpu()  # equal shapes, as all_gather needs; the padding is at the end


def _everyone(flag: bool, state: PartialState) -> bool:
    """Whether ``flag`` holds on every process (on its own, in a one-process run)."""
    if state.num_processes == 1:
        return flag
    return bool(gather(torch.tensor([flag], device=state.device)).all())


def _wants_cuda(device: str | None) -> bool:
    if device is None:
        return torch.cuda.is_available()
    check_device(device)
    return torch.device(device).type == "cuda"


def check_settings(metrics: MetricChoices, extractor: ExtractorSettings) -> None:
    """Stop on settings that ``compute_metrics`` would refuse, before work that precedes it (sampling)."""
    InceptionFeatures(extractor, metrics.layers)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def compute_metrics(
    real, fake, *, num_real: int | None = None, num_fake: int | None = None, metrics: MetricChoices = MetricChoices(),
    extractor: ExtractorSettings = ExtractorSettings(),
) -> dict:
    """FID between two image sets and the ``metrics`` chosen besides (KID, precision/recall, Inception Score of ``fake``).

    ``real``/``fake``: any source ``sources.resolve_source`` reads but a pipeline folder (a folder,
    ``.npz`` of images or statistics, dataset spec, config ``.yaml``, ``DataConfig``, ``DatasetSpec``,
    ``ImageSet``, ``FidStatistics``); ``num_*`` subsample them (seeded).
    Returns a flat dict: ``fid`` [``sfid``] [``kid_mean``, ``kid_std``] [``precision``, ``recall``,
    ``f_score``] [``isc_mean``, ``isc_std``] [``inception_score``], ``num_real``, ``num_fake`` (null for
    statistics files that do not say), ``feature_extractor``, ``real``, ``fake`` and ``real_from_cache``
    (True when no real image had to be read). ``sfid`` is null, with a note on stderr, when a statistics
    file lacks ``mu_s``/``sigma_s``.
    """
    extraction = InceptionFeatures(extractor, metrics.layers)
    real_side, fake_side = _side(real, num_real), _side(fake, num_fake)
    _refuse_metrics_of_statistics(real_side, fake_side, metrics)
    real_images, fake_images = images_of(real_side), images_of(fake_side)
    for side, name in ((real_side, "real"), (fake_side, "fake")):
        if isinstance(side, ImageSet) and len(side) < 2:
            raise UsageError(f"FID needs at least 2 images on each side, got {len(side)} {name}")
    if metrics.prc and min(len(real_images), len(fake_images)) <= PRC_NEIGHBORHOOD:
        raise UsageError(f"precision/recall need more than {PRC_NEIGHBORHOOD} images on each side (k-NN balls, k = {PRC_NEIGHBORHOOD})")
    smaller = min(len(real_images), len(fake_images)) if metrics.kid else 0
    if metrics.kid and metrics.kid_subset_size is not None and not 1 < metrics.kid_subset_size <= smaller:
        raise UsageError(f"--kid-subset-size {metrics.kid_subset_size}: must be between 2 and the smaller set's size, {smaller}")
    spatial_missing = _spatial_missing(real_side, fake_side) if metrics.sfid else []

    fake_features = extraction.features(fake_images) if fake_images is not None and (
        isinstance(fake_side, ImageSet) or metrics.kid or metrics.prc or metrics.needs_logits) else None
    fake_stats = extraction.statistics_of(fake_side, fake_features if isinstance(fake_side, ImageSet) else None)
    real_features = extraction.features(real_images) if metrics.kid or metrics.prc else None
    real_stats = extraction.statistics_of(real_side, real_features if isinstance(real_side, ImageSet) else None)

    def table() -> dict:
        if spatial_missing:
            print(f"atdiff fid: no sFID: it needs spatial statistics (mu_s, sigma_s), and {' and '.join(spatial_missing)} "
                  "has none (`atdiff fid --save-stats` writes them)", file=sys.stderr)
        return metric_values(metrics, real_stats, fake_stats, real_features, fake_features,
                             fake_from_features=isinstance(fake_side, ImageSet), verbose=extractor.verbose)

    out = on_main_process(table, extraction.state)
    count = lambda side: side.num_images if isinstance(side, FidStatistics) else len(side)  # noqa: E731
    out.update(
        num_real=count(real_side),
        num_fake=count(fake_side),
        feature_extractor=extraction.weights.description,
        real=real_side.description,
        fake=fake_side.description,
        real_from_cache=real_images is None or real_images.reads == 0,
    )
    return out


def metric_values(
    metrics: MetricChoices, real: FidStatistics, fake: FidStatistics, real_features: dict[str, torch.Tensor] | None,
    fake_features: dict[str, torch.Tensor] | None, *, fake_from_features: bool = True, verbose: bool = False,
) -> dict[str, float | None]:
    """The ``metrics`` of two sides from their statistics and features (layer -> (N, d), in image order).
    ``fake_from_features``: ``fake`` was computed from ``fake_features`` (FID then takes a faster route to
    the same number; not so for a reference batch, whose statistics are not its images'). ``sfid`` is
    None where a side has no spatial statistics."""
    own = lambda layer: fake_features[layer] if fake_from_features else None  # noqa: E731
    out = {"fid": fid_from_statistics(real, fake, own(FID_LAYER))}
    if metrics.sfid:
        spatial = real.spatial is not None and fake.spatial is not None
        out["sfid"] = fid_from_statistics(real.spatial, fake.spatial, own(SPATIAL_LAYER)) if spatial else None
    if metrics.kid:
        smaller = min(len(real_features[FID_LAYER]), len(fake_features[FID_LAYER]))
        subset = metrics.kid_subset_size or min(KID_SUBSET_SIZE, smaller)
        kid = kid_features_to_metric(fake_features[FID_LAYER], real_features[FID_LAYER], kid_subset_size=subset, verbose=verbose)
        out.update(kid_mean=kid[torch_fidelity.KEY_METRIC_KID_MEAN], kid_std=kid[torch_fidelity.KEY_METRIC_KID_STD])
    if metrics.prc:  # torch-fidelity's convention: input1 is generated, input2 real (precision: fakes on the real manifold)
        prc = prc_features_to_metric(fake_features[FID_LAYER], real_features[FID_LAYER], prc_neighborhood=PRC_NEIGHBORHOOD,
                                     save_cpu_ram=True, verbose=verbose)
        out.update(precision=prc[torch_fidelity.KEY_METRIC_PRECISION], recall=prc[torch_fidelity.KEY_METRIC_RECALL],
                   f_score=prc[torch_fidelity.KEY_METRIC_F_SCORE])
    if metrics.isc:
        isc = isc_features_to_metric(fake_features[LOGITS_LAYER])
        out.update(isc_mean=isc[torch_fidelity.KEY_METRIC_ISC_MEAN], isc_std=isc[torch_fidelity.KEY_METRIC_ISC_STD])
    if metrics.adm_isc:
        out["inception_score"] = adm_inception_score(fake_features[LOGITS_LAYER])
    return {key: value if value is None else float(value) for key, value in out.items()}


def adm_inception_score(logits: torch.Tensor, split_size: int = ADM_ISC_SPLIT) -> float:
    """ADM's Inception Score: exp E_x[KL(p(y|x) || p(y))] on each run of ``split_size`` images in
    order (the last one shorter), averaged. torch-fidelity's formula per part; not its own split,
    which shuffles the images and cuts them into 10 equal parts (random 5000s of 50k)."""
    parts = logits.split(split_size)
    return float(np.mean([isc_features_to_metric(part, splits=1, shuffle=False)[torch_fidelity.KEY_METRIC_ISC_MEAN] for part in parts]))


def save_statistics(source, out: str | Path, *, num: int | None = None, extractor: ExtractorSettings = ExtractorSettings()) -> dict:
    """Write the statistics of ``source`` (any source of ``compute_metrics``, ``num`` of its images) to
    the ``.npz`` ``out``: ``mu``, ``sigma``, which every FID tool reads, and sFID's ``mu_s``, ``sigma_s``
    as ADM's reference batches hold them; returns what was written."""
    out = Path(out)
    check_statistics_out(out)
    extraction = InceptionFeatures(extractor, [FID_LAYER, SPATIAL_LAYER])
    stats = extraction.statistics_of(_side(source, num))

    def write() -> dict:  # once every process has checked ``out``: no process finds the main one's file there
        write_statistics(stats, out)
        return {"saved": str(out), "source": stats.description, "num_images": stats.num_images, "feature_extractor": stats.feature_extractor}

    return on_main_process(write, extraction.state)


def check_statistics_out(out: Path) -> None:
    """Refuse an ``--save-stats`` file that exists, is not named ``.npz`` or has no folder."""
    if out.suffix != ".npz":
        raise UsageError(f"--save-stats {out}: name the file .npz")
    if out.exists():
        raise UsageError(f"--save-stats {out} exists; delete it or choose another name")
    if not out.parent.is_dir():
        raise UsageError(f"--save-stats {out}: no folder {out.parent}")


def images_of(side: Side) -> ImageSet | None:
    """The images of a side: an image set's own, an ADM reference batch's ``arr_0``; None for statistics alone."""
    if isinstance(side, ReferenceBatch):
        return side.images
    return side if isinstance(side, ImageSet) else None


def on_main_process(compute: Callable[[], dict], state: PartialState | None = None) -> dict:
    """``compute()`` run once, on the main process, its result (or its error) handed to every process."""
    state = state or process_state()
    if state.num_processes == 1:
        return compute()
    outcome: list = [None]
    if state.is_main_process:
        try:
            outcome = [("result", compute())]
        except Exception as err:  # the others must not wait for a result that never comes
            outcome = [("usage" if isinstance(err, UsageError) else "error", str(err))]
            broadcast_object_list(outcome)
            raise
    broadcast_object_list(outcome)  # pickled between this launch's own processes, never read from a file
    kind, value = outcome[0]
    if kind == "usage":
        raise UsageError(value)
    if kind == "error":
        raise RuntimeError(f"the main process failed: {value}")
    return value


def _side(source, num: int | None) -> Side:
    side = resolve_source(source, num)
    if isinstance(side, PipelineSource):
        raise UsageError(f"{side.path} is a pipeline folder: sample it first (`atdiff fid` does, or `atdiff sample`)")
    return side


def _spatial_missing(real: Side, fake: Side) -> list[str]:
    """The statistics sides that hold no sFID statistics (checked where they do)."""
    return [side.description for side in (real, fake) if isinstance(side, FidStatistics) and spatial_statistics(side) is None]


def _refuse_metrics_of_statistics(real: Side, fake: Side, metrics: MetricChoices) -> None:
    """KID and precision/recall compare features, Inception Score needs logits: statistics alone have neither."""
    alone = lambda side: images_of(side) is None  # noqa: E731
    wanted = [name for name, on, sides in (("KID", metrics.kid, (real, fake)), ("precision/recall", metrics.prc, (real, fake)),
                                           ("Inception Score", metrics.needs_logits, (fake,)))
              if on and any(alone(side) for side in sides)]
    if wanted:
        stats = next(side for side in (fake, real) if alone(side))
        raise UsageError(
            f"{' and '.join(wanted)} need the images' features, and {stats.description} holds only FID statistics; "
            f"pass the images (an ADM reference batch with its arr_0 images will do) or drop --kid/--prc/--isc/--adm"
        )
