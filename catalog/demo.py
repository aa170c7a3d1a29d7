"""`fashionbert catalog demo`: write the demo catalog in the generic format or the Fashion-Gen layout.

The catalog is built in a temporary sibling directory and renamed into place at the end, so an
interrupted run never leaves a half-written catalog where a good one was.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .demo_render import render
from .demo_spec import ProductSpec, make_spec
from .readers import FASHIONGEN_FILES, JSONL_NAME
from ..atomic import staged_dir

log = logging.getLogger(__name__)

DEFAULT_N = 6000
DEFAULT_VALIDATION_SHARE = 0.2


@dataclass
class DemoResult:
    out: Path
    n: int
    n_validation: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.n / max(self.seconds, 1e-9)


def validation_indices(seed: int, n: int, share: float) -> set[int]:
    """Products held out for validation: a fixed share, chosen by the seed, split by product."""
    order = np.random.default_rng([seed, 2]).permutation(n)
    return set(order[: round(n * share)].tolist())


def metadata_of(spec: ProductSpec) -> dict:
    """The metadata both formats carry: shop facts and the visible attributes."""
    return {"gender": spec.gender, "brand": spec.brand, "price": spec.price, "composition": spec.composition,
            "department": spec.sub.department, "season": spec.season, **spec.attributes()}


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _render_png(args: tuple[int, int]) -> tuple[int, bytes]:
    seed, index = args
    return index, _png(render(make_spec(seed, index)))


def _render_array(args: tuple[int, int]) -> tuple[int, np.ndarray]:
    seed, index = args
    return index, render(make_spec(seed, index))


def _parallel(fn, seed: int, indices: list[int], workers: int, desc: str):
    """Yield fn((seed, i)) for each index in order, in this process or a pool; output is identical either way."""
    jobs = [(seed, i) for i in indices]
    bar = dict(total=len(jobs), desc=desc, unit="img", mininterval=0.5)
    if workers <= 1:
        yield from tqdm(map(fn, jobs), **bar)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from tqdm(pool.imap(fn, jobs, chunksize=32), **bar)


def generate(out: str | os.PathLike, n: int = DEFAULT_N, seed: int = 0, fmt: str = "jsonl",
             validation_share: float = DEFAULT_VALIDATION_SHARE, workers: int = 1, overwrite: bool = False) -> DemoResult:
    out = Path(out)
    if n < 1:
        raise ValueError("--n must be at least 1")
    if not 0 <= validation_share < 1:
        raise ValueError("the validation share must be in [0, 1)")
    if fmt not in ("jsonl", "fashiongen"):
        raise ValueError(f"unknown format {fmt!r}: use jsonl or fashiongen")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
    start = time.perf_counter()
    val = validation_indices(seed, n, validation_share)
    with staged_dir(out) as tmp:
        if fmt == "jsonl":
            _write_jsonl(tmp, n, seed, val, workers)
        else:
            _write_fashiongen(tmp, n, seed, val, workers)
        seconds = time.perf_counter() - start
    return DemoResult(out=out, n=n, n_validation=len(val), seconds=seconds)


def _write_jsonl(root: Path, n: int, seed: int, val: set[int], workers: int) -> None:
    (root / "images").mkdir()
    rows = []
    for index, png in _parallel(_render_png, seed, list(range(n)), workers, "Rendering demo catalog"):
        spec = make_spec(seed, index)
        rel = f"images/{spec.product_id}.png"
        (root / rel).write_bytes(png)
        rows.append({
            "id": str(spec.product_id), "image": rel, "name": spec.name, "description": spec.description,
            "category": spec.sub.category, "subcategory": spec.sub.subcategory,
            "split": "validation" if index in val else "train", **metadata_of(spec),
        })
    with open(root / JSONL_NAME, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_fashiongen(root: Path, n: int, seed: int, val: set[int], workers: int) -> None:
    """The public Fashion-Gen layout: (N, 1) latin-1 byte strings, (N, 256, 256, 3) uint8 images."""
    import h5py

    for split in ("train", "validation"):
        indices = [i for i in range(n) if (i in val) == (split == "validation")]
        if not indices:
            continue
        specs = [make_spec(seed, i) for i in indices]
        meta = [metadata_of(s) for s in specs]
        columns = {
            "input_name": [s.name for s in specs],
            "input_description": [s.description for s in specs],
            "input_concat_description": [f"{s.name} {s.description}" for s in specs],
            "input_category": [s.sub.category for s in specs],
            "input_subcategory": [s.sub.subcategory for s in specs],
        }
        for key in sorted({k for m in meta for k in m} - {"price"}):
            columns[f"input_{key}"] = [str(m.get(key, "")) for m in meta]
        with h5py.File(root / FASHIONGEN_FILES[split], "w") as f:
            for key, values in columns.items():
                encoded = [v.encode("latin-1") for v in values]
                width = max(1, max(len(e) for e in encoded))
                f.create_dataset(key, data=np.array(encoded, dtype=f"S{width}").reshape(-1, 1))
            f.create_dataset("input_productID", data=np.array([s.product_id for s in specs], dtype=np.int32).reshape(-1, 1))
            f.create_dataset("input_msrpUSD", data=np.array([s.price for s in specs], dtype=np.float32).reshape(-1, 1))
            f.create_dataset("index", data=np.arange(len(specs), dtype=np.int64).reshape(-1, 1))
            images = f.create_dataset("input_image", shape=(len(specs), 256, 256, 3), dtype=np.uint8)
            block: list[np.ndarray] = []
            written = 0
            for _, image in _parallel(_render_array, seed, indices, workers, f"Rendering {split} split"):
                block.append(image)
                if len(block) == 128 or written + len(block) == len(specs):
                    images[written : written + len(block)] = np.stack(block)
                    written += len(block)
                    block = []
