"""The catalog index: FAISS over image embeddings, SQLite for ids and metadata, memory-mapped patch states.

INDEX_DIR holds

- manifest.json        format, the model hash it was built with, sizes, FAISS kind and parameters
- items.sqlite         one row per item: id, display fields, filter fields, JPEG image, embedding;
                       the source of truth (transactional: an add or a delete commits or does not)
- vectors.<gen>.faiss  the FAISS index over the embeddings, FAISS ids = SQLite row numbers;
                       <gen> is the SQLite generation it matches. It is derived data: opening an
                       index whose newest file is behind SQLite (a crash between the commit and the
                       write) brings it up to date from the stored embeddings.
- patches.bin          the cross-encoder's patch states of every row (float16, or int8 with a
                       float16 scale per patch in patch_scales.bin), read through a memory map at
                       query time so a rerank never re-runs the CNN. Rows are written before the
                       commit that makes them visible, so a crash leaves unreferenced bytes only.

`fashionbert index build` (index/build.py) writes a new one; this module opens, searches and
updates it.
"""

from __future__ import annotations

import io
import json
import logging
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
from PIL import Image
from tqdm import tqdm

from ..catalog.items import CatalogItem
from ..atomic import staged_file
from .patches import IndexError_, PatchFile
from .vectors import IndexConfig, new_faiss

log = logging.getLogger(__name__)
FORMAT = "fashionbert-index/1"
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    row INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    product_id TEXT, name TEXT, description TEXT, category TEXT, subcategory TEXT,
    gender TEXT, price REAL, metadata TEXT, image BLOB, embedding BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS items_category ON items (category);
CREATE INDEX IF NOT EXISTS items_subcategory ON items (subcategory);
CREATE INDEX IF NOT EXISTS items_gender ON items (gender);
CREATE INDEX IF NOT EXISTS items_price ON items (price);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
DISPLAY = ("id", "product_id", "name", "description", "category", "subcategory", "gender", "price")


class IndexMismatch(IndexError_):
    pass


