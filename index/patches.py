"""The cross-encoder's patch states of every indexed item, in one file of fixed-size records.

Row r's states sit at offset r * record: float16, or int8 with a float16 scale per patch in
patch_scales.bin. Read through a memory map at query time, so a rerank never re-runs the CNN.
Rows are written (and fsynced) before the SQLite commit that makes them visible, so a crash
leaves unreferenced bytes only. Opened read-only (an index directory on a read-only mount), it
creates and changes nothing.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

import numpy as np


class IndexError_(ValueError):
    """The index is missing, damaged, or does not fit the model."""


class PatchFile:
    """Fixed-size records of patch states, appended by row number, read through a memory map."""

    def __init__(self, directory: Path, patches: int, hidden: int, dtype: str, read_only: bool = False):
        self.path, self.scales_path = directory / "patches.bin", directory / "patch_scales.bin"
        self.patches, self.hidden, self.dtype = patches, hidden, np.dtype(dtype)
        self.record = patches * hidden * self.dtype.itemsize
        self.read_only = read_only
        self._map: np.memmap | None = None
        self._scales: np.memmap | None = None
        self._lock = threading.Lock()
        self._closed = False
        for p in (self.path, self.scales_path) if dtype == "int8" else (self.path,):
            if read_only:
                if not p.is_file():
                    raise IndexError_(f"{p} is missing: the index is damaged; rebuild it")
            else:
                p.touch(exist_ok=True)

    @property
    def bytes_per_item(self) -> int:
        return self.record + (self.patches * 2 if self.dtype == np.int8 else 0)

    def write(self, first_row: int, states: np.ndarray) -> None:
        """Rows first_row.. get these (n, P, H) float states; flushed to disk before returning."""
        if self.read_only:
            raise IndexError_(f"{self.path} is opened read-only")
        if self.dtype == np.int8:
            scale = np.maximum(np.abs(states).max(-1, keepdims=True), 1e-8) / 127.0  # per patch
            data = np.clip(np.rint(states / scale), -127, 127).astype(np.int8)
            self._write(self.scales_path, first_row * self.patches * 2, scale[..., 0].astype(np.float16).tobytes())
        else:
            data = states.astype(np.float16)
        self._write(self.path, first_row * self.record, np.ascontiguousarray(data).tobytes())

    @staticmethod
    def _write(path: Path, offset: int, payload: bytes) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())

    def _maps(self, needed_row: int) -> tuple[np.memmap, np.memmap | None]:
        with self._lock:
            if self._closed:
                raise IndexError_(f"{self.path}: this index was closed")
            if self._map is None or self._map.shape[0] <= needed_row:
                rows = os.path.getsize(self.path) // self.record
                if rows <= needed_row:
                    raise IndexError_(f"{self.path} has no patch states for row {needed_row}: the index is damaged; rebuild it")
                self._map = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(rows, self.patches, self.hidden))
                if self.dtype == np.int8:
                    self._scales = np.memmap(self.scales_path, dtype=np.float16, mode="r", shape=(rows, self.patches))
            return self._map, self._scales

    def read(self, rows: Iterable[int]) -> np.ndarray:
        """(K, P, H) float32 patch states of these rows."""
        rows = np.asarray(list(rows), dtype=np.int64)
        if not len(rows):
            return np.zeros((0, self.patches, self.hidden), dtype=np.float32)
        data, scales = self._maps(int(rows.max()))
        out = data[rows].astype(np.float32)
        if scales is not None:
            out *= scales[rows].astype(np.float32)[..., None]
        return out

    def close(self) -> None:
        """Drop the memory maps; reading afterwards raises IndexError_."""
        with self._lock:
            self._closed = True
            self._map = self._scales = None
