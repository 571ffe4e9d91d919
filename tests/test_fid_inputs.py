"""`atdiff fid` inputs that need no Inception: statistics files, the FID formula, streamed npz images,
typed sources, and the files an FID input must name when it cannot use them."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest
import torch
import torch_fidelity
from PIL import Image
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

from atdiff.cli import main
from atdiff.errors import UsageError
from atdiff.eval.sources import image_set, resolve_source, source_kind
from atdiff.eval.fid_statistics import FEATURE_DIM, FidStatistics, fid_from_statistics, read_statistics, write_statistics
from atdiff.eval.npz_images import NpzImages

# ------------------------------------------------------------------------------------------------
# Statistics files and the formula
# ------------------------------------------------------------------------------------------------


def random_statistics(seed: int, n: int = 64) -> FidStatistics:
    features = torch.rand(n, FEATURE_DIM, generator=torch.Generator().manual_seed(seed)) ** (seed + 1)
    return FidStatistics.of_features(features, f"random {seed}")


@pytest.mark.parametrize("num_fake, with_features", [(16, True), (300, True), (300, False), (700, False)])
def test_formula_equals_torch_fidelitys(num_fake, with_features):
    # 512-d features: torch-fidelity's d x d eigenvalue problem takes ~20 s at Inception's 2048.
    generator = torch.Generator().manual_seed(num_fake)
    real, fake = torch.rand(700, 512, generator=generator) ** 3, torch.rand(num_fake, 512, generator=generator) ** 2
    real_stats, fake_stats = fid_features_to_statistics(real), fid_features_to_statistics(fake)
    expected = fid_statistics_to_metric(real_stats, fake_stats, False)[torch_fidelity.KEY_METRIC_FID]
    got = fid_from_statistics(real_stats, fake_stats, fake if with_features else None)
    assert got == pytest.approx(expected, rel=1e-6)


def write_format(kind: str, stats: FidStatistics, path) -> None:
    """The files other tools write: ADM's reference batch (np.savez with images and spatial statistics),
    pytorch-fid's --save-stats and clean-fid's (np.savez_compressed of mu and sigma)."""
    if kind == "adm":
        images = np.zeros((4, 8, 8, 3), np.uint8)
        np.savez(path, arr_0=images, mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu[:7], sigma_s=np.eye(7))
    elif kind == "adm-without-images":
        np.savez(path, mu=stats.mu, sigma=stats.sigma, mu_s=stats.mu[:7], sigma_s=np.eye(7))
    elif kind == "pytorch-fid":
        np.savez_compressed(path, mu=stats.mu, sigma=stats.sigma)
    elif kind == "clean-fid":
        np.savez_compressed(path, mu=stats.mu.astype(np.float32), sigma=stats.sigma.astype(np.float32))


@pytest.mark.parametrize("kind", ["adm", "adm-without-images", "pytorch-fid", "clean-fid"])
def test_published_formats_read_as_statistics(kind, tmp_path):
    stats = random_statistics(0)
    path = tmp_path / f"{kind}.npz"
    write_format(kind, stats, path)
    assert source_kind(str(path)) == ("stats", str(path))  # no prefix needed, arr_0 or not
    read = resolve_source(str(path))
    tolerance = 1e-6 if kind == "clean-fid" else 0  # clean-fid stores float32
    np.testing.assert_allclose(read.mu, stats.mu, rtol=tolerance)
    np.testing.assert_allclose(read.sigma, stats.sigma, rtol=tolerance, atol=tolerance)
    assert read.num_images is None
    if kind == "adm":  # its images stay reachable with the npz: prefix
        assert len(image_set(f"npz:{path}")) == 4


def test_atdiff_statistics_round_trip_with_metadata(tmp_path):
    stats = random_statistics(1)
    stats.feature_extractor = "inception-v3-compat (test)"
    write_statistics(stats, tmp_path / "s.npz")
    read = read_statistics(tmp_path / "s.npz")
    assert read.num_images == 64 and read.feature_extractor == "inception-v3-compat (test)"
    np.testing.assert_array_equal(read.sigma, stats.sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temporary file left


def test_a_covariance_that_is_negative_is_refused_through_the_cli(tmp_path, capsys):
    """The issue's case: sigma = -I made `atdiff fid` print a FID of -1591 with exit 0."""
    good, bad = tmp_path / "good.npz", tmp_path / "bad.npz"
    write_statistics(random_statistics(0), good)
    np.savez(bad, mu=np.zeros(FEATURE_DIM), sigma=-np.eye(FEATURE_DIM))
    assert main(["fid", f"stats:{good}", f"stats:{bad}"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(f"atdiff fid: error: {bad}: sigma is not a covariance") and len(err.splitlines()) == 1


def test_fid_is_never_negative(tmp_path):
    stats = random_statistics(2)
    assert fid_from_statistics(stats, stats) == 0.0  # identical sets: rounding alone gives about -4e-5 here
    not_psd = FidStatistics(stats.mu, -np.eye(FEATURE_DIM), "made in code, never read from a file")  # the issue's -1591
    with pytest.raises(UsageError, match="FID came out negative"):
        fid_from_statistics(stats, not_psd)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"mu": np.zeros(512), "sigma": np.eye(512)}, "512-d statistics"),
        ({"mu": np.zeros(FEATURE_DIM), "sigma": np.eye(3)}, "not a \\(d,\\) mean"),
        ({"mu": np.full(FEATURE_DIM, np.nan), "sigma": np.eye(FEATURE_DIM)}, "non-finite"),
        ({"mu": np.array([{"a": 1}], dtype=object), "sigma": np.eye(2)}, "mu holds object, not real numbers"),
        ({"mu": np.zeros(FEATURE_DIM), "sigma": -np.eye(FEATURE_DIM)}, "sigma is not a covariance \\(a negative eigenvalue, -1"),
        ({"mu": np.zeros(FEATURE_DIM), "sigma": np.triu(np.ones((FEATURE_DIM, FEATURE_DIM)))}, "sigma is not a covariance \\(not symmetric"),
    ],
)
def test_bad_statistics_files_are_refused(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UsageError, match=message):
        resolve_source(f"stats:{path}")


