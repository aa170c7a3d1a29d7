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
- index.lock           an empty file for fcntl.flock: a writer holds it exclusively over its whole
                       write, a reader shares it while it reads the generation and its vector file

`fashionbert index build` (index/build.py) writes a new one; this module opens, searches and
updates it.

Several CatalogIndex objects may have one directory open at once (a reload opens the new one beside
the old, `fashionbert index add` runs beside the server): their writes take turns (a lock per
directory in this process, the flock across processes), each writer first brings its in-memory
FAISS up to the database's generation, so every vector file it saves holds every committed item,
and each search first checks the generation and reloads the vectors when another writer moved it.

A directory that cannot be written (a read-only mount) is opened read-only: nothing in it is
created or changed, searches and reads work, add and delete raise ReadOnlyIndex.
"""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
import sqlite3
import tempfile
import threading
from contextlib import contextmanager, nullcontext
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


LOCK_FILE = "index.lock"


class IndexMismatch(IndexError_):
    pass


class ReadOnlyIndex(IndexError_):
    """A write to an index opened read-only."""


# One writer at a time per index directory in this process, whichever CatalogIndex it goes through.
# The flock excludes other processes (and other open file descriptions in this one too); this lock
# keeps this process's writers in line before they get to it.
_DIR_LOCKS: dict[str, threading.Lock] = {}
_DIR_LOCKS_GUARD = threading.Lock()


def _dir_lock(key: str) -> threading.Lock:
    with _DIR_LOCKS_GUARD:
        return _DIR_LOCKS.setdefault(key, threading.Lock())


@contextmanager
def _flock(path: Path, exclusive: bool, create: bool = True):
    """fcntl.flock on `path` through an open file description of its own, so two threads of one
    process exclude each other as two processes do; closing it releases the lock. Opened for
    reading only (flock needs no more), so processes of other users can lock a file one created."""
    fd = os.open(path, os.O_RDONLY | (os.O_CREAT if create else 0) | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def directory_writable(directory: str | Path) -> bool:
    """Whether a file can be created in `directory`, found by creating one: as root, os.access says
    yes whatever the mode bits, while a read-only mount answers EROFS."""
    try:
        fd, name = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
    except OSError as exc:
        if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return False
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True  # writable, but full: searches go on, and writes fail when they need space
        raise
    os.close(fd)
    os.unlink(name)
    return True


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
    """An opened INDEX_DIR. Thread-safe: searches run concurrently, writes one at a time (across
    every CatalogIndex of the directory, in this process and others).

    `read_only`: None finds out (the directory is read-only when no file can be created in it),
    True opens it read-only even where it could be written. Read-only, nothing in the directory is
    created or changed (SQLite is opened with mode=ro, immutable when it has no -wal file), and
    add and delete raise ReadOnlyIndex. `close()` releases the memory and files it holds.
    """

    def __init__(self, directory: str | Path, model_hash: str | None = None, threads: int | None = None,
                 read_only: bool | None = None, recall: str | None = None):
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
        if read_only is not True:
            writable = directory_writable(self.dir)
            if read_only is False and not writable:
                raise IndexError_(f"{self.dir}: the index directory is read-only, and it was opened for writing")
            read_only = not writable
        self.read_only: bool = read_only
        if read_only:
            log.info("%s: the index directory is read-only; serving it without updates.", self.dir)
        m = self.manifest
        self.config = IndexConfig(**m["config"])
        self.embed_dim = m["embed_dim"]
        self.patches = PatchFile(self.dir, m["num_patches"], m["hidden_size"], m["config"]["patch_dtype"],
                                 read_only=read_only)
        st = os.stat(self.dir)
        self._dir_id = (st.st_dev, st.st_ino)
        self._lock_path = self.dir / LOCK_FILE
        self._write_lock = _dir_lock(os.path.realpath(self.dir))  # shared by every instance of the directory
        # Held by whoever brings this instance's FAISS to the database's generation, and over each
        # write (which does that first). Order: _write_lock, _sync_lock, the flock, _faiss_lock.
        self._sync_lock = threading.Lock()
        # FAISS indexes are not safe to search while they change: searches (fast) and the
        # in-memory add/remove/swap share this lock; encoding and SQLite work stay outside it.
        self._faiss_lock = threading.Lock()
        self._faiss = None
        self._faiss_gen: int | None = None
        self._local = threading.local()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._conns_lock = threading.Lock()
        self._closed = False
        if threads:
            faiss.omp_set_num_threads(threads)
        # Recall on a Milvus server (index/milvus.py) instead of the in-process FAISS: `recall`, or
        # the address the index was built with.
        self._remote = None
        self._remote_gen: int | None = None
        self._remote_strong = True  # the next Milvus search sees other clients' writes too
        recall = recall or m.get("recall")
        try:
            if recall:
                from .milvus import MilvusRecall

                self._remote = MilvusRecall(recall, self.embed_dim, self.config, m["model_hash"],
                                            build_id=m.get("build_id", ""))
            self._sync()
        except BaseException:
            self.close()
            raise

    # SQLite ------------------------------------------------------------------------------------

    @property
    def db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 connections are not shared across threads); close()
        closes them all."""
        if self._closed:
            raise IndexError_(f"{self.dir}: this index was closed")
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.immutable is not None and self._local.immutable != self._db_signature():
            # Opened immutable while no writer was live; a writer (another container on the same
            # volume) has since started or changed the file: read it afresh, as mode=ro.
            with self._conns_lock:
                self._conns.pop(threading.current_thread(), None)
            conn.close()
            conn = None
        if conn is None:
            signature = self._db_signature()
            conn, immutable = self._connect()
            self._local.immutable = signature if immutable else None
            with self._conns_lock:
                if self._closed:
                    conn.close()
                    raise IndexError_(f"{self.dir}: this index was closed")
                for thread in [t for t in self._conns if not t.is_alive()]:
                    self._conns.pop(thread).close()
                self._conns[threading.current_thread()] = conn
            self._local.conn = conn
        return conn

    def _connect(self) -> tuple[sqlite3.Connection, bool]:
        """A connection, and whether it reads the file as immutable (read-only, no live writer)."""
        path = self.dir / "items.sqlite"
        if not self.read_only:
            conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            return conn, False
        uri = path.absolute().as_uri() + "?mode=ro"
        if Path(f"{path}-wal").exists():
            # A live (or crashed) writer's WAL: a mode=ro connection reads it, with its -shm.
            conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
            try:
                conn.execute("SELECT 1 FROM meta LIMIT 1")
                return conn, False
            except sqlite3.OperationalError:
                conn.close()
                if Path(f"{path}-wal").exists():
                    raise
                # The writer checkpointed and removed it meanwhile: the file alone is the database.
        # Without a -wal file, mode=ro on a WAL database would create -wal and -shm (or fail where it
        # cannot); immutable reads the file alone and creates nothing.
        return sqlite3.connect(uri + "&immutable=1", uri=True, isolation_level=None, check_same_thread=False), True

    def _db_signature(self) -> tuple:
        path = self.dir / "items.sqlite"
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return ()
        return st.st_size, st.st_mtime_ns, Path(f"{path}-wal").exists()

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

    @property
    def recall(self) -> str | None:
        """The Milvus address recall runs on, or None for the in-process FAISS."""
        return None if self._remote is None else str(self._remote.address)

    @property
    def faiss(self):
        """The in-memory FAISS index, brought up to the database's generation first."""
        if self._remote is not None:
            raise IndexError_(f"{self.dir}: recall runs on {self._remote.address}, not on an in-process FAISS")
        self._sync()
        index = self._faiss
        if index is None:
            raise IndexError_(f"{self.dir}: this index was closed")
        return index

    def refresh(self) -> int:
        """Bring the in-memory vectors up to the database (writes through other instances or
        processes); every search does this first. Returns the generation."""
        self._sync()
        return self._faiss_gen

    def _vector_files(self) -> list[tuple[int, Path]]:
        found = []
        for p in self.dir.glob("vectors.*.faiss"):
            try:
                found.append((int(p.name.split(".")[1]), p))
            except ValueError:
                continue
        return sorted(found)

    def _shared(self):
        """The flock shared, over reading the generation and its vector file: no writer replaces
        that file meanwhile. Read-only, only where a lock file already exists (none is created)."""
        if not self.read_only:
            return _flock(self._lock_path, exclusive=False)
        if self._lock_path.is_file() and os.access(self._lock_path, os.R_OK):
            return _flock(self._lock_path, exclusive=False, create=False)
        return nullcontext()

    @contextmanager
    def _writing(self):
        """The whole of a write: this process's lock of the directory, then the flock exclusive,
        with this instance's FAISS at the database's generation (healed when the vector file is behind)."""
        if self.read_only:
            raise ReadOnlyIndex(f"{self.dir}: the index directory is read-only: adding or deleting items needs a "
                                f"writable index directory")
        with self._write_lock, self._sync_lock, _flock(self._lock_path, exclusive=True):
            st = os.stat(self.dir)
            if (st.st_dev, st.st_ino) != self._dir_id:
                raise IndexError_(f"{self.dir} was replaced (rebuilt?) since this index was opened: reload it "
                                  f"before writing")
            self._sync_locked()
            yield

    def _sync(self) -> None:
        if self._remote is not None:
            return self._sync_remote()
        if self._faiss is not None and self.generation() == self._faiss_gen:
            return
        with self._sync_lock:
            if self._closed:
                raise IndexError_(f"{self.dir}: this index was closed")
            with self._shared():
                gen = self.generation()
                if gen == self._faiss_gen and self._faiss is not None:
                    return
                index = self._read_vectors(gen)
                if index is None and self.read_only:
                    index, gen = self._rebuild(persist=False)
            if index is not None:
                self._install(index, gen)
                return
        # The vector file is behind the database (a writer died between its commit and the vector
        # write): rebuilding it writes, so it happens under the exclusive lock, in _writing.
        with self._writing():
            pass

    def _sync_remote(self) -> None:
        """Milvus is shared, so other writers' items are there already: only a collection behind
        SQLite (a writer died between its commit and Milvus) needs work, under the exclusive lock."""
        if self._closed:
            raise IndexError_(f"{self.dir}: this index was closed")
        gen = self.generation()
        if gen == self._remote_gen:
            return
        if self._remote.generation() == gen:
            # Another process wrote: this client's Session consistency may not cover its writes yet.
            self._remote_gen, self._remote_strong = gen, True
            return
        if self.read_only:
            # A writer between its SQLite commit and its Milvus write, or one that died there: served
            # as it is (results are checked against SQLite, short lists scored exactly).
            log.debug("%s: %s is behind the item database; serving it as it is.", self.dir, self._remote.address)
            self._remote_gen, self._remote_strong = gen, True
            return
        with self._writing():
            pass

    def _reconcile_remote(self) -> None:
        """Under the exclusive lock: make the Milvus collection hold exactly SQLite's rows."""
        if self.generation() == self._remote_gen:
            return  # every writer bumps the generation: nobody wrote since this instance saw Milvus there
        db = self.db
        db.execute("BEGIN")
        try:
            gen = self.generation()
            if self._remote.generation() == gen:
                self._remote_gen = gen
                return
            rows, emb = self.embeddings()
            fields = {r: f for r, *f in db.execute("SELECT row, category, subcategory, gender, price FROM items")}
        finally:
            db.execute("COMMIT")
        log.warning("%s: %s is behind the item database (an interrupted update?); bringing it up to date.",
                    self.dir, self._remote.address)
        held = self._remote.rows()
        extra = np.setdiff1d(held, rows)
        missing = np.isin(rows, held, invert=True)
        if len(extra):
            self._remote.delete(extra.tolist())
        if missing.any():
            self._remote.upsert(rows[missing], emb[missing], [filter_fields(fields[int(r)]) for r in rows[missing]])
        self._remote.set_generation(gen)
        self._remote_gen, self._remote_strong = gen, True

    def _sync_locked(self) -> None:
        """_sync under the exclusive lock: no writer can move the generation meanwhile."""
        if self._remote is not None:
            return self._reconcile_remote()
        gen = self.generation()
        if gen == self._faiss_gen and self._faiss is not None:
            return
        index = self._read_vectors(gen)
        if index is None:
            index, gen = self._rebuild(persist=True)
        self._install(index, gen)

    def _read_vectors(self, gen: int):
        path = self.dir / f"vectors.{gen}.faiss"
        if not path.is_file():
            return None
        try:
            return faiss.read_index(str(path))
        except RuntimeError as exc:
            raise IndexError_(f"could not read {path} ({str(exc).strip().splitlines()[-1]}): rebuild the index") from None

    def _rebuild(self, persist: bool):
        """The vector file is behind the database: a new FAISS index from the stored embeddings,
        keeping IVF's trained centroids when an older file has them; saved when `persist`."""
        db = self.db
        db.execute("BEGIN")  # the generation and the embeddings of one snapshot
        try:
            gen = self.generation()
            rows, emb = self.embeddings()
        finally:
            db.execute("COMMIT")
        if persist:
            log.warning("%s: the vector file is behind the item database (an interrupted update?); rebuilding it.",
                        self.dir)
        else:
            log.warning("%s: the vector file is behind the item database (an interrupted update?), and the index "
                        "directory is read-only: rebuilding the vectors in memory only, on every open.", self.dir)
        files = self._vector_files()
        base = faiss.read_index(str(files[-1][1])) if files and self.config.kind == "ivf" else None
        index = new_faiss(self.config, self.embed_dim, emb, trained=base)
        if len(rows):
            index.add_with_ids(emb, rows)
        if persist:
            self._save_vectors(index, gen)
        return index, gen

    def _install(self, index, gen: int) -> None:
        self._tune(index)
        with self._faiss_lock:
            self._faiss, self._faiss_gen = index, gen

    def _tune(self, index) -> None:
        if self.config.kind == "ivf":
            faiss.extract_index_ivf(index).nprobe = self.config.nprobe
        elif self.config.kind == "hnsw":
            faiss.downcast_index(index.index).hnsw.efSearch = self.config.ef_search

    def _save_vectors(self, index, gen: int) -> None:
        # Only under the exclusive flock: no reader is between reading the generation and its file.
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
        self._sync()
        if self._remote is not None:
            return self._search_remote(query, n, filters)
        allowed = None
        if filters is not None and filters.active():
            where, args = filters.sql()
            allowed = np.array([r for (r,) in self.db.execute(f"SELECT row FROM items WHERE {where}", args)], dtype=np.int64)
            if not len(allowed):
                return []
        params = None
        if allowed is not None:
            selector = faiss.IDSelectorBatch(allowed)
            if self.config.kind == "ivf":
                params = faiss.SearchParametersIVF(sel=selector, nprobe=self.config.nprobe)
            else:
                params = faiss.SearchParameters(sel=selector)
        with self._faiss_lock:
            index = self._faiss
            if index is None:
                raise IndexError_(f"{self.dir}: this index was closed")
            available = len(allowed) if allowed is not None else index.ntotal
            k = min(n, available)
            # A few spare results cover rows deleted from SQLite and not yet from a stale vector file.
            scores, rows = index.search(query, min(k + 8, max(available, 1)) if allowed is None else k, params=params)
        found = [(int(r), float(s)) for r, s in zip(rows[0], scores[0]) if r >= 0]
        items = self.items_by_row([r for r, _ in found])
        hits = [Hit(r, items[r]["id"], s) for r, s in found if r in items][:k]
        expected = min(k, self.count(filters) if allowed is None else len(allowed))
        if len(hits) < expected:
            hits = self._exact(query[0], k, allowed)
        return hits

    def _search_remote(self, query: np.ndarray, n: int, filters: Filters | None) -> list[Hit]:
        from .milvus import filter_expr

        active = filters is not None and filters.active()
        available = self.count(filters) if active else len(self)
        k = min(n, available)
        if not k:
            return []
        # Strong until one Strong search has succeeded since another process wrote (Session sees
        # only this process's writes); the flag is cleared only after that search returns.
        strong = self._remote_strong
        # A few spare results cover rows deleted from SQLite and not yet from Milvus.
        found = self._remote.search(query[0], k + 8, filter_expr(filters) if active else "", strong=strong)
        if strong:
            self._remote_strong = False
        rows = list(dict.fromkeys(r for r, _ in found))  # an insert retried by a repair can return a row twice
        if active:  # SQLite decides what passes the filter (its case folding, its NULLs)
            where, args = filters.sql()
            marks = ",".join("?" * len(rows))
            passing = {r for (r,) in self.db.execute(f"SELECT row FROM items WHERE row IN ({marks}) AND ({where})",
                                                     [*rows, *args])} if rows else set()
        else:
            passing = None
        items = self.items_by_row(rows)
        seen, hits = set(), []
        for r, score in found:
            if r in items and r not in seen and (passing is None or r in passing):
                seen.add(r)
                hits.append(Hit(r, items[r]["id"], score))
        hits = hits[:k]
        if len(hits) < k:  # an approximate index returned a short filtered list: score the allowed rows exactly
            allowed = None
            if active:
                where, args = filters.sql()
                allowed = np.array([r for (r,) in self.db.execute(f"SELECT row FROM items WHERE {where}", args)],
                                   dtype=np.int64)
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
        """Encode and add items (with images); visible to the next search (through any instance of
        this directory) and persisted. Returns how many."""
        self._check_writable()
        if self.config.kind == "hnsw" and self._remote is None:
            raise IndexError_("an hnsw index cannot be updated in place: rebuild it, or build a flat or ivf index")
        if not items:
            return 0
        ids = [it.id for it in items]
        if len(set(ids)) != len(ids):
            raise ValueError("the items to add repeat an id")
        self._refuse_clash(ids)  # before the encoding, which takes a while
        emb, states = encode_items(model, items, self.config.batch_size, progress)
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        with self._writing():
            self._refuse_clash(ids)  # another writer may have added one meanwhile
            db = self.db
            db.execute("BEGIN IMMEDIATE")
            try:
                first = self._next_row()
                self.patches.write(first, states)  # invisible until the commit below
                insert_items(db, first, items, emb, self.config.jpeg_quality)
                gen = self._bump(db)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            rows = np.arange(first, first + len(items), dtype=np.int64)
            if self._remote is not None:
                self._remote.upsert(rows, emb, [filter_fields(item_fields(it)) for it in items])
                self._remote.set_generation(gen)
                self._remote_gen = gen
                return len(items)
            with self._faiss_lock:
                self._faiss.add_with_ids(emb, rows)
                self._faiss_gen = gen
            self._save_vectors(self._faiss, gen)  # searches go on meanwhile: saving only reads it
        return len(items)

    def delete(self, ids: list[str]) -> list[str]:
        """Remove these ids; returns the ones that were not in the index."""
        self._check_writable()
        if self.config.kind == "hnsw" and self._remote is None:
            raise IndexError_("an hnsw index cannot delete items: rebuild it, or build a flat or ivf index")
        with self._writing():
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
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
            if self._remote is not None:
                self._remote.delete(list(rows.values()))
                self._remote.set_generation(gen)
                self._remote_gen = gen
                return missing
            with self._faiss_lock:
                self._faiss.remove_ids(np.array(list(rows.values()), dtype=np.int64))
                self._faiss_gen = gen
            self._save_vectors(self._faiss, gen)
        return missing

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndex(f"{self.dir}: the index directory is read-only: adding or deleting items needs a "
                                f"writable index directory")

    def _refuse_clash(self, ids: list[str]) -> None:
        clash = self.rows_of(ids)
        if clash:
            raise ValueError(f"{len(clash)} id(s) already in the index, e.g. {next(iter(clash))}: delete them first")

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
        recall = {"faiss_vectors": int(self.faiss.ntotal)} if self._remote is None else \
            {"recall": str(self._remote.address), "milvus_vectors": self._remote.count()}
        return {**{k: v for k, v in self.manifest.items() if k != "config"}, "config": asdict(self.config),
                "items": len(self), "generation": self.generation(), **recall, "read_only": self.read_only}

    # Lifetime ----------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the FAISS index, the patch memory maps and every SQLite connection (of every
        thread); a write in progress finishes first. Using the index afterwards raises IndexError_."""
        with self._sync_lock:
            with self._faiss_lock:
                self._closed = True
                self._faiss = None
        self.patches.close()
        if self._remote is not None:
            self._remote.close()
        with self._conns_lock:
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def __enter__(self) -> "CatalogIndex":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _as_item(row) -> dict:
    out = dict(zip(("row", *DISPLAY), row[:-1]))
    out["metadata"] = json.loads(row[-1]) if row[-1] else {}
    return out


def item_fields(it: CatalogItem) -> tuple:
    """(category, subcategory, gender, price) as SQLite stores them."""
    gender, price = it.metadata.get("gender"), it.metadata.get("price")
    return (it.category, it.subcategory, gender if isinstance(gender, str) else None,
            float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None)


def filter_fields(values: tuple) -> dict:
    return dict(zip(("category", "subcategory", "gender", "price"), values))


def insert_items(db: sqlite3.Connection, first_row: int, items: list[CatalogItem], emb: np.ndarray, quality: int) -> None:
    records = []
    for i, it in enumerate(items):
        meta = dict(it.metadata)
        records.append((first_row + i, it.id, it.product_id, it.name, it.description, *item_fields(it),
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
