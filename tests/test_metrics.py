"""ADM's evaluation table (FID, sFID, Inception Score, precision, recall) against references written
here from the formulas, sFID's Inception layer, ADM reference batches, and features shared out over
two processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from assets import needs_fashion_mnist, needs_inception_weights
from atdiff.cli import main
from atdiff.eval.fid_statistics import FidStatistics, write_statistics
from atdiff.eval.inception import FUSED_INCEPTION_NAME, INCEPTION_NAME, SPATIAL_LAYER, FusedInceptionV3, resolve_inception_weights
from atdiff.eval.metrics import FID_LAYER, LOGITS_LAYER, MetricChoices, adm_inception_score, metric_values
from atdiff.eval.sources import image_set

# ------------------------------------------------------------------------------------------------
# References, from the formulas (numpy only)
# ------------------------------------------------------------------------------------------------


def reference_fid(real: np.ndarray, fake: np.ndarray, mu_r=None, sigma_r=None) -> float:
    """|mu_r - mu_f|^2 + tr S_r + tr S_f - 2 tr (S_r S_f)^1/2. With S = X^T X / (n - 1) (X centred), the
    square roots of the eigenvalues of S_r S_f are the singular values of X_r X_f^T / (n - 1)... when both
    come from features; against given statistics (mu_r, sigma_r), the eigenvalues of sigma_r S_f."""
    x_f = fake - fake.mean(0)
    s_f = np.cov(fake, rowvar=False)
    if mu_r is None:
        x_r = real - real.mean(0)
        mu_r, sigma_r = real.mean(0), np.cov(real, rowvar=False)
        tr_covmean = np.linalg.svd(x_r @ x_f.T / np.sqrt((len(real) - 1) * (len(fake) - 1)), compute_uv=False).sum()
    else:
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvals(sigma_r @ s_f).real, 0, None)).sum()
    diff = mu_r - fake.mean(0)
    return float(diff @ diff + np.trace(sigma_r) + np.trace(s_f) - 2 * tr_covmean)


def reference_inception_score(logits: np.ndarray, split_size: int) -> float:
    """ADM: exp of the mean KL(p(y|x) || p(y)) over each run of split_size images, averaged over the runs."""
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for start in range(0, len(p), split_size):
        part = p[start : start + split_size]
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def reference_precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """ADM (Kynkäänniemi et al.): a point is on a set's manifold when it lies within the distance from
    some member to that member's k-th nearest neighbour (itself not counted)."""
    def distances(a, b):
        return np.sqrt(np.maximum((a * a).sum(1)[:, None] - 2 * a @ b.T + (b * b).sum(1)[None], 0))

    radius_real = np.sort(distances(real, real), axis=1)[:, k]  # column 0 is the point itself
    radius_fake = np.sort(distances(fake, fake), axis=1)[:, k]
    precision = (distances(fake, real) <= radius_real[None]).any(1).mean()
    recall = (distances(real, fake) <= radius_fake[None]).any(1).mean()
    return float(precision), float(recall)


