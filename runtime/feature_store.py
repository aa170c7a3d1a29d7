"""The on-disk patch-feature cache, read side: one HDF5 file, keyed by item id and image content hash.

Written by `fashionbert features` (model/feature_cache.py); read by training and by the index
build, which needs no torch to read it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

FORMAT_VERSION = 1
# Attributes that must match for cached features to be reused.
IDENTITY_ATTRS = ("mode", "crop_size", "patches", "dim", "image_size", "backbone", "precision")


class FeatureCacheError(ValueError):
    pass


def default_features_path(catalog_path: str | os.PathLike, mode: str) -> Path:
    """Features live beside the catalog directory: data/demo -> data/features/grid.h5."""
    return Path(catalog_path).resolve().parent / "features" / f"{mode}.h5"


class FeatureStore:
    """Read side: ids, hashes and float16 features (N, P, D), loaded lazily by id."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise FeatureCacheError(f"{self.path}: no feature file here (run `fashionbert features` first)")
        try:
            self._file = h5py.File(self.path, "r")
            self.attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._file.attrs.items()}
            self.ids = list(self._file["ids"].asstr()[...])
            self.hashes = [s.decode() for s in self._file["hashes"][...]]
            self._features = self._file["features"]
        except (OSError, KeyError) as exc:
            raise FeatureCacheError(f"{self.path}: not a feature file written by fashionbert ({exc})") from None
        self.row = {item_id: i for i, item_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, item_id: str) -> bool:
        return item_id in self.row

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self._features.shape)

    def get(self, ids: Iterable[str]) -> np.ndarray:
        """Features of these ids, in this order, (len, P, D) float16."""
        try:
            rows = [self.row[i] for i in ids]
        except KeyError as exc:
            raise FeatureCacheError(f"{self.path}: no features for item {exc.args[0]!r}") from None
        if not rows:
            return np.zeros((0, *self.shape[1:]), dtype=np.float16)
        order = np.argsort(rows)
        sorted_rows = np.asarray(rows)[order]
        out = np.empty((len(rows), *self.shape[1:]), dtype=np.float16)
        out[order] = self._features[sorted_rows]  # h5py wants increasing indices
        return out

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
