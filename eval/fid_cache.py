"""The reference-set cache of ``atdiff fid``: features and FID statistics of datasets, in files that cannot run code.

torch-fidelity's own cache pickles tensors and reads them back with ``torch.load(weights_only=False)``,
so a file planted in the cache folder would run code; atdiff therefore never lets torch-fidelity
cache. An entry ``KEY`` (dataset, split, resolution, count, weights: ``DatasetSpec.cache_name``) is
``KEY.features.safetensors`` (every extracted layer), ``KEY.stats.npz`` (``mu``, ``sigma`` and, when
the spatial layer was extracted, sFID's ``mu_s``, ``sigma_s``; read with ``allow_pickle=False``) and
``KEY.json`` (what it describes), each written atomically and the JSON last: an entry without its
JSON is incomplete and is recomputed. An unreadable entry (truncated, or not in these formats) loses
its JSON, so it is recomputed and replaced, with a note on stderr.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from atdiff.errors import UsageError
from atdiff.files import atomic_path, write_atomic

from .fid_statistics import FidStatistics, read_statistics, write_statistics

FORMAT_VERSION = 1


class FeatureCache:
    """Cached features and statistics under ``root`` (None: caching off)."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)

    def _paths(self, key: str) -> tuple[Path, Path, Path]:
        """(features, statistics, record) of entry ``key``."""
        return (self.root / f"{key}.features.safetensors", self.root / f"{key}.stats.npz", self.root / f"{key}.json")

    def _complete_entry(self, key: str | None) -> tuple[Path, Path, Path] | None:
        """The paths of entry ``key`` when caching is on and the entry is complete (its record exists)."""
        if self.root is None or key is None:
            return None
        paths = self._paths(key)
        return paths if paths[2].is_file() else None

    def statistics(self, key: str | None) -> FidStatistics | None:
        """The cached statistics of ``key``, or None (a miss, an incomplete or unreadable entry, caching off)."""
        entry = self._complete_entry(key)
        if entry is None:
            return None
        _, stats_path, record = entry
        try:
            meta = json.loads(record.read_text())
            stats = read_statistics(stats_path)
            for part in (stats, stats.spatial) if stats.spatial is not None else (stats,):
                part.description, part.feature_extractor = meta["description"], meta["feature_extractor"]
        except (UsageError, ValueError, KeyError, TypeError) as err:
            return self._drop(record, err)
        return stats

    def features(self, key: str | None, layers: list[str]) -> dict[str, torch.Tensor] | None:
        """The cached features of ``key`` when they hold every layer in ``layers``, else None."""
        entry = self._complete_entry(key)
        if entry is None:
            return None
        features_path, _, record = entry
        try:
            features = load_file(features_path)
        except (OSError, SafetensorError) as err:
            return self._drop(record, err)
        return features if set(layers) <= set(features) else None

    @staticmethod
    def _drop(record: Path, err: Exception) -> None:
        # Without its record the entry is incomplete: the next store rewrites all of it.
        print(f"atdiff fid: ignoring an unreadable cache entry {record.with_suffix('')}.*, recomputing it: {err}", file=sys.stderr)
        record.unlink(missing_ok=True)

    def store(self, key: str | None, features: dict[str, torch.Tensor], stats: FidStatistics) -> None:
        if self.root is None or key is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        features_path, stats_path, record = self._paths(key)
        tensors = {name: value.contiguous() for name, value in features.items()}
        # Parallel trainings (compare --jobs) may store one entry at once: per-process temp names.
        with atomic_path(features_path, shared=True) as partial:
            save_file(tensors, partial)
        write_statistics(stats, stats_path, shared=True)
        meta = {
            "format": FORMAT_VERSION,
            "description": stats.description,
            "num_images": stats.num_images,
            "feature_extractor": stats.feature_extractor,
            "layers": sorted(tensors),
        }
        write_atomic(record, json.dumps(meta, indent=2) + "\n", shared=True)
