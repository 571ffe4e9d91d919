"""FID statistics (mean and covariance of Inception pool_3 features): files, and the distance between two.

One reader for the formats people publish, all an ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d):
the ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: also ``arr_0`` images and spatial
``mu_s``/``sigma_s``), pytorch-fid's ``--save-stats`` files and clean-fid's stats files. Files that
atdiff writes add ``num_images`` and ``feature_extractor``, and ``mu_s``/``sigma_s`` as ADM's do.
Files are read with ``allow_pickle=False``: a statistics file never runs code.

sFID (ADM's spatial FID) is the same distance on the statistics of other features: the first 7
channels of Inception's ``mixed_6/conv`` (17 x 17 x 7 = 2023 values an image, ``atdiff.eval.inception``).
"""

from __future__ import annotations

import math
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from atdiff.errors import UsageError
from atdiff.files import atomic_path

from .npz_images import read_npy_header

FEATURE_DIM = 2048  # Inception-v3 pool_3, what every published FID statistic holds
SPATIAL_DIM = 17 * 17 * 7  # ADM's sFID features: mixed_6/conv's first 7 channels on its 17 x 17 grid
# Relative to the largest entry / eigenvalue: far above what float32 storage of a true covariance
# gives (~1e-8), far below what makes a FID meaningless.
COVARIANCE_TOLERANCE = 1e-4


@dataclass
class FidStatistics:
    """Mean and covariance of an image set's features, and what they came from."""

    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    description: str
    num_images: int | None = None  # unknown for pytorch-fid/clean-fid/ADM files
    feature_extractor: str | None = None  # unknown for files atdiff did not write
    # sFID's statistics of the same images (a file's mu_s, sigma_s), where known. Their values are checked
    # when sFID asks for them (``spatial_statistics``), so a pair of other features never stops a plain
    # FID; a file with one of the two, or a header no statistics have, is refused on reading (``check_members``).
    spatial: FidStatistics | None = None

    @classmethod
    def of_features(
        cls, features: torch.Tensor, description: str, feature_extractor: str | None = None, spatial_features: torch.Tensor | None = None,
    ) -> FidStatistics:
        stats = fid_features_to_statistics(features.double())
        spatial = None if spatial_features is None else cls.of_features(spatial_features, description, feature_extractor)
        return cls(stats["mu"], stats["sigma"], description, len(features), feature_extractor, spatial)


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def is_statistics_file(path: Path) -> bool:
    """Whether ``path`` is an ``.npz`` holding ``mu`` and ``sigma`` (read from the zip's listing only)."""
    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return {"mu.npy", "sigma.npy"} <= set(archive.namelist())


def read_statistics(path: str | os.PathLike) -> FidStatistics:
    """The statistics in an ADM, pytorch-fid, clean-fid or atdiff ``.npz``; UsageError if it holds none."""
    path = Path(path)
    try:
        check_members(path)
        with np.load(path, allow_pickle=False) as npz:
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            num = int(npz["num_images"]) if "num_images" in npz.files else None
            extractor = str(npz["feature_extractor"]) if "feature_extractor" in npz.files else None
            has_spatial = "mu_s" in npz.files
            spatial = (npz["mu_s"].astype(np.float64), npz["sigma_s"].astype(np.float64)) if has_spatial else None
    except UsageError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a readable statistics .npz ({err})") from None
    check_statistics(mu, sigma, FEATURE_DIM, f"{path}:", ("mu", "sigma"), "FID here uses Inception-v3 pool_3")
    description = f"{path} (statistics)"
    if spatial is not None:
        spatial = FidStatistics(*spatial, description, num, extractor)
    return FidStatistics(mu, sigma, description, num, extractor, spatial)


def check_members(path: Path) -> None:
    """Refuse, from the ``.npy`` headers alone (before any array is read), a statistics file whose
    members are missing, of the wrong kind, or claim more values than any FID statistics hold: a
    damaged header would otherwise have numpy allocate what it claims (terabytes)."""
    headers = npz_headers(path)
    if not {"mu", "sigma"} <= set(headers):
        raise UsageError(f"{path}: not FID statistics (no mu and sigma arrays; it has {sorted(headers)})")
    if ("mu_s" in headers) != ("sigma_s" in headers):
        present, absent = ("mu_s", "sigma_s") if "mu_s" in headers else ("sigma_s", "mu_s")
        raise UsageError(f"{path} has {present} but no {absent}: sFID's statistics come as a pair, so the file is damaged; "
                         f"rewrite it (`atdiff fid --save-stats`) or drop {present}")
    for name, (shape, dtype) in headers.items():
        if name in ("mu", "sigma", "mu_s", "sigma_s"):
            if dtype.kind not in "biuf":
                raise UsageError(f"{path}: {name} holds {dtype}, not real numbers; the file is corrupted or not FID statistics")
            if math.prod(shape) > FEATURE_DIM**2:
                raise UsageError(f"{path}: {name} claims shape {shape}, more values than FID statistics hold "
                                 f"(at most {FEATURE_DIM}x{FEATURE_DIM}); the file is corrupted or not FID statistics")
        elif name == "num_images" and (shape != () or dtype.kind not in "iu"):
            raise UsageError(f"{path}: num_images is {dtype} {shape}, not an integer; the file is corrupted")
        elif name == "feature_extractor" and (shape != () or dtype.kind != "U"):
            raise UsageError(f"{path}: feature_extractor is {dtype} {shape}, not a string; the file is corrupted")