@dataclass
class Filters:
    category: str | None = None
    subcategory: str | None = None
    gender: str | None = None
    price_min: float | None = None
    price_max: float | None = None

    def active(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def sql(self) -> tuple[str, list]:
        clauses, args = [], []
        for key in ("category", "subcategory", "gender"):
            value = getattr(self, key)
            if value is not None:
                clauses.append(f"{key} = ? COLLATE NOCASE")
                args.append(value)
        if self.price_min is not None:
            clauses.append("price >= ?")
            args.append(float(self.price_min))
        if self.price_max is not None:
            clauses.append("price <= ?")
            args.append(float(self.price_max))
        return " AND ".join(clauses) or "1", args


@dataclass
class Hit:
    row: int
    id: str
    score: float  # inner product of L2-normalised embeddings (cosine)


def _jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class CatalogIndex:
    """An opened INDEX_DIR. Thread-safe: searches run concurrently, writes one at a time."""

    def __init__(self, directory: str | Path, model_hash: str | None = None, threads: int | None = None):
        self.dir = Path(directory)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise IndexError_(f"{self.dir}: no manifest.json (not an index built by `fashionbert index build`)")
        try:
            self.manifest = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise IndexError_(f"{path}: not valid JSON ({exc})") from None
        if self.manifest.get("format") != FORMAT:
            raise IndexError_(f"{path}: unknown index format {self.manifest.get('format')!r}")
        if model_hash is not None and model_hash != self.manifest["model_hash"]:
            raise IndexMismatch(f"{self.dir} was built with model {self.manifest['model_hash']}, but the model loaded is "
                                f"{model_hash}: rebuild the index with this model (`fashionbert index build`)")
        if not (self.dir / "items.sqlite").is_file():
            raise IndexError_(f"{self.dir}: items.sqlite is missing; rebuild the index")
        m = self.manifest
        self.config = IndexConfig(**m["config"])
        self.embed_dim = m["embed_dim"]
        self.patches = PatchFile(self.dir, m["num_patches"], m["hidden_size"], m["config"]["patch_dtype"])
        self._write_lock = threading.Lock()
        # FAISS indexes are not safe to search while they change: searches (fast) and the
        # in-memory add/remove share this lock; encoding and SQLite work stay outside it.
        self._faiss_lock = threading.Lock()
        self._local = threading.local()
        if threads:
            faiss.omp_set_num_threads(threads)
        self.faiss = self._load_vectors()

    # SQLite ------------------------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.dir / "items.sqlite", timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            self._local.conn = conn
        return conn

    def generation(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def count(self, filters: Filters | None = None) -> int:
        where, args = (filters or Filters()).sql()
        return self.db.execute(f"SELECT COUNT(*) FROM items WHERE {where}", args).fetchone()[0]

    def item(self, item_id: str) -> dict | None:
        row = self.db.execute(f"SELECT row, {', '.join(DISPLAY)}, metadata FROM items WHERE id = ?", (item_id,)).fetchone()
        return _as_item(row) if row else None

    def items_by_row(self, rows: list[int]) -> dict[int, dict]:
        if not rows:
            return {}
        marks = ",".join("?" * len(rows))
        found = self.db.execute(f"SELECT row, {', '.join(DISPLAY)}, metadata FROM items WHERE row IN ({marks})",
                                [int(r) for r in rows]).fetchall()
        return {r[0]: _as_item(r) for r in found}

    def image(self, item_id: str) -> bytes | None:
        row = self.db.execute("SELECT image FROM items WHERE id = ?", (item_id,)).fetchone()
        return row[0] if row else None

    def rows_of(self, ids: list[str]) -> dict[str, int]:
        out = {}
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            out.update(self.db.execute(f"SELECT id, row FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk).fetchall())
        return out

    def embeddings(self, rows: list[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(rows, embeddings) from SQLite: all items, or these rows."""
        if rows is None:
            found = self.db.execute("SELECT row, embedding FROM items ORDER BY row").fetchall()
        else:
            found = []
            for i in range(0, len(rows), 500):
                chunk = [int(r) for r in rows[i : i + 500]]
                found += self.db.execute(f"SELECT row, embedding FROM items WHERE row IN ({','.join('?' * len(chunk))})",
                                         chunk).fetchall()
        ids = np.array([r for r, _ in found], dtype=np.int64)
        emb = np.frombuffer(b"".join(e for _, e in found), dtype=np.float32).reshape(len(found), self.embed_dim)
        return ids, emb

    # FAISS -------------------------------------------------------------------------------------

    def _vector_files(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.dir.glob("vectors.*.faiss"):
            try:
                found.append((int(p.name.split(".")[1]), p))
            except ValueError:
                continue
        return sorted(found)

    def _load_vectors(self):
        gen = self.generation()
        files = self._vector_files()
        current = dict(files).get(gen)
        if current is not None:
            index = faiss.read_index(str(current))
        else:
            # The newest file is behind the database: rebuild from the stored embeddings, keeping
            # IVF's trained centroids when there is an older file to take them from.
            log.warning("%s: the vector file is behind the item database (an interrupted update?); rebuilding it.", self.dir)
            rows, emb = self.embeddings()
            base = faiss.read_index(str(files[-1][1])) if files else None
            index = new_faiss(self.config, self.embed_dim, emb, trained=base)
            if len(rows):
                index.add_with_ids(emb, rows)
            self._save_vectors(index, gen)
        self._tune(index)
        return index

    def _tune(self, index) -> None:
        if self.config.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        elif self.config.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.config.ef_search

    def _save_vectors(self, index, gen: int) -> None:
        with staged_file(self.dir / f"vectors.{gen}.faiss") as tmp:
            faiss.write_index(index, str(tmp))
        for g, p in self._vector_files():
            if g < gen:
                p.unlink(missing_ok=True)

    # Search ------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, n: int, filters: Filters | None = None) -> list[Hit]:
        """The n nearest items to an L2-normalised query embedding, best first.

        With filters, the nearest n items that pass them, however deep they sit: the FAISS
        search is restricted to the allowed rows, and when an approximate index finds fewer
        than exist, the allowed rows are scored exactly.
        """
        if n < 1:
            return []
        query = np.ascontiguousarray(query, dtype=np.float32).reshape(1, -1)
        if query.shape[1] != self.embed_dim:
            raise ValueError(f"query embedding has {query.shape[1]} dimensions, the index {self.embed_dim}")
        allowed = None
        if filters is not None and filters.active():
            where, args = filters.sql()
            allowed = np.array([r for (r,) in self.db.execute(f"SELECT row FROM items WHERE {where}", args)], dtype=np.int64)
            if not len(allowed):
                return []
        available = len(allowed) if allowed is not None else self.faiss.ntotal
        k = min(n, available)
        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
            if self.config.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.config.nprobe)
            else:
                params = faiss.SearchParameters(sel=selector)
        # A few spare results cover rows deleted from SQLite and not yet from a stale vector file.
        with self._faiss_lock:
            scores, rows = self.faiss.search(query, min(k + 8, max(available, 1)) if allowed is None else k,
                                             params=params)
        found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        items = self.items_by_row([r for r, _ in found])
        hits = [Hit(r, items[r]["id"], s) for r, s in found if r in items][:k]
        expected = min(k, self.count(filters) if allowed is None else len(allowed))
        if len(hits) < expected:
            hits = self._exact(query[0], k, allowed)
        return hits

    def _exact(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> list[Hit]:
        rows, emb = self.embeddings(None if allowed is None else allowed.tolist())
        scores = emb @ query
        top = np.argsort(-scores, kind="stable")[:k]
        items = self.items_by_row(rows[top].tolist())
        return [Hit(int(rows[i]), items[int(rows[i])]["id"], float(scores[i])) for i in top if int(rows[i]) in items]

    # Updates -----------------------------------------------------------------------------------

    def add(self, items: list[CatalogItem], model, progress: bool = False) -> int:
        """Encode and add items (with images); visible to the next search and persisted. Returns how many."""
        if self.config.kind == "hnsw":
            raise IndexError_("an hnsw index cannot be updated in place: rebuild it, or build a flat or ivf index")
        if not items:
            return 0
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("the items to add repeat an id")
        with self._write_lock:
            clash = self.rows_of(ids)
            if clash:
                raise ValueError(f"{len(clash)} id(s) already in the index, e.g. {next(iter(clash))}: delete them first")
            emb, states = encode_items(model, items, self.config.batch_size, progress)
            first = self._next_row()
            self.patches.write(first, states)  # invisible until the commit below
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                insert_items(db, first, items, emb, self.config.jpeg_quality)
                gen = self._bump(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            rows = np.arange(first, first + len(items), dtype=np.int64)
            with self._faiss_lock:
                self.faiss.add_with_ids(np.ascontiguousarray(emb, dtype=np.float32), rows)
                self._save_vectors(self.faiss, gen)
        return len(items)

    def delete(self, ids: list[str]) -> list[str]:
        """Remove these ids; returns the ones that were not in the index."""
        if self.config.kind == "hnsw":
            raise IndexError_("an hnsw index cannot delete items: rebuild it, or build a flat or ivf index")
        with self._write_lock:
            rows = self.rows_of(list(ids))
            missing = [i for i in ids if i not in rows]
            if not rows:
                return missing
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                marks = ",".join("?" * len(rows))
                db.execute(f"DELETE FROM items WHERE row IN ({marks})", list(rows.values()))
                gen = self._bump(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            with self._faiss_lock:
                self.faiss.remove_ids(np.array(list(rows.values()), dtype=np.int64))
                self._save_vectors(self.faiss, gen)
        return missing

    def _next_row(self) -> int:
        # AUTOINCREMENT never reuses a row number, so stale patch bytes are never read as live.
        seq = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'items'").fetchone()
        return (seq[0] if seq else 0) + 1

    @staticmethod
    def _bump(db: sqlite3.Connection) -> int:
        gen = int(db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]) + 1
        db.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (str(gen),))
        return gen

    def info(self) -> dict:
        return {**{k: v for k, v in self.manifest.items() if k != "config"}, "config": asdict(self.config),
                "items": len(self), "generation": self.generation(), "faiss_vectors": int(self.faiss.ntotal)}


def _as_item(row) -> dict:
    out = dict(zip(("row", *DISPLAY), row[:-1]))
    out["metadata"] = json.loads(row[-1]) if row[-1] else {}
    return out


def insert_items(db: sqlite3.Connection, first_row: int, items: list[CatalogItem], emb: np.ndarray, quality: int) -> None:
    records = []
    for i, it in enumerate(items):
        meta = dict(it.metadata)
        gender, price = meta.get("gender"), meta.get("price")
        records.append((first_row + i, it.id, it.product_id, it.name, it.description, it.category, it.subcategory,
                        gender if isinstance(gender, str) else None,
                        float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None,
                        json.dumps(meta, default=str), _jpeg(it.image, quality),
                        np.ascontiguousarray(emb[i], dtype=np.float32).tobytes()))
    db.executemany("INSERT INTO items (row, id, product_id, name, description, category, subcategory, gender, price, "
                   "metadata, image, embedding) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", records)


def encode_items(model, items: list[CatalogItem], batch_size: int, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    embs, states = [], []
    for i in tqdm(range(0, len(items), batch_size), desc="Encoding images", unit="batch", disable=not progress):
        e, s = model.encode_images(np.stack([it.image for it in items[i : i + batch_size]]))
        embs.append(e)
        states.append(s)
    return np.concatenate(embs), np.concatenate(states)
