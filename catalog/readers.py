"""Catalog readers: the generic JSONL catalog and the Fashion-Gen HDF5 files, behind one interface.

    catalog = open_catalog("data/demo")            # or a directory holding fashiongen_256_256_*.h5
    for item in catalog.items(split="train"):      # CatalogItem with a decoded uint8 RGB image
        ...

Bad rows raise CatalogError naming the file and row. With on_error="skip" they are left out
instead, and counted in `catalog.problems`, which the CLI reports; nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .images import ImageDecodeError, decode_image
from .items import SPLITS, CatalogError, CatalogItem

log = logging.getLogger(__name__)

JSONL_NAME = "catalog.jsonl"
FASHIONGEN_FILES = {s: f"fashiongen_256_256_{s}.h5" for s in SPLITS}
JSONL_REQUIRED = ("id", "image", "name", "description", "category", "subcategory")
# Top-level JSONL keys with a meaning of their own; every other key is free metadata.
JSONL_KNOWN = set(JSONL_REQUIRED) | {"product_id", "split"}
VALIDATION_SHARE_WHEN_UNSPLIT = 10  # one product in ten, by a stable hash of its id


@dataclass
class Problems:
    """Rows left out under on_error="skip": a count and the first reasons."""

    count: int = 0
    first: list[str] = field(default_factory=list)
    keep: int = 10

    def add(self, error: CatalogError) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(str(error))

    def summary(self) -> str:
        if not self.count:
            return "no rows skipped"
        more = f" (first {len(self.first)} shown)" if self.count > len(self.first) else ""
        return f"{self.count} rows skipped{more}:\n  " + "\n  ".join(self.first)


def open_catalog(path: str | os.PathLike, on_error: str = "raise") -> "Catalog":
    """A generic catalog directory (catalog.jsonl), a Fashion-Gen directory, or one such file."""
    if on_error not in ("raise", "skip"):
        raise ValueError("on_error must be 'raise' or 'skip'")
    p = Path(path)
    if not p.exists():
        raise CatalogError(str(p), None, "no such file or directory")
    if p.is_file():
        if p.suffix == ".jsonl":
            return JsonlCatalog(p, on_error)
        if p.suffix in (".h5", ".hdf5"):
            return FashionGenCatalog([p], on_error)
        raise CatalogError(str(p), None, "expected a catalog directory, a .jsonl catalog or a Fashion-Gen .h5 file")
    if (p / JSONL_NAME).is_file():
        return JsonlCatalog(p / JSONL_NAME, on_error)
    h5 = [p / name for name in FASHIONGEN_FILES.values() if (p / name).is_file()]
    if h5:
        return FashionGenCatalog(h5, on_error)
    raise CatalogError(
        str(p), None,
        f"not a catalog: expected {JSONL_NAME} (generic format) or "
        f"{' / '.join(FASHIONGEN_FILES.values())} (Fashion-Gen) in this directory",
    )


def _check_split(split: str) -> tuple[str, ...]:
    if split == "all":
        return SPLITS
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}: use one of {', '.join(SPLITS)} or all")
    return (split,)


class Catalog(ABC):
    """What every reader offers."""

    format: str
    source: str

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.problems = Problems()

    def _fail(self, error: CatalogError) -> None:
        if self.on_error == "raise":
            raise error
        self.problems.add(error)

    def records(self, split: str = "all") -> list[CatalogItem]:
        """Every valid item of the split, texts and metadata only (no image decoding)."""
        return list(self._records(_check_split(split)))

    def items(self, split: str = "all") -> Iterator[CatalogItem]:
        """Every valid item of the split with its decoded image, read lazily in file order."""
        return self._with_images(_check_split(split))

    def __len__(self) -> int:
        return len(self.records())

    @abstractmethod
    def _records(self, splits: tuple[str, ...]) -> Iterator[CatalogItem]:
        """Valid items of these splits, without images."""

    @abstractmethod
    def _with_images(self, splits: tuple[str, ...]) -> Iterator[CatalogItem]:
        """Valid items of these splits, with decoded images."""


def _stable_split(product_id: str) -> str:
    digest = int.from_bytes(hashlib.blake2b(product_id.encode(), digest_size=8).digest(), "big")
    return "validation" if digest % VALIDATION_SHARE_WHEN_UNSPLIT == 0 else "train"


class JsonlCatalog(Catalog):
    """`catalog.jsonl`: one product image a line, image paths relative to the file."""

    format = "jsonl"

    def __init__(self, path: Path, on_error: str = "raise"):
        super().__init__(on_error)
        self.path = path
        self.source = str(path)
        self.root = path.parent
        self._rows: list[tuple[int, CatalogItem, Path]] = []
        self._parse()

    def _parse(self) -> None:
        seen: dict[str, int] = {}
        split_of_product: dict[str, tuple[str, int]] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise CatalogError(self.source, None, f"not UTF-8 text ({exc})") from None
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                item, image_path = self._parse_line(line, lineno)
                if item.id in seen:
                    raise CatalogError(self.source, lineno, f"duplicate id {item.id!r} (first on line {seen[item.id]})")
                known = split_of_product.get(item.product_id)
                if known and known[0] != item.split:
                    raise CatalogError(
                        self.source, lineno,
                        f"product {item.product_id!r} is in split {item.split!r} here but {known[0]!r} on line {known[1]}: "
                        "all images of a product belong to one split",
                    )
            except CatalogError as error:
                self._fail(error)
                continue
            seen[item.id] = lineno
            split_of_product.setdefault(item.product_id, (item.split, lineno))
            self._rows.append((lineno, item, image_path))

    def _parse_line(self, line: str, lineno: int) -> tuple[CatalogItem, Path]:
        def bad(reason: str) -> CatalogError:
            return CatalogError(self.source, lineno, reason)

        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise bad("each line must be a JSON object")
        missing = [k for k in JSONL_REQUIRED if k not in row]
        if missing:
            raise bad(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        for key in ("id", "product_id"):
            if key in row and not (isinstance(row[key], str) or (isinstance(row[key], int) and not isinstance(row[key], bool))):
                raise bad(f"field {key!r} must be a string or an integer")
        for key in ("image", "name", "description", "category", "subcategory", "split"):
            if key in row and not isinstance(row[key], str):
                raise bad(f"field {key!r} must be a string, got {type(row[key]).__name__}")
        item_id = str(row["id"]).strip()
        if not item_id:
            raise bad("field 'id' is empty")
        name, description = row["name"].strip(), row["description"].strip()
        if not name and not description:
            raise bad(f"empty caption: item {item_id!r} has neither a name nor a description")
        if not row["image"].strip():
            raise bad("field 'image' is empty")
        product_id = str(row.get("product_id", item_id)).strip() or item_id
        split = row.get("split", _stable_split(product_id))
        if split not in SPLITS:
            raise bad(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        metadata = {k: v for k, v in row.items() if k not in JSONL_KNOWN}
        if "price" in metadata:
            price = metadata["price"]
            if isinstance(price, bool) or not isinstance(price, (int, float)) or not math.isfinite(price) or price < 0:
                raise bad(f"price must be a non-negative number, got {price!r}")
            metadata["price"] = float(price)
        for key in ("gender", "brand"):
            if key in metadata and not isinstance(metadata[key], str):
                raise bad(f"field {key!r} must be a string")
        image_path = self.root / row["image"]
        if not image_path.is_file():
            raise bad(f"image file not found: {image_path}")
        item = CatalogItem(
            id=item_id, product_id=product_id, name=name, description=description,
            category=row["category"].strip(), subcategory=row["subcategory"].strip(),
            split=split, metadata=metadata,
        )
        return item, image_path

    def _records(self, splits):
        return (item for _, item, _ in self._rows if item.split in splits)

    def _with_images(self, splits):
        for lineno, item, image_path in self._rows:
            if item.split not in splits:
                continue
            try:
                image = decode_image(str(image_path))
            except ImageDecodeError as exc:
                self._fail(CatalogError(self.source, lineno, f"{image_path}: {exc}"))
                continue
            yield CatalogItem(**{**item.__dict__, "image": image})


# Fashion-Gen HDF5 -----------------------------------------------------------------------------

FG_TEXT = {"name": "input_name", "description": "input_description", "category": "input_category",
           "subcategory": "input_subcategory"}
FG_REQUIRED = ("input_image", "input_productID", *FG_TEXT.values())
# Datasets that are neither texts of the item nor metadata a user filters or displays by.
FG_NOT_METADATA = set(FG_REQUIRED) | {"input_concat_description", "index", "index_2"}
FG_RENAMED = {"input_msrpUSD": "price"}
FG_CHUNK = 256


def _fg_value(value: Any) -> Any:
    """One cell of a Fashion-Gen dataset (usually a 1-element array) -> a Python value."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size == 1 else value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).rstrip(b"\x00").decode("latin-1").strip()
    if isinstance(value, np.floating):
        return round(float(value), 2)
    if isinstance(value, np.integer):
        return int(value)
    return value