def npz_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every ``.npy`` member of an ``.npz``, read from its header only."""
    headers = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as stream:
                shape, _, dtype = read_npy_header(stream)
            headers[name.removesuffix(".npy")] = (shape, dtype)
    return headers


def check_statistics(mu: np.ndarray, sigma: np.ndarray, dim: int, where: str, names: tuple[str, str], features: str) -> None:
    """UsageError unless ``mu``, ``sigma`` are a finite ``dim``-d mean and covariance (``names``: the
    file's names for them; ``features``: what they should be the statistics of)."""
    m, s = names
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UsageError(f"{where} {m} {mu.shape} and {s} {sigma.shape} are not a (d,) mean and (d, d) covariance")
    if mu.size != dim:
        raise UsageError(f"{where} {mu.size}-d statistics; {features} ({dim}-d) features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{where} {m} or {s} holds non-finite values")
    if problem := covariance_problem(sigma):
        raise UsageError(f"{where} {s} is not a covariance ({problem}); the file is corrupted or not FID statistics")


def spatial_statistics(stats: FidStatistics) -> FidStatistics | None:
    """The sFID statistics of ``stats`` (checked), or None when it has none (statistics files without ``mu_s``/``sigma_s``)."""
    if stats.spatial is None:
        return None
    where = f"{stats.description.removesuffix(' (statistics)')}:"
    check_statistics(stats.spatial.mu, stats.spatial.sigma, SPATIAL_DIM, where, ("mu_s", "sigma_s"),
                     "sFID uses Inception mixed_6/conv's first 7 channels, 17x17x7")
    return stats.spatial


def covariance_problem(sigma: np.ndarray) -> str | None:
    """Why ``sigma`` is no covariance matrix (symmetric, positive semi-definite, within rounding); None if it is one."""
    asymmetry = np.abs(sigma - sigma.T).max()
    if asymmetry > COVARIANCE_TOLERANCE * np.abs(sigma).max():
        return f"not symmetric: entries differ from their transpose by up to {asymmetry:.3g}"
    eigenvalues = np.linalg.eigvalsh(sigma)
    if eigenvalues[0] < -COVARIANCE_TOLERANCE * max(eigenvalues[-1], 0):
        return f"a negative eigenvalue, {eigenvalues[0]:.4g}, with the largest {eigenvalues[-1]:.4g}"
    return None


def write_statistics(stats: FidStatistics, path: str | os.PathLike, shared: bool = False) -> None:
    """Save as an ``.npz`` every FID tool reads (``mu``, ``sigma``) plus atdiff's metadata; atomically
    (``shared``: see ``atdiff.files.temp_path``)."""
    arrays = {"mu": stats.mu, "sigma": stats.sigma}
    if stats.spatial is not None:  # ADM's names: a file written here serves as an ADM reference batch's statistics
        arrays.update(mu_s=stats.spatial.mu, sigma_s=stats.spatial.sigma)
    if stats.num_images is not None:
        arrays["num_images"] = np.array(stats.num_images)
    if stats.feature_extractor is not None:
        arrays["feature_extractor"] = np.array(stats.feature_extractor)  # a unicode array: no pickle
    with atomic_path(Path(path), shared) as partial, open(partial, "wb") as file:
        np.savez(file, **arrays)  # a file object: np.savez would append .npz to a name


# ------------------------------------------------------------------------------------------------
# The distance
# ------------------------------------------------------------------------------------------------


def fid_from_statistics(real: FidStatistics | dict, fake: FidStatistics | dict, fake_features: torch.Tensor | None = None) -> float:
    """FID = |mu_r - mu_f|^2 + tr S_r + tr S_f - 2 tr sqrt(S_r S_f), from two sets of statistics.

    torch-fidelity takes the eigenvalues of the non-symmetric d x d product S_r S_f (15-30 s at
    d = 2048 on a 2-core CPU). The same eigenvalues come from symmetric matrices, which are faster
    and stable: with n < d fake features X (centred, S_f = X^T X / (n - 1)), from the n x n matrix
    X S_r X^T / (n - 1); otherwise from S_r^1/2 S_f S_r^1/2.
    """
    mu_r, sigma_r, mu_f, sigma_f = _arrays(real) + _arrays(fake)
    if mu_r.shape != mu_f.shape:
        raise UsageError(f"the two sides' statistics have {mu_r.size} and {mu_f.size} features; FID needs the same extractor on both")
    if fake_features is not None and fake_features.shape[0] < fake_features.shape[1]:
        x = fake_features.double().numpy()
        x = x - x.mean(axis=0)
        product = x @ sigma_r @ x.T / (len(x) - 1)
    else:
        eigenvalues, vectors = np.linalg.eigh(sigma_r)
        root = (vectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ vectors.T
        product = root @ sigma_f @ root
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0, None)).sum()  # PSD: negatives are rounding
    diff = mu_r - mu_f
    fid = float(diff.dot(diff) + np.trace(sigma_r) + np.trace(sigma_f) - 2 * tr_covmean)
    # A distance: below 0 only by rounding (identical sets), unless a sigma is no covariance.
    if fid < -COVARIANCE_TOLERANCE * (abs(np.trace(sigma_r)) + abs(np.trace(sigma_f)) + diff.dot(diff)):
        raise UsageError(f"FID came out negative ({fid:.4g}): the statistics' sigma is not a covariance matrix")
    return max(fid, 0.0)


def _arrays(stats: FidStatistics | dict) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(stats, FidStatistics):
        return stats.mu, stats.sigma
    return stats["mu"], stats["sigma"]
