"""Recall on a Milvus server, for catalogs past one machine: the index's embeddings and filter fields
in a Milvus collection instead of an in-process FAISS.

The index directory stays the source of truth (SQLite: ids, metadata, images, embeddings; the patch
file beside the rerankers); the collection is derived from it, like the FAISS vector files. Every
write commits to SQLite first, then to Milvus, then records the SQLite generation it reached in a
meta collection. A writer that died in between leaves Milvus behind that generation: the
next writer, or the next open, compares the rows and brings the collection up to date.

Consistency: under Milvus' default (Bounded) an acknowledged delete was still returned, and an
upsert invisible, right after the write. Strong fixes that but waits for the server's time tick
(about 300 ms a call here). So searches run at Session consistency, which sees every write made
through this client, and at Strong once after another process wrote (CatalogIndex sees that
in the SQLite generation). Generation reads and reconciling queries are Strong.

URI: milvus://HOST:PORT/COLLECTION (COLLECTION: letters, digits and underscores).
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from .patches import IndexError_

log = logging.getLogger(__name__)
STRONG = "Strong"
TEXT_FIELDS = ("category", "subcategory", "gender")
READ_TIMEOUT = 10  # seconds a search waits for an unavailable server before a clear error
CHUNK = 4096  # rows per insert or query page (Milvus caps a query's window at 16,384)


class MilvusError(IndexError_):
    """Milvus could not be reached, or its collection does not match the index."""


class MilvusUnavailable(MilvusError):
    """Milvus cannot serve the collection now but may soon: unreachable, or back from a restart and
    not yet serving what it holds. Worth waiting for, unlike a collection that does not match."""


@dataclass(frozen=True)
class MilvusAddress:
    host: str
    port: int
    collection: str

    @classmethod
    def parse(cls, uri: str) -> "MilvusAddress":
        parts = urlsplit(uri)
        name = parts.path.strip("/")
        if parts.scheme != "milvus" or not parts.hostname or not name:
            raise ValueError(f"{uri!r} is not a Milvus address: use milvus://HOST:PORT/COLLECTION")
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,200}", name):
            raise ValueError(f"Milvus collection name {name!r}: use letters, digits and underscores")
        try:
            port = parts.port or 19530
        except ValueError:
            raise ValueError(f"{uri!r}: the port is not a number") from None
        return cls(parts.hostname, port, name)

    def __str__(self) -> str:
        return f"milvus://{self.host}:{self.port}/{self.collection}"


TEXT_BYTES = 512


def _text(value) -> str:
    # SQLite filters compare these fields case-insensitively: Milvus holds them lowercased, cut to
    # the field's size (a longer value then matches no expression, and its filtered lists come
    # back short: CatalogIndex scores those exactly).
    if not isinstance(value, str):
        return ""
    return value.lower().encode()[:TEXT_BYTES].decode(errors="ignore")


def filter_expr(filters) -> str:
    """A Milvus boolean expression equal to Filters.sql() (empty: no filter)."""
    clauses = []
    for key in TEXT_FIELDS:
        value = getattr(filters, key)
        if value is not None:
            clauses.append(f"{key} == {_quote(value.lower())}")
    if filters.price_min is not None:
        clauses.append(f"(has_price == true and price >= {float(filters.price_min)!r})")
    if filters.price_max is not None:
        clauses.append(f"(has_price == true and price <= {float(filters.price_max)!r})")
    return " and ".join(clauses)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusRecall:
    """One collection: `row` (the SQLite row number) as the primary key, the embedding, the filter
    fields. `kind`: flat, ivf or hnsw (the index's IndexConfig kinds), with its parameters."""

    def __init__(self, uri: str, dim: int, config, model_hash: str, create: bool = False, timeout: float = 30.0,
                 build_id: str = "", recovery_s: int = 30):
        pymilvus = _pymilvus()
        MilvusException, connections = pymilvus.MilvusException, pymilvus.connections

        self.address = MilvusAddress.parse(uri)
        self.dim, self.config, self.model_hash, self.timeout = dim, config, model_hash, timeout
        self.build_id = build_id  # the index directory's build: a collection serves one build only
        self.recovery_s = recovery_s  # how long an empty meta collection is waited for at open
        self._exc = MilvusException
        self.alias = f"fashionbert-{id(self)}"
        try:
            connections.connect(alias=self.alias, host=self.address.host, port=str(self.address.port),
                                timeout=max(int(math.ceil(timeout)), 1))
        except Exception as exc:  # pymilvus raises its own and grpc's errors
            raise MilvusUnavailable(f"cannot reach Milvus at {self.address.host}:{self.address.port} ({_reason(exc)})") from None
        try:
            self._open(create)
        except BaseException as exc:
            self.close()  # a caller that tries again must not pile up connections
            if isinstance(exc, IndexError_) or not type(exc).__module__.startswith(("grpc", "pymilvus")):
                raise
            # The server answered, but not with what it holds (a load that timed out after a
            # restart, a node still starting): worth waiting for. What it holds that does not match
            # the index is reported above, as a MilvusError or IndexError_.
            raise MilvusUnavailable(f"Milvus at {self.address.host}:{self.address.port}: {_reason(exc)}") from None

    # Collections -------------------------------------------------------------------------------

    def _open(self, create: bool) -> None:
        from pymilvus import Collection, utility

        name, meta = self.address.collection, self.address.collection + "_meta"
        exists = utility.has_collection(name, using=self.alias) and utility.has_collection(meta, using=self.alias)
        if create:
            for n in (name, meta):
                if utility.has_collection(n, using=self.alias):
                    utility.drop_collection(n, using=self.alias)
            self._create()
        elif not exists:
            raise MilvusError(f"{self.address}: no such collection: build the index with --recall {self.address}")
        self.items = Collection(name, using=self.alias, consistency_level="Session")
        self.meta = Collection(meta, using=self.alias, consistency_level=STRONG)
        self._load()
        found = self._meta_row()
        for _ in range(self.recovery_s):  # a server that has just restarted may answer before its data is loaded
            if found is not None or create:
                break
            time.sleep(1)
            self._load()
            found = self._meta_row()
        if found is None:
            # Every build writes a meta record before it returns, so an empty meta collection is a
            # server that is still recovering (seen after restarts and a kill -9: served again later).
            raise MilvusUnavailable(f"{self.address}: its meta collection answers empty, as a Milvus server does while it "
                                    f"is still recovering after a restart; if it stays so, rebuild the index")
        if found["model"] != self.model_hash:
            raise IndexError_(f"{self.address} holds embeddings of model {found['model']}, but the index directory's "
                              f"model is {self.model_hash}: rebuild the index with --recall {self.address}")
        if self.build_id and found.get("build") != self.build_id:
            raise MilvusError(f"{self.address} holds another build of the index ({found.get('build')}; this "
                              f"directory's is {self.build_id}): rebuild the index with --recall {self.address}, or "
                              f"point --recall at the collection it was built with")
        dim = next(f.params["dim"] for f in self.items.schema.fields if f.name == "embedding")
        if dim != self.dim:
            raise MilvusError(f"{self.address}: embeddings of {dim} dimensions, the index has {self.dim}")

    def _load(self) -> None:
        """Load both collections and wait until they are served (after a restart, load() can return
        while the query nodes are still recovering, and queries then come back empty)."""
        from pymilvus import utility

        for collection in (self.items, self.meta):
            collection.load(timeout=self.timeout)
            utility.wait_for_loading_complete(collection.name, timeout=self.timeout, using=self.alias)

    def _create(self) -> None:
        from pymilvus import Collection, CollectionSchema, DataType, FieldSchema

        fields = [FieldSchema("row", DataType.INT64, is_primary=True, auto_id=False),
                  FieldSchema("embedding", DataType.FLOAT_VECTOR, dim=self.dim),
                  *[FieldSchema(k, DataType.VARCHAR, max_length=TEXT_BYTES) for k in TEXT_FIELDS],
                  FieldSchema("price", DataType.DOUBLE), FieldSchema("has_price", DataType.BOOL)]
        items = Collection(self.address.collection, CollectionSchema(fields, description="fashionbert recall"),
                           using=self.alias, consistency_level="Session")
        items.create_index("embedding", self._index_params(), index_name="embedding")
        for key in TEXT_FIELDS:
            items.create_index(key, {"index_type": "Trie"}, index_name=f"{key}_trie")
        meta_fields = [FieldSchema("key", DataType.INT64, is_primary=True, auto_id=False),
                       FieldSchema("generation", DataType.INT64),
                       FieldSchema("model", DataType.VARCHAR, max_length=128),
                       FieldSchema("build", DataType.VARCHAR, max_length=128),
                       FieldSchema("unused", DataType.FLOAT_VECTOR, dim=2)]  # Milvus needs a vector field
        meta = Collection(self.address.collection + "_meta", CollectionSchema(meta_fields), using=self.alias,
                          consistency_level=STRONG)
        meta.create_index("unused", {"index_type": "FLAT", "metric_type": "L2", "params": {}})
        meta.load()
        meta.insert([self._meta_record(-1)])

    def _index_params(self) -> dict:
        kind = self.config.kind
        if kind == "hnsw":
            return {"index_type": "HNSW", "metric_type": "IP",
                    "params": {"M": self.config.hnsw_m, "efConstruction": self.config.ef_construction}}
        if kind == "ivf":
            return {"index_type": "IVF_FLAT", "metric_type": "IP", "params": {"nlist": self.config.nlist or 1024}}
        return {"index_type": "FLAT", "metric_type": "IP", "params": {}}

    def _meta_record(self, gen: int) -> dict:
        return {"key": time.time_ns(), "generation": int(gen), "model": self.model_hash, "build": self.build_id,
                "unused": [0.0, 0.0]}

    def _meta_row(self, timeout: float | None = None) -> dict | None:
        # The newest record wins. Records are only inserted (older ones deleted after): with one
        # row upserted in place, a new client found the collection empty after a few restarts
        # and a kill -9 of the server.
        rows = self.meta.query("key >= 0", output_fields=["key", "generation", "model", "build"],
                               consistency_level=STRONG, timeout=max(int(math.ceil(timeout or self.timeout)), 1))
        return max(rows, key=lambda r: int(r["key"])) if rows else None

    # Generation --------------------------------------------------------------------------------

    def generation(self) -> int:
        """The SQLite generation the collection holds every write of (-1: being built)."""
        found = self._call(self._meta_row, timeout=READ_TIMEOUT)
        if found is None:
            raise MilvusUnavailable(f"{self.address}: its meta collection answers empty (recovering after a restart?)")
        return int(found["generation"])

    def set_generation(self, gen: int) -> None:
        record = self._meta_record(gen)
        self._call(self.meta.insert, [record])
        self._call(self.meta.delete, f"key < {record['key']}")  # never the newest

    # Writes ------------------------------------------------------------------------------------

    def upsert(self, rows: np.ndarray, emb: np.ndarray, fields: list[dict]) -> None:
        """`fields`: per row, its category, subcategory, gender and price (as in SQLite)."""
        for i in range(0, len(rows), CHUNK):
            batch = []
            for r, e, f in zip(rows[i : i + CHUNK], emb[i : i + CHUNK], fields[i : i + CHUNK]):
                price = f.get("price")
                has_price = isinstance(price, (int, float)) and not isinstance(price, bool) and math.isfinite(price)
                batch.append({"row": int(r), "embedding": np.asarray(e, dtype=np.float32).tolist(),
                              **{k: _text(f.get(k)) for k in TEXT_FIELDS},
                              "price": float(price) if has_price else 0.0, "has_price": bool(has_price)})
            self._call(self.items.insert, batch)

    def delete(self, rows: list[int]) -> None:
        for i in range(0, len(rows), CHUNK):
            chunk = ",".join(str(int(r)) for r in rows[i : i + CHUNK])
            self._call(self.items.delete, f"row in [{chunk}]")

    def flush(self) -> None:
        """Seal what was written into segments, wait for their vector index and reload (a build's end;
        not needed for visibility)."""
        self._call(self.items.flush)
        # The meta record too: sealed, a restarted server serves it from storage, not from its log.
        self._call(self.meta.flush)
        utility = _pymilvus().utility
        self._call(utility.wait_for_index_building_complete, self.address.collection, index_name="embedding",
                   using=self.alias)
        # Reloaded, the query nodes serve the sealed segments through their own index; until then
        # they may serve them as growing ones, through Milvus' interim IVF, whose fixed nprobe ignores
        # ef and nprobe (measured: recall@100 0.63 at any ef on 20,000 items, 0.94 at ef 256 after).
        self._call(self.items.release)
        self._call(self.items.load)

    def rows(self) -> np.ndarray:
        """Every row number the collection holds (for reconciling with SQLite)."""
        found, last = [], -1
        while True:
            page = self._call(self.items.query, f"row > {last}", output_fields=["row"], limit=CHUNK,
                              consistency_level=STRONG)
            if not page:
                break
            batch = sorted(int(p["row"]) for p in page)
            found += batch
            last = batch[-1]
        return np.array(found, dtype=np.int64)

    # Search ------------------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int, expr: str = "", strong: bool = False) -> list[tuple[int, float]]:
        """The k nearest (row, inner product) passing `expr`, best first. `strong`: see writes made
        through other clients too (slower); otherwise those made through this one."""
        if self.config.kind == "hnsw":
            params = {"metric_type": "IP", "params": {"ef": max(self.config.ef_search, k)}}
        elif self.config.kind == "ivf":
            params = {"metric_type": "IP", "params": {"nprobe": self.config.nprobe}}
        else:
            params = {"metric_type": "IP", "params": {}}
        found = self._call(self.items.search, [np.asarray(query, dtype=np.float32).ravel().tolist()], "embedding",
                           params, limit=min(k, 16384), expr=expr or None,
                           consistency_level=STRONG if strong else "Session", timeout=READ_TIMEOUT)
        return [(int(hit.id), float(hit.distance)) for hit in found[0]]

    def count(self) -> int:
        return int(self._call(self.items.query, "", output_fields=["count(*)"], consistency_level=STRONG)[0]["count(*)"])

    def close(self) -> None:
        from pymilvus import connections

        try:
            connections.disconnect(self.alias)
        except Exception:
            pass

    def _call(self, fn, *args, timeout: float | None = None, **kwargs):
        # pymilvus retries an unavailable server 75 times (minutes) unless the timeout is an int,
        # which then bounds the retries too.
        seconds = max(int(math.ceil(timeout or self.timeout)), 1)
        try:
            try:
                return fn(*args, timeout=seconds, **kwargs)
            except self._exc as exc:
                if "not loaded" not in str(exc):
                    raise
                # A restarted server holds the collections unloaded: load them and try again.
                log.warning("%s was restarted: loading its collections again.", self.address)
                self._load()
                return fn(*args, timeout=seconds, **kwargs)
        except self._exc as exc:
            raise MilvusError(f"Milvus at {self.address.host}:{self.address.port}: {_reason(exc)}") from None
        except Exception as exc:
            if type(exc).__module__.startswith(("grpc", "pymilvus")):
                raise MilvusError(f"Milvus at {self.address.host}:{self.address.port}: {_reason(exc)}") from None
            raise


def _pymilvus():
    """pymilvus 2.3, imported without its import-time deprecation warnings (pkg_resources, marshmallow)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        import pymilvus
    return pymilvus


def _reason(exc: Exception) -> str:
    text = str(getattr(exc, "message", "") or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
