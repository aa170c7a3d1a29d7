"""Brings the patch-feature cache up to date with a catalog (`fashionbert features`).

    fashionbert features --catalog data/demo --out data/features/grid.h5

- A changed image (new content hash) is recomputed, an unchanged one is not, an item that left
  the catalog is dropped.
- Work in progress is saved every few hundred images as parts in `<FILE>.parts/` (each part
  renamed into place when complete); an interrupted run resumes from them.
- The final file is written beside the old one and renamed over it, so a crash at any moment
  leaves the last good cache readable.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from ..atomic import staged_file, write_text
from ..catalog.images import image_hash, to_model_image
from ..catalog.readers import Catalog
from ..runtime.feature_store import FORMAT_VERSION, IDENTITY_ATTRS, FeatureCacheError, FeatureStore


@dataclass
class FeatureRun:
    path: Path
    total: int
    computed: int
    reused: int
    resumed: int
    dropped: int
    seconds: float  # time spent in the CNN, for images/s

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds else 0.0


def _prefetch(items: Iterator, depth: int = 64) -> Iterator:
    """Decode the next images on a thread while the CNN works on the current batch."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def fill():
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as exc:  # handed to the consumer, raised there
            q.put(exc)

    threading.Thread(target=fill, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


class _Parts:
    """Completed batches of this run, saved so that an interrupted run resumes."""

    def __init__(self, root: Path, identity: dict):
        self.root = root
        self.identity = identity
        root.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, tuple[str, np.ndarray, int]] = {}  # id -> (hash, features memmap, row)
        self._n = 0
        for meta_path in sorted(root.glob("part-*.json")):
            meta = json.loads(meta_path.read_text())
            if meta.get("identity") != identity:
                continue  # parts of a run with other settings: not ours to reuse
            feats = np.load(meta_path.with_suffix(".npy"), mmap_mode="r")
            for row, (item_id, h) in enumerate(zip(meta["ids"], meta["hashes"])):
                self.entries[item_id] = (h, feats, row)
            self._n = max(self._n, int(meta_path.stem.split("-")[1]) + 1)

    def add(self, ids: list[str], hashes: list[str], feats: np.ndarray) -> None:
        stem = self.root / f"part-{self._n:05d}"
        self._n += 1
        with staged_file(stem.with_suffix(".npy")) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats, allow_pickle=False)
        # The json lands last: it marks the part complete.
        write_text(stem.with_suffix(".json"), json.dumps({"ids": ids, "hashes": hashes, "identity": self.identity}))
        mm = np.load(stem.with_suffix(".npy"), mmap_mode="r")
        for row, (item_id, h) in enumerate(zip(ids, hashes)):
            self.entries[item_id] = (h, mm, row)