class FashionGenCatalog(Catalog):
    """fashiongen_256_256_{train,validation}.h5, read lazily in row chunks (the real files are tens of GB).

    Rows (poses) that share input_productID are one product. The first pose's item id is the
    product id; later poses get `<productID>-<n>` (n = 2, 3, ... in file order).
    """

    format = "fashiongen"

    def __init__(self, paths: list[Path], on_error: str = "raise"):
        import h5py  # imported here: a JSONL-only user never pays for it

        super().__init__(on_error)
        self._h5py = h5py
        self.files: dict[str, Path] = {}
        self.source = ", ".join(str(p) for p in paths)
        for p in paths:
            split = next((s for s in SPLITS if p.name.endswith(f"_{s}.h5") or p.stem == s), None)
            if split is None:
                raise CatalogError(str(p), None, f"cannot tell the split from the file name: name it {FASHIONGEN_FILES['train']} or {FASHIONGEN_FILES['validation']}")
            self.files[split] = p
        self._ids: dict[str, tuple[list[str], list[str]]] = {}
        owner: dict[str, str] = {}
        for split, p in self.files.items():
            ids, pids = self._read_ids(p)
            for pid in set(pids):
                if pid in owner:
                    raise CatalogError(str(p), None, f"product {pid} is in both the {owner[pid]} and the {split} file")
                owner[pid] = split
            self._ids[split] = (ids, pids)

    def _open(self, path: Path):
        try:
            f = self._h5py.File(path, "r")
        except OSError as exc:
            raise CatalogError(str(path), None, f"not a readable HDF5 file ({exc})") from None
        missing = [k for k in FG_REQUIRED if k not in f]
        if missing:
            f.close()
            raise CatalogError(str(path), None, f"missing dataset{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
        n = f["input_productID"].shape[0]
        img = f["input_image"]
        if img.ndim != 4 or img.shape[0] != n or img.shape[3] != 3 or img.dtype != np.uint8:
            f.close()
            raise CatalogError(str(path), None, f"input_image must be (N, H, W, 3) uint8 with N = {n} rows, got {img.shape} {img.dtype}")
        for key in FG_TEXT.values():
            if f[key].shape[0] != n:
                f.close()
                raise CatalogError(str(path), None, f"{key} has {f[key].shape[0]} rows, input_productID has {n}")
        return f

    def _read_ids(self, path: Path) -> tuple[list[str], list[str]]:
        with self._open(path) as f:
            raw = f["input_productID"][...].reshape(len(f["input_productID"]), -1)[:, 0]
        pids = [str(_fg_value(v)) for v in raw]
        seen: dict[str, int] = {}
        ids = []
        for pid in pids:
            seen[pid] = seen.get(pid, 0) + 1
            ids.append(pid if seen[pid] == 1 else f"{pid}-{seen[pid]}")
        return ids, pids

    def _metadata_keys(self, f) -> list[str]:
        n = f["input_productID"].shape[0]
        keys = []
        for key, ds in f.items():
            if key in FG_NOT_METADATA or not isinstance(ds, self._h5py.Dataset) or not ds.shape or ds.shape[0] != n:
                continue
            if ds.dtype.kind in "SOUfiu":
                keys.append(key)
        return keys

    def _rows(self, splits, with_images: bool) -> Iterator[tuple[CatalogItem, np.ndarray | None]]:
        for split in splits:
            path = self.files.get(split)
            if path is None:
                if len(splits) == 1:
                    raise CatalogError(self.source, None, f"no {FASHIONGEN_FILES[split]} here: the {split} split is missing")
                continue
            ids, pids = self._ids[split]
            with self._open(path) as f:
                meta_keys = self._metadata_keys(f)
                n = len(ids)
                for start in range(0, n, FG_CHUNK):
                    stop = min(n, start + FG_CHUNK)
                    texts = {field: f[key][start:stop] for field, key in FG_TEXT.items()}
                    meta = {key: f[key][start:stop] for key in meta_keys}
                    images = f["input_image"][start:stop] if with_images else None
                    for j in range(stop - start):
                        row = start + j
                        values = {field: _fg_value(col[j]) for field, col in texts.items()}
                        if not values["name"] and not values["description"]:
                            self._fail(CatalogError(str(path), row, f"empty caption: item {ids[row]} has neither a name nor a description"))
                            continue
                        metadata = {}
                        for key, col in meta.items():
                            value = _fg_value(col[j])
                            if value != "" and value is not None:
                                metadata[FG_RENAMED.get(key, key.removeprefix("input_"))] = value
                        item = CatalogItem(id=ids[row], product_id=pids[row], split=split, metadata=metadata, **values)
                        yield item, (images[j] if with_images else None)

    def _records(self, splits):
        return (item for item, _ in self._rows(splits, with_images=False))

    def _with_images(self, splits):
        for item, image in self._rows(splits, with_images=True):
            yield CatalogItem(**{**item.__dict__, "image": np.ascontiguousarray(image)})
