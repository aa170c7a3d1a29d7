"""`fashionbert index build`: every catalog image through the exported image tower into a new
INDEX_DIR (index/store.py describes its files), written beside the old one and renamed into place,
so an interrupted build leaves the previous index as it was. Images whose patch features the
training already cached (runtime/feature_store.py) skip the CNN: only the image head runs.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import faiss
import numpy as np
from tqdm import tqdm

from ..atomic import staged_dir, staged_file, write_text
from ..catalog.images import image_hash
from ..catalog.items import CatalogItem
from ..runtime.feature_store import FeatureCacheError, FeatureStore
from .patches import PatchFile
from .store import FORMAT, SCHEMA, filter_fields, insert_items, item_fields
from .vectors import IndexConfig, new_faiss

log = logging.getLogger(__name__)


class CachedFeatures:
    """Patch features training already computed for this catalog (runtime/feature_store.py), when
    they were made exactly as the export's image tower makes them: an item whose image is
    unchanged then costs the image head only, not the CNN again."""

    def __init__(self, store: FeatureStore):
        self.store = store

    @classmethod
    def open(cls, path: str | Path | None, model, explicit: bool = True) -> "CachedFeatures | None":
        if path is None:
            return None
        if not Path(path).is_file():
            if explicit:
                log.warning("No feature file at %s: every image goes through the CNN.", path)
            return None
        if getattr(model, "image_head", None) is None:
            log.info("The model has no image head (an older export): every image goes through the CNN.")
            return None
        try:
            store = FeatureStore(path)
        except FeatureCacheError as exc:
            log.warning("Not reusing cached features: %s", exc)
            return None
        want = model.feature_identity
        theirs = {k: store.attrs.get(k) for k in want}
        if not want or theirs != want:
            diff = ", ".join(f"{k} {theirs.get(k)} there, {v} here" for k, v in want.items() if theirs.get(k) != v)
            log.info("Not reusing the features in %s: made differently from this model's image tower (%s).", path,
                     diff or "the export does not say how its features are made")
            store.close()
            return None
        return cls(store)

    def rows(self, batch: list[CatalogItem]) -> list[int | None]:
        """Each item's row in the cache, or None where the cache has no features of this very image."""
        out = []
        for it in batch:
            row = self.store.row.get(it.id)
            out.append(row if row is not None and self.store.hashes[row] == image_hash(it.image) else None)
        return out

    def close(self) -> None:
        self.store.close()


