"""FID statistics (mean and covariance of Inception pool_3 features): files, and the distance between two.

One reader for the formats people publish, all an ``.npz`` with ``mu`` (d,) and ``sigma`` (d, d):
the ADM reference batches (``VIRTUAL_imagenet256_labeled.npz``: also ``arr_0`` images and spatial
``mu_s``/``sigma_s``), pytorch-fid's ``--save-stats`` files and clean-fid's stats files. Files that
atdiff writes add ``num_images`` and ``feature_extractor``. Files are read with
``allow_pickle=False``: a statistics file never runs code.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics

from atdiff.errors import UsageError
from atdiff.files import atomic_path

FEATURE_DIM = 2048  # Inception-v3 pool_3, what every published FID statistic holds
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

    @classmethod
    def of_features(cls, features: torch.Tensor, description: str, feature_extractor: str | None = None) -> FidStatistics:
        stats = fid_features_to_statistics(features.double())
        return cls(stats["mu"], stats["sigma"], description, len(features), feature_extractor)


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
        with np.load(path, allow_pickle=False) as npz:
            if not {"mu", "sigma"} <= set(npz.files):
                raise UsageError(f"{path}: not FID statistics (no mu and sigma arrays; it has {npz.files})")
            mu, sigma = npz["mu"].astype(np.float64), npz["sigma"].astype(np.float64)
            num = int(npz["num_images"]) if "num_images" in npz.files else None
            extractor = str(npz["feature_extractor"]) if "feature_extractor" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UsageError(f"{path}: not a readable statistics .npz ({err})") from None
    if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
        raise UsageError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a (d,) mean and (d, d) covariance")
    if mu.size != FEATURE_DIM:
        raise UsageError(f"{path}: {mu.size}-d statistics; FID here uses Inception-v3 pool_3 ({FEATURE_DIM}-d) features")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UsageError(f"{path}: mu or sigma holds non-finite values")
    if problem := covariance_problem(sigma):
        raise UsageError(f"{path}: sigma is not a covariance ({problem}); the file is corrupted or not FID statistics")
    return FidStatistics(mu, sigma, f"{path} (statistics)", num, extractor)


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
