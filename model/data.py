"""Training and evaluation data: captions tokenised once, patch features from the cache, grouped by product."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..catalog.items import CatalogItem
from ..catalog.readers import Catalog
from ..runtime.feature_store import FeatureStore
from .feature_cache import compute_features
from ..runtime.tokenizer import CaptionTokenizer

log = logging.getLogger(__name__)


def ensure_features(catalog: Catalog, path: Path, mode: str, precision: str = "auto", progress: bool = True) -> Path:
    """Bring the feature cache up to date (cheap when it is: unchanged images are not recomputed)."""
    run = compute_features(catalog, path, mode=mode, precision=precision, progress=progress)
    if run.computed:
        log.info("Computed %s features for %d images (%d reused) in %s.", mode, run.computed, run.reused, path)
    return path


@dataclass
class SplitData:
    """One split, in tensors: row i is catalog item items[i]."""

    items: list[CatalogItem]
    ids: torch.Tensor  # (N, T) int64 token ids, padded to the split's longest caption
    mask: torch.Tensor  # (N, T) int64
    word_ids: list[list[int | None]]
    feats: torch.Tensor  # (N, P, D) float16
    product: np.ndarray  # (N,) int product index: rows of one product share it
    subcategory: np.ndarray  # (N,) int subcategory index
    # (N, T, H) the captions' states after the frozen lower layers (TrainConfig.frozen_layers), once per run
    text_cache: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.items)

    def subset(self, rows) -> "SplitData":
        """These rows only, in this order."""
        rows = np.asarray(rows)
        return SplitData(items=[self.items[r] for r in rows], ids=self.ids[rows], mask=self.mask[rows],
                         word_ids=[self.word_ids[r] for r in rows], feats=self.feats[rows], product=self.product[rows],
                         subcategory=self.subcategory[rows],
                         text_cache=None if self.text_cache is None else self.text_cache[rows])

    def by_length(self, batch: int) -> list[np.ndarray]:
        """Every row, in batches of captions of about the same length (shortest first): trimmed to
        its longest caption (`texts`), such a batch carries little padding (the demo catalog's
        captions: 26 to 64 tokens). Padding keys get no weight, so a row's result is the same up to
        float rounding in any batch; with the default model it came out bit for bit the same as in
        split order, in bf16 on AVX-512 and in fp32 under AVX2 emulation (BENCHMARKS.md)."""
        order = np.argsort(self.mask.sum(1).numpy(), kind="stable")
        return [order[i : i + batch] for i in range(0, len(order), batch)]

    def texts(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask of these rows, trimmed to their longest caption."""
        ids, mask = self.ids[rows], self.mask[rows]
        width = int(mask.sum(1).max())
        return ids[:, :width], mask[:, :width]


def load_split(catalog: Catalog, split: str, features: FeatureStore, tokenizer: CaptionTokenizer,
               subcategories: dict[str, int], limit: int | None = None, seed: int = 0,
               products: Callable[[str], bool] | None = None) -> SplitData:
    """Items of the split that have features (items that failed to load have none and are left out);
    with `products`, only the items whose product id it accepts."""
    every = [r for r in catalog.records(split) if products is None or products(r.product_id)]
    records = [r for r in every if r.id in features]
    missing = len(every) - len(records)
    if missing:
        log.warning("%d %s items have no features (unreadable images?) and are left out.", missing, split)
    if limit and len(records) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(records), limit, replace=False))
        records = [records[i] for i in keep]
    if not records:
        raise ValueError(f"the {split} split has no items with features")
    enc = tokenizer([r.caption for r in records])
    products = {p: i for i, p in enumerate(dict.fromkeys(r.product_id for r in records))}
    for r in records:
        subcategories.setdefault(r.subcategory, len(subcategories))
    return SplitData(
        items=records, ids=torch.from_numpy(enc.ids), mask=torch.from_numpy(enc.mask), word_ids=enc.word_ids,
        feats=torch.from_numpy(features.get([r.id for r in records])),
        product=np.array([products[r.product_id] for r in records]),
        subcategory=np.array([subcategories[r.subcategory] for r in records]),
    )


def subcategory_first(rng: np.random.Generator, candidates: np.ndarray, subcategory: np.ndarray, sub: int,
                      n: int) -> np.ndarray:
    """n of the `candidates` rows (a boolean mask), drawn without replacement from subcategory `sub`
    first and topped up from the others: the paper protocol's negatives, and TIA's random ones."""
    same = np.flatnonzero(candidates & (subcategory == sub))
    picked = rng.choice(same, min(n, len(same)), replace=False)
    if len(picked) < n:
        rest = np.flatnonzero(candidates & (subcategory != sub))
        picked = np.concatenate([picked, rng.choice(rest, n - len(picked), replace=False)])
    return picked


def negatives_by_subcategory(data: SplitData, row: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n rows of other products, from the row's subcategory first, topped up from the others."""
    return subcategory_first(rng, data.product != data.product[row], data.subcategory, data.subcategory[row], n)


def first_row_per_product(product) -> np.ndarray:
    """The first row of each product (product ids or indices, one per row), in row order."""
    _, first = np.unique(np.asarray(product), return_index=True)
    return np.sort(first)