# ------------------------------------------------------------------------------------------------
# Images in an npz, streamed
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_images_are_read_lazily(tmp_path, save):
    images = np.random.default_rng(0).integers(0, 256, (256, 64, 64, 3), dtype=np.uint8)  # 3 MB
    path = tmp_path / "images.npz"
    save(path, arr_0=images)
    expected = lambda i: torch.from_numpy(images[i].transpose(2, 0, 1))  # noqa: E731
    tracemalloc.start()
    try:
        dataset = image_set(str(path))
        same = all(torch.equal(dataset[i], expected(i)) for i in range(len(dataset)))  # in order, as a DataLoader reads
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert same and len(dataset) == 256
    assert peak < images.nbytes / 8, f"peak {peak} bytes for a {images.nbytes}-byte array: not streamed"
    assert torch.equal(dataset[200], expected(200)) and torch.equal(dataset[3], expected(3))  # random access too
    if save is np.savez:
        assert isinstance(dataset.images._array, np.memmap)  # stored uncompressed: memory-mapped


def test_npz_channels_first_and_truncated(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (8, 3, 16, 16), dtype=np.uint8)
    np.savez(tmp_path / "nchw.npz", images=images)
    assert torch.equal(image_set(str(tmp_path / "nchw.npz"))[5], torch.from_numpy(images[5]))
    data = (tmp_path / "nchw.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UsageError, match="cut.npz: not a readable .npz"):
        image_set(str(tmp_path / "cut.npz"))


def test_npz_dataset_survives_pickling_for_workers(tmp_path):
    import pickle

    np.savez_compressed(tmp_path / "c.npz", arr_0=np.ones((4, 8, 8, 1), np.uint8))
    dataset = NpzImages(tmp_path / "c.npz", "arr_0")
    dataset[1]  # opens its stream
    assert torch.equal(pickle.loads(pickle.dumps(dataset))[2], dataset[2])


# ------------------------------------------------------------------------------------------------
# Typed sources
# ------------------------------------------------------------------------------------------------


def write_pngs(folder, sizes) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        paths.append(folder / f"{i:06d}.png")
        Image.new("RGB", (size, size), (i * 40, 0, 0)).save(paths[-1])
    return paths


def test_folder_named_like_a_dataset_is_ambiguous_until_prefixed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_pngs(tmp_path / "fashion-mnist", [8, 8])
    with pytest.raises(UsageError, match="ambiguous.*folder, dataset; write folder:fashion-mnist or dataset:fashion-mnist"):
        image_set("fashion-mnist")
    assert len(image_set("folder:fashion-mnist")) == 2
    assert source_kind("dataset:fashion-mnist") == ("dataset", "fashion-mnist")
    assert source_kind("fashion-mnist:test@32") == ("dataset", "fashion-mnist:test@32")


def test_prefixes_are_checked(tmp_path):
    write_pngs(tmp_path / "imgs", [8, 8])
    cases = [
        (f"pipeline:{tmp_path / 'imgs'}", "not a pipeline folder"),
        (f"folder:{tmp_path / 'nothing'}", "no such folder"),
        ("dataset:imagenet", "not a dataset spec"),
        (f"stats:{tmp_path / 'imgs' / '000000.png'}", "not a readable statistics"),
    ]
    for source, message in cases:
        with pytest.raises(UsageError, match=message):
            resolve_source(source)


def test_unreadable_and_mixed_size_images_are_named(tmp_path):
    paths = write_pngs(tmp_path / "mixed", [8, 8, 6])
    with pytest.raises(UsageError, match=r"000002.png is 6x6 but .*000000.png is 8x8"):
        [image_set(str(tmp_path / "mixed"))[i] for i in range(3)]
    paths = write_pngs(tmp_path / "broken", [8, 8, 8])
    paths[1].write_bytes(paths[1].read_bytes()[:40])  # truncated
    with pytest.raises(UsageError, match="000001.png is not a readable image"):
        [image_set(str(tmp_path / "broken"))[i] for i in range(3)]
    paths[1].write_text("not an image")
    with pytest.raises(UsageError, match="000001.png is not a readable image"):
        image_set(str(tmp_path / "broken"))[1]
    os.remove(paths[1])
    paths[0].write_text("not an image")  # the first image sets the size: named when the set is opened
    with pytest.raises(UsageError, match="000000.png is not a readable image"):
        image_set(str(tmp_path / "broken"))


def test_image_too_large_to_be_real_is_named(tmp_path, monkeypatch):
    """PIL refuses a decompression bomb with its own error, which ImageFolder training and FID both name."""
    write_pngs(tmp_path / "bomb", [8, 8])
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # an 8x8 image is then over twice the limit
    with pytest.raises(UsageError, match=r"000000.png is not a readable image \(Image size \(64 pixels\) exceeds limit"):
        image_set(str(tmp_path / "bomb"))