def encode_batch(model, batch: list[CatalogItem], cached: CachedFeatures | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Embeddings (B, E) and patch states (B, P, H) of a non-empty batch: cached features through the
    image head, the other images through the whole tower; the third value counts the cached ones."""
    rows = cached.rows(batch) if cached is not None else [None] * len(batch)
    hit = [i for i, r in enumerate(rows) if r is not None]
    miss = [i for i, r in enumerate(rows) if r is None]
    parts = []
    if hit:
        parts.append((hit, model.encode_features(cached.store.get([batch[i].id for i in hit]).astype(np.float32))))
    if miss:
        parts.append((miss, model.encode_images(np.stack([batch[i].image for i in miss]))))
    e0, s0 = parts[0][1]
    emb = np.empty((len(batch), *e0.shape[1:]), dtype=e0.dtype)
    states = np.empty((len(batch), *s0.shape[1:]), dtype=s0.dtype)
    for idx, (e, st) in parts:
        emb[idx], states[idx] = e, st
    return emb, states, len(hit)


def _batched(items: Iterator[CatalogItem], size: int) -> Iterator[list[CatalogItem]]:
    batch = []
    for it in items:
        batch.append(it)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def build(model, catalog, out: str | Path, cfg: IndexConfig = IndexConfig(), split: str = "all",
          overwrite: bool = False, progress: bool = True, features: str | Path | None = None,
          features_explicit: bool = True, recall: str | None = None) -> dict:
    """Encode every item of the catalog with the exported image tower and write INDEX_DIR atomically.
    `features`: a patch-feature cache of the catalog; unchanged images found there skip the CNN
    (`features_explicit` false: a default path, silently skipped when absent). `recall`: a Milvus
    address (milvus://HOST:PORT/COLLECTION): the collection is replaced by this catalog's
    embeddings, and the index searches there (index/milvus.py)."""
    cfg.validate()
    out = Path(out)
    if out.exists() and not overwrite and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty: pass --overwrite to replace it")
    start = time.perf_counter()
    cached = None
    with staged_dir(out) as tmp:
        try:
            records = catalog.records(split)
            if not records:
                raise ValueError(f"the catalog has no {split} items to index")
            db = sqlite3.connect(tmp / "items.sqlite", isolation_level=None)
            db.executescript(SCHEMA)
            db.execute("INSERT INTO meta VALUES ('generation', '1')")
            patches = PatchFile(tmp, model.num_patches, model.hidden_size, cfg.patch_dtype)
            row, encode_seconds, reused = 1, 0.0, 0
            all_emb, all_fields = [], []
            cached = CachedFeatures.open(features, model, features_explicit)
            bar = tqdm(total=len(records), desc="Indexing images", unit="img", disable=not progress, mininterval=0.5)
            db.execute("BEGIN")
            for batch in _batched(catalog.items(split), cfg.batch_size):
                t0 = time.perf_counter()
                emb, states, from_cache = encode_batch(model, batch, cached)
                reused += from_cache
                encode_seconds += time.perf_counter() - t0
                patches.write(row, states)
                insert_items(db, row, batch, emb, cfg.jpeg_quality)
                all_emb.append(emb)
                all_fields += [item_fields(it) for it in batch]
                row += len(batch)
                bar.update(len(batch))
            db.execute("COMMIT")
            bar.close()
            db.close()
            emb = np.concatenate(all_emb).astype(np.float32)
            n = len(emb)
            index = new_faiss(cfg, model.embed_dim, emb)
            index.add_with_ids(emb, np.arange(1, n + 1, dtype=np.int64))
            with staged_file(tmp / "vectors.1.faiss") as vectors:
                faiss.write_index(index, str(vectors))
            build_id = uuid.uuid4().hex
            if recall:
                recall = load_milvus(recall, model, cfg, emb, all_fields, progress, build_id)
            sizes = {p.name: p.stat().st_size for p in tmp.iterdir()}
            manifest = {"format": FORMAT, "model_hash": model.model_hash, "embed_dim": model.embed_dim,
                        "hidden_size": model.hidden_size, "num_patches": model.num_patches, "config": asdict(cfg),
                        "items_at_build": n, "split": split, "build_id": build_id, "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                        "seconds": round(time.perf_counter() - start, 1), "encode_images_per_s": round(n / max(encode_seconds, 1e-9), 1),
                        "from_cached_features": reused, **({"recall": recall} if recall else {}),
                        "bytes_per_item": {"patch_states": patches.bytes_per_item,
                                           "total_on_disk": round(sum(sizes.values()) / n)}}
            write_text(tmp / "manifest.json", json.dumps(manifest, indent=2))
        finally:
            if cached is not None:
                cached.close()
    log.info("Indexed %d items into %s (%s, %.0f images/s encoding, %d of them from cached patch features, %d bytes "
             "of patch states per item) in %.0f s.", n, out, cfg.kind, manifest["encode_images_per_s"], reused,
             patches.bytes_per_item, manifest["seconds"])
    return manifest


def load_milvus(uri: str, model, cfg: IndexConfig, emb: np.ndarray, fields: list[tuple], progress: bool,
                build_id: str) -> str:
    """Replace the Milvus collection at `uri` with these embeddings (rows 1..n); its address."""
    from .milvus import MilvusRecall

    remote = MilvusRecall(uri, model.embed_dim, cfg, model.model_hash, create=True, build_id=build_id)
    try:
        rows = np.arange(1, len(emb) + 1, dtype=np.int64)
        step = 4096
        for i in tqdm(range(0, len(emb), step), desc=f"Loading {remote.address}", unit="batch", disable=not progress):
            remote.upsert(rows[i : i + step], emb[i : i + step], [filter_fields(f) for f in fields[i : i + step]])
        remote.set_generation(1)
        remote.flush()
        return str(remote.address)
    finally:
        remote.close()