def compute_features(catalog: Catalog, out: str | os.PathLike, extractor=None, *, mode: str = "grid",
                     crop_size: int = 64, split: str = "all", batch_size: int = 32, precision: str = "auto",
                     device: str = "cpu", part_size: int = 512, overwrite: bool = False,
                     progress: bool = True) -> FeatureRun:
    """Bring the feature file at `out` up to date with the catalog (the selected split)."""
    import torch

    from .features import FeatureConfig, OnnxPatchFeatureExtractor, PatchFeatureExtractor, feature_engine, resolve_precision

    out = Path(out)
    config = FeatureConfig(mode=mode, crop_size=crop_size)
    dev = torch.device(device)
    if extractor is None:
        engine, resolved = feature_engine(precision, dev)
    else:
        engine = getattr(extractor, "engine", "torch")
        resolved = "fp32" if engine == "onnxruntime" else resolve_precision(precision, dev)
    identity = {**config.as_attrs(), "precision": resolved}

    old = None
    if out.exists() and not overwrite:
        old = FeatureStore(out)
        if precision == "auto" and extractor is None and old.attrs.get("precision") in ("fp32", "bf16"):
            # A cache made under another default (bf16 PyTorch on bf16 CPUs) stays as it was made:
            # new images are computed the same way, and the model trained on it still matches.
            identity["precision"] = old.attrs["precision"]
            engine = "onnxruntime" if identity["precision"] == "fp32" and dev.type == "cpu" else "torch"
        theirs = {k: old.attrs.get(k) for k in IDENTITY_ATTRS}
        if theirs != identity:
            diff = ", ".join(f"{k}: {theirs[k]} here, {identity[k]} asked" for k in IDENTITY_ATTRS if theirs[k] != identity[k])
            old.close()
            raise FeatureCacheError(f"{out} holds features made differently ({diff}); "
                                    "pass --overwrite to replace them or choose another --out")
    old_rows = {} if old is None else {i: (h, r) for r, (i, h) in enumerate(zip(old.ids, old.hashes))}

    parts = _Parts(Path(f"{out}.parts"), identity)
    selected = catalog.records(split)
    order = [r.id for r in selected]
    chosen = set(order)
    keep_ids = chosen if split == "all" else {r.id for r in catalog.records("all")}
    # Entries of other splits stay as they are while the catalog still has them.
    order += [i for i in (old.ids if old else []) if i not in chosen and i in keep_ids]

    extractor_ready = extractor is not None

    def make_extractor():
        nonlocal extractor, extractor_ready
        if not extractor_ready:  # built on the first image to compute: an up-to-date cache never loads the CNN
            extractor = OnnxPatchFeatureExtractor(config) if engine == "onnxruntime" else PatchFeatureExtractor(config).to(dev)
            extractor_ready = True
        return extractor
    reused = resumed = computed = 0
    cnn_seconds = 0.0
    final_hash: dict[str, str] = {}
    pending_ids: list[str] = []
    pending_hashes: list[str] = []
    pending_images: list[np.ndarray] = []
    part_ids: list[str] = []
    part_hashes: list[str] = []
    part_feats: list[np.ndarray] = []

    def run_batch():
        nonlocal computed, cnn_seconds
        ex = make_extractor()
        start = time.perf_counter()
        feats = ex.extract(np.stack(pending_images), precision=identity["precision"], device=dev)
        cnn_seconds += time.perf_counter() - start
        computed += len(pending_ids)
        part_ids.extend(pending_ids)
        part_hashes.extend(pending_hashes)
        part_feats.append(feats)
        pending_ids.clear(), pending_hashes.clear(), pending_images.clear()
        if len(part_ids) >= part_size:
            flush_part()

    def flush_part():
        if part_ids:
            parts.add(list(part_ids), list(part_hashes), np.concatenate(part_feats))
            part_ids.clear(), part_hashes.clear(), part_feats.clear()

    bar = tqdm(total=len(selected), desc=f"Patch features ({mode})", unit="img", disable=not progress, mininterval=0.5)
    for item in _prefetch(catalog.items(split)):
        h = image_hash(item.image)
        final_hash[item.id] = h
        if item.id in old_rows and old_rows[item.id][0] == h:
            reused += 1
        elif item.id in parts.entries and parts.entries[item.id][0] == h:
            resumed += 1
        else:
            pending_ids.append(item.id)
            pending_hashes.append(h)
            pending_images.append(to_model_image(item.image))
            if len(pending_ids) == batch_size:
                run_batch()
        bar.update(1)
    if pending_ids:
        run_batch()
    flush_part()
    bar.close()

    # Items of the selection that failed to load (skipped by the reader) have no features.
    order = [i for i in order if i in final_hash or i not in chosen]
    for i in order:
        if i not in final_hash:
            final_hash[i] = old_rows[i][0]
    dropped = len(set(old_rows) - set(order))
    _write(out, order, final_hash, parts, old, old_rows, identity)
    if old is not None:
        old.close()
    shutil.rmtree(parts.root, ignore_errors=True)
    return FeatureRun(path=out, total=len(order), computed=computed, reused=reused, resumed=resumed, dropped=dropped,
                      seconds=cnn_seconds)


def _write(out: Path, order: list[str], hashes: dict[str, str], parts: _Parts, old, old_rows, identity) -> None:
    p, d = identity["patches"], identity["dim"]
    with staged_file(out) as tmp:
        with h5py.File(tmp, "w") as f:
            f.attrs.update({**identity, "format_version": FORMAT_VERSION})
            f.create_dataset("ids", data=np.array(order, dtype=object), dtype=h5py.string_dtype())
            f.create_dataset("hashes", data=np.array([hashes[i] for i in order], dtype="S32"))
            feats = f.create_dataset("features", shape=(len(order), p, d), dtype=np.float16, chunks=(1, p, d))
            block, start = [], 0
            for i in order:
                entry = parts.entries.get(i)
                if entry is not None and entry[0] == hashes[i]:
                    block.append(entry[1][entry[2]])
                else:
                    block.append(old._features[old_rows[i][1]])
                if len(block) == 256:
                    feats[start : start + len(block)] = np.stack(block)
                    start += len(block)
                    block = []
            if block:
                feats[start : start + len(block)] = np.stack(block)
