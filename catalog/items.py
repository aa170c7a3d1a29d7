"""The one record every catalog reader yields, and the errors readers raise."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPLITS = ("train", "validation")


class CatalogError(ValueError):
    """Bad catalog data. The message names the file and the row (1-based line or row index)."""

    def __init__(self, source: str, row: int | None, reason: str):
        self.source, self.row, self.reason = source, row, reason
        where = f"{source}" if row is None else f"{source}, row {row}"
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class CatalogItem:
    """One product image with its texts.

    `id` is unique per image. Several images (poses) of one product share `product_id`; the
    product is the unit of the train/validation split and of "the same item" in evaluation.
    `image` is the decoded uint8 RGB array (H, W, 3) at its stored size, or None when the
    catalog was read without images.
    """

    id: str
    product_id: str
    name: str
    description: str
    category: str
    subcategory: str
    split: str
    metadata: dict[str, Any] = field(default_factory=dict)
    image: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def caption(self) -> str:
        """The text the model reads: the product name, then its description."""
        if self.name and self.description:
            return f"{self.name}. {self.description}"
        return self.name or self.description