def clustered(n: int, d: int, seed: int, shift: float) -> np.ndarray:
    """Features near a 4-d subspace: k-NN balls then overlap as real features do (unlike iid noise in d dims)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 4)) + shift) @ np.random.default_rng(99).normal(size=(4, d)) + 0.3 * rng.normal(size=(n, d))


def test_adm_table_equals_the_formulas_on_fixed_features():
    pool_r, pool_f = clustered(80, 2048, 0, 0.0), clustered(60, 2048, 1, 0.4)
    spatial_r, spatial_f = np.abs(clustered(80, 2023, 2, 0.0)), np.abs(clustered(60, 2023, 3, 0.3))
    logits_f = np.random.default_rng(4).normal(size=(60, 1008)) * 3
    real = {FID_LAYER: torch.tensor(pool_r, dtype=torch.float32), SPATIAL_LAYER: torch.tensor(spatial_r, dtype=torch.float32)}
    fake = {FID_LAYER: torch.tensor(pool_f, dtype=torch.float32), SPATIAL_LAYER: torch.tensor(spatial_f, dtype=torch.float32),
            LOGITS_LAYER: torch.tensor(logits_f, dtype=torch.float32)}
    stats = lambda f: FidStatistics.of_features(f[FID_LAYER], "test", spatial_features=f[SPATIAL_LAYER])  # noqa: E731
    got = metric_values(MetricChoices.adm(), stats(real), stats(fake), real, fake)

    as32 = lambda a: a.astype(np.float32).astype(np.float64)  # noqa: E731  (what the tensors hold)
    assert got["fid"] == pytest.approx(reference_fid(as32(pool_r), as32(pool_f)), rel=1e-6)
    assert got["sfid"] == pytest.approx(reference_fid(as32(spatial_r), as32(spatial_f)), rel=1e-6)
    assert got["sfid"] != pytest.approx(got["fid"], rel=1e-2)  # another layer's statistics
    assert got["inception_score"] == pytest.approx(reference_inception_score(as32(logits_f), 5000), rel=1e-6)
    precision, recall = reference_precision_recall(as32(pool_r), as32(pool_f))
    assert 0 < precision < 1 and 0 < recall < 1  # neither trivially 0 nor 1
    assert (got["precision"], got["recall"]) == pytest.approx((precision, recall), abs=1e-6)  # float32 means; a point is 1/60


def test_adm_inception_score_splits_in_order_with_a_short_last_part():
    logits = torch.randn(5003, 1008, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2
    assert adm_inception_score(logits) == pytest.approx(reference_inception_score(logits.numpy(), 5000), rel=1e-9)
    assert adm_inception_score(logits[:30], split_size=7) == pytest.approx(reference_inception_score(logits[:30].numpy(), 7), rel=1e-9)


def test_fid_against_given_statistics_uses_them():
    """A reference batch's mu/sigma (not its images') with the fake side's own features: the formula's
    eigenvalue route, independent of the n x n one the fake features allow."""
    real, fake = clustered(300, 64, 5, 0.0), clustered(40, 64, 6, 0.5)
    mu, sigma = real.mean(0), np.cov(real, rowvar=False)
    fake_t = {FID_LAYER: torch.tensor(fake)}
    given = FidStatistics(mu, sigma, "given")
    got = metric_values(MetricChoices(), given, FidStatistics.of_features(fake_t[FID_LAYER], "fake"), None, fake_t)
    assert got["fid"] == pytest.approx(reference_fid(None, fake, mu, sigma), rel=1e-7)


# ------------------------------------------------------------------------------------------------
# sFID's layer
# ------------------------------------------------------------------------------------------------


@needs_inception_weights
def test_spatial_layer_is_mixed_6d_branch1x1_first_7_channels_in_tf_order():
    path = resolve_inception_weights().path
    stock = FeatureExtractorInceptionV3(INCEPTION_NAME, ["2048"], feature_extractor_weights_path=path)
    fused = FusedInceptionV3(FUSED_INCEPTION_NAME, [SPATIAL_LAYER, "2048"], feature_extractor_weights_path=path)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        spatial, pool = fused(images)
        x = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299), align_corners=False)
        x = (x - 128) / 128
        for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
                     "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c"):
            x = getattr(stock, name)(x)
        by_hand = stock.Mixed_6d.branch1x1(x)  # conv, batch norm, ReLU: the TF graph's mixed_6/conv
        expected_pool = stock(images)[0]
    assert by_hand.shape == (2, 192, 17, 17) and spatial.shape == (2, 2023)
    expected = by_hand[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # (17, 17, 7): TF's NHWC order
    assert torch.allclose(spatial, expected, rtol=0, atol=1e-4)
    assert torch.allclose(pool, expected_pool, rtol=0, atol=1e-4)  # the other layers still come in the asked order


# ------------------------------------------------------------------------------------------------
# ADM reference batches through the command line
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adm_case(tmp_path_factory):
    """An ADM-layout reference batch (arr_0 images, mu/sigma, mu_s/sigma_s from its features), a sample
    batch, weights with a (random) classifier, and the features each set has under those weights."""
    root = tmp_path_factory.mktemp("adm")
    state = torch.load(resolve_inception_weights().path, map_location="cpu", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    state["fc.weight"] = torch.randn(state["fc.weight"].shape, generator=generator) * 0.05
    state["fc.bias"] = torch.randn(state["fc.bias"].shape, generator=generator)
    weights = root / "with-classifier.pth"
    torch.save(state, weights)

    def images(source, n):
        return torch.stack([image_set(source, n)[i] for i in range(n)])

    real, fake = images("fashion-mnist:test@32", 16), images("fashion-mnist:train@32", 12)
    network = FusedInceptionV3(FUSED_INCEPTION_NAME, [FID_LAYER, SPATIAL_LAYER, LOGITS_LAYER], feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        features = {name: dict(zip(network.requested, [f.double().numpy() for f in network(batch)])) for name, batch in (("real", real), ("fake", fake))}
    pool, spatial = features["real"][FID_LAYER], features["real"][SPATIAL_LAYER]
    nhwc = lambda batch: batch.permute(0, 2, 3, 1).numpy()  # noqa: E731
    reference = root / "VIRTUAL_test_labeled.npz"
    np.savez(reference, arr_0=nhwc(real), mu=pool.mean(0), sigma=np.cov(pool, rowvar=False),
             mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False))
    samples = root / "samples.npz"
    np.savez(samples, arr_0=nhwc(fake))
    return reference, samples, weights, features


@needs_fashion_mnist
@needs_inception_weights
def test_adm_reference_batch_gives_the_adm_table(adm_case, capsys):
    reference, samples, weights, features = adm_case
    assert main(["fid", str(reference), str(samples), "--adm", "--inception-weights", str(weights), "--no-cache"]) == 0
    got = json.loads(capsys.readouterr().out)
    real, fake = features["real"], features["fake"]
    # FID and sFID from the batch's statistics; the samples' from their features.
    mu, sigma = real[FID_LAYER].mean(0), np.cov(real[FID_LAYER], rowvar=False)
    assert got["fid"] == pytest.approx(reference_fid(None, fake[FID_LAYER], mu, sigma), rel=1e-4)
    mu_s, sigma_s = real[SPATIAL_LAYER].mean(0), np.cov(real[SPATIAL_LAYER], rowvar=False)
    assert got["sfid"] == pytest.approx(reference_fid(None, fake[SPATIAL_LAYER], mu_s, sigma_s), rel=1e-4)
    assert got["inception_score"] == pytest.approx(reference_inception_score(fake[LOGITS_LAYER], 5000), rel=1e-4)
    # Precision/recall from the batch's own images (arr_0), k = 3.
    precision, recall = reference_precision_recall(real[FID_LAYER], fake[FID_LAYER])
    assert got["precision"] == pytest.approx(precision, abs=1 / 12 + 1e-9) and got["recall"] == pytest.approx(recall, abs=1 / 16 + 1e-9)
    assert got["num_fake"] == 12 and got["real"] == f"{reference} (statistics)" and not got["real_from_cache"]


@needs_fashion_mnist
@needs_inception_weights
def test_statistics_without_spatial_ones_give_fid_and_say_why_no_sfid(adm_case, tmp_path, capsys):
    reference, _, _, features = adm_case
    with np.load(reference) as npz:
        np.savez(tmp_path / "pool-only.npz", mu=npz["mu"], sigma=npz["sigma"])  # pytorch-fid's layout
    fake = torch.tensor(features["fake"][FID_LAYER]), torch.tensor(features["fake"][SPATIAL_LAYER])
    write_statistics(FidStatistics.of_features(fake[0], "fake", spatial_features=fake[1]), tmp_path / "fake.npz")
    assert main(["fid", str(tmp_path / "pool-only.npz"), str(tmp_path / "fake.npz"), "--sfid"]) == 0
    out, err = capsys.readouterr()
    got = json.loads(out)
    assert got["fid"] > 0 and got["sfid"] is None
    assert "no sFID: it needs spatial statistics (mu_s, sigma_s)" in err and "pool-only.npz" in err
    # Both with them: sFID, from no image at all.
    assert main(["fid", str(reference), str(tmp_path / "fake.npz"), "--sfid"]) == 0
    assert json.loads(capsys.readouterr().out)["sfid"] > 0


@needs_fashion_mnist
@needs_inception_weights
def test_adm_refusals(adm_case, tmp_path, capsys):
    reference, samples, _, features = adm_case
    with np.load(reference) as npz:
        np.savez(tmp_path / "bad-spatial.npz", mu=npz["mu"], sigma=npz["sigma"], mu_s=npz["mu_s"][:7], sigma_s=np.eye(7))
    cases = [
        (["fid", str(reference), str(samples), "--adm"], "Inception Score needs the Inception classifier.*--isc/--adm"),
        (["fid", str(tmp_path / "bad-spatial.npz"), str(samples), "--sfid"], "bad-spatial.npz: 7-d statistics; sFID uses"),
        (["fid", str(reference), str(samples), "--prc", "--num-fake", "3"], "more than 3 images on each side"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        out, err = capsys.readouterr()
        assert out == "" and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
        assert re.search(message, err), (argv, err)


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------


@needs_fashion_mnist
@needs_inception_weights
def test_two_processes_give_the_one_process_metrics(tmp_path, capsys):
    folders = {}
    for name, source, n in (("real", "fashion-mnist:test@32", 9), ("fake", "fashion-mnist:train@32", 7)):  # uneven shares
        folders[name] = tmp_path / name
        folders[name].mkdir()
        images = image_set(source, n)
        for i in range(n):
            Image.fromarray(images[i].permute(1, 2, 0).numpy()).save(folders[name] / f"{i:06d}.png")
    args = ["fid", str(folders["real"]), str(folders["fake"]), "--sfid", "--prc", "--kid", "--no-cache"]
    assert main(args) == 0
    alone = json.loads(capsys.readouterr().out)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    # As tests/test_training.py launches: `--multi_gpu` without a visible GPU starts gloo CPU processes.
    command = [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "atdiff", *args]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("{")]  # the main process prints, once
    together = json.loads(line)
    for key in ("fid", "sfid", "kid_mean", "kid_std"):
        assert together[key] == pytest.approx(alone[key], rel=1e-4, abs=1e-7), key
    for key in ("precision", "recall", "num_real", "num_fake", "real", "fake"):
        assert together[key] == alone[key], key
