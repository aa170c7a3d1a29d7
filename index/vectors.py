"""The FAISS side of the index: its kinds and parameters, and a new empty index of a kind.

FAISS ids are SQLite row numbers, so a hit maps to its item without a second table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import faiss
import numpy as np

KINDS = ("flat", "ivf", "hnsw")
PATCH_DTYPES = ("float16", "int8")


@dataclass
class IndexConfig:
    kind: str = "flat"
    nlist: int | None = None  # ivf: lists (default about 4 * sqrt(items))
    nprobe: int = 16  # ivf: lists visited per query
    hnsw_m: int = 32
    ef_construction: int = 80
    ef_search: int = 128
    patch_dtype: str = "float16"
    batch_size: int = 32
    jpeg_quality: int = 90

    def validate(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown index kind {self.kind!r}: use {', '.join(KINDS)}")
        if self.patch_dtype not in PATCH_DTYPES:
            raise ValueError(f"unknown patch dtype {self.patch_dtype!r}: use {', '.join(PATCH_DTYPES)}")
        if self.nprobe < 1 or self.hnsw_m < 4 or self.ef_search < 1 or self.batch_size < 1:
            raise ValueError("nprobe, ef_search and batch_size must be positive and hnsw_m at least 4")


def new_faiss(cfg: IndexConfig, dim: int, train: np.ndarray, trained=None):
    """An empty FAISS index of the configured kind whose ids are SQLite row numbers."""
    if cfg.kind == "flat":
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if cfg.kind == "hnsw":
        hnsw = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        hnsw.hnsw.efConstruction = cfg.ef_construction
        return faiss.IndexIDMap2(hnsw)
    if trained is not None:
        index = trained
        index.reset()
    else:
        nlist = cfg.nlist or max(1, min(int(4 * math.sqrt(max(len(train), 1))), len(train) // 39 or 1))
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(np.ascontiguousarray(train, dtype=np.float32))
    # A hash-table direct map lets remove_ids and reconstruct find any id.
    index.set_direct_map_type(faiss.DirectMap.Hashtable)
    return index
