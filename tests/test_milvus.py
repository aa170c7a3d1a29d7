"""Recall on a real Milvus server (the embedded standalone `milvus` package, started on loopback by
these tests): the same rankings as FAISS, exact filtered lists, writes visible at once and kept
across a restart and a kill -9 of the server, the model check. Nothing is mocked."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from dataclasses import replace

import httpx
import numpy as np
import pytest

from fashionbert.catalog.readers import open_catalog
from fashionbert.index.build import build
from fashionbert.index.milvus import MilvusAddress, MilvusError, MilvusRecall, MilvusUnavailable, filter_expr
from fashionbert.index.milvus_local import LocalMilvus, free_port
from fashionbert.index.store import CatalogIndex, Filters, IndexConfig, IndexError_
from fashionbert.runtime.exported import ExportedModel

milvus = pytest.importorskip("milvus", reason="the scale extra (pip install '.[scale]') is not installed")
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = LocalMilvus(tmp_path_factory.mktemp("milvus")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return ExportedModel(tiny_model_dir, variant="fp32")


@pytest.fixture(scope="module")
def items(demo_catalog):
    return list(open_catalog(demo_catalog).items())


@pytest.fixture(scope="module")
def queries(model, items):
    """Text embeddings of the validation captions: the queries users send."""
    captions = [it.description or it.name for it in items if it.split == "validation"][:30]
    return model.encode_text(captions).embedding


def ids(hits) -> list[str]:
    return [h.id for h in hits]


def same_ranking(a, b, tol: float = 1e-4) -> bool:
    """Equal id lists, except where neighbouring scores tie (within tol)."""
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if x.id != y.id and abs(x.score - y.score) > tol:
            return False
    return sorted(ids(a)) == sorted(ids(b)) or all(abs(x.score - y.score) <= tol for x, y in zip(a, b))


def exact_top(index: CatalogIndex, query: np.ndarray, n: int, filters: Filters | None) -> list[str]:
    where, args = (filters or Filters()).sql()
    allowed = [r for (r,) in index.db.execute(f"SELECT row FROM items WHERE {where}", args)]
    if not allowed:
        return []
    rows, emb = index.embeddings(allowed)
    order = np.argsort(-(emb @ query), kind="stable")[:n]
    found = index.items_by_row(rows[order].tolist())
    return [found[int(rows[i])]["id"] for i in order]


@pytest.fixture(scope="module")
def both(model, demo_catalog, server, tmp_path_factory):
    """The CI catalog indexed twice: FAISS (flat), and Milvus (HNSW, so filtered lists can come back short)."""
    root = tmp_path_factory.mktemp("indexes")
    catalog = open_catalog(demo_catalog)
    build(model, catalog, root / "faiss", IndexConfig(kind="flat"), split="train", progress=False)
    build(model, catalog, root / "milvus", IndexConfig(kind="hnsw", hnsw_m=8, ef_search=16), split="train",
          progress=False, recall=server.uri("ci_hnsw"))
    faiss_index, milvus_index = CatalogIndex(root / "faiss"), CatalogIndex(root / "milvus")
    yield faiss_index, milvus_index, root
    faiss_index.close()
    milvus_index.close()


# Rankings and filters ----------------------------------------------------------------------------


def test_milvus_gives_the_same_top_10_as_faiss_on_the_ci_catalog(both, queries):
    faiss_index, milvus_index, _ = both
    assert milvus_index.info()["milvus_vectors"] == len(milvus_index) == len(faiss_index)
    for q in queries:
        a, b = faiss_index.search(q, 10), milvus_index.search(q, 10)
        assert same_ranking(a, b), (ids(a), ids(b))


def test_filtered_lists_are_exact_however_rare_the_filter(both, queries, items):
    faiss_index, milvus_index, _ = both
    train = [it for it in items if it.split == "train"]
    rare = min({it.subcategory for it in train}, key=lambda s: sum(it.subcategory == s for it in train))
    prices = sorted(it.metadata["price"] for it in train if isinstance(it.metadata.get("price"), (int, float)))
    cheapest = min(it.metadata["price"] for it in train if it.subcategory == rare)
    rarest = Filters(subcategory=rare, price_max=cheapest)  # one or two of the 96 products
    cases = [Filters(category=train[0].category.upper()), Filters(subcategory=rare), rarest,
             Filters(gender=train[0].metadata.get("gender")), Filters(price_max=prices[2]),
             Filters(category=train[0].category, price_min=prices[len(prices) // 2]),
             Filters(category="NO SUCH CATEGORY")]
    for f in cases:
        matches = milvus_index.count(f)
        for n in (1, 5, 40):
            for q in queries[:4]:
                got = ids(milvus_index.search(q, n, f))
                assert len(got) == min(n, matches), (f, n, len(got), matches)
                assert got == exact_top(milvus_index, q, n, f) or same_ranking(milvus_index.search(q, n, f),
                                                                                faiss_index.search(q, n, f))
    assert 1 <= milvus_index.count(rarest) <= 2  # the rare filter is rare


def test_the_exactness_check_can_fail_without_the_exact_fallback(writable, model, items, queries):
    # The negative control: Milvus behind SQLite (as a writer that died between its commit and
    # Milvus leaves it, until the next writer heals it) returns short filtered lists when asked
    # straight; the check above catches that, and CatalogIndex's exact fallback is what passes it.
    index = CatalogIndex(writable)
    train = [it for it in items if it.split == "train"]
    f = Filters(subcategory=train[0].subcategory)
    matches = index.count(f)
    rows = index.rows_of([it.id for it in train if it.subcategory == f.subcategory][:2])
    index._remote.delete(list(rows.values()))  # behind SQLite's generation is not recorded: no heal
    raw = index._remote.search(queries[0], matches, filter_expr(f), strong=True)
    assert len(raw) < min(matches, matches)  # the check fails on the raw list
    got = index.search(queries[0], matches, f)
    assert len(got) == matches and ids(got) == exact_top(index, queries[0], matches, f)
    index.close()


def test_hnsw_recall_at_100_against_exact_on_a_larger_set(server):
    # Clustered, as product embeddings are (400 looks of 50 items each), not uniform noise.
    rng = np.random.default_rng(0)
    n, dim = 20000, 64
    centres = rng.standard_normal((400, dim)).astype(np.float32)
    emb = centres[rng.integers(0, 400, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    cfg = IndexConfig(kind="hnsw", hnsw_m=16, ef_construction=100, ef_search=256)
    remote = MilvusRecall(server.uri("synthetic_hnsw"), dim, cfg, "synthetic", create=True)
    try:
        rows = np.arange(1, n + 1, dtype=np.int64)
        fields = [{"category": f"c{i % 10}", "subcategory": "s", "gender": None, "price": float(i % 300)} for i in range(n)]
        remote.upsert(rows, emb, fields)
        remote.flush()  # sealed and indexed: the searches below go through HNSW, not an exhaustive scan
        assert remote.count() == n
        recalls = []
        for q in emb[rng.integers(0, n, 20)] + 0.2 * rng.standard_normal((20, dim)).astype(np.float32):
            q /= np.linalg.norm(q)
            truth = set((np.argsort(-(emb @ q))[:100] + 1).tolist())
            got = {r for r, _ in remote.search(q, 100)}
            recalls.append(len(truth & got) / 100)
        print(f"recall@100 {np.mean(recalls):.3f}")
        assert np.mean(recalls) >= 0.95, recalls
    finally:
        remote.close()


# Writes, restarts, kill -9 -----------------------------------------------------------------------


@pytest.fixture
def writable(model, demo_catalog, server, tmp_path, request):
    name = "w_" + request.node.name[-40:].replace("[", "_").replace("]", "_").replace("-", "_")
    build(model, open_catalog(demo_catalog), tmp_path / "idx", IndexConfig(kind="flat"), split="train",
          progress=False, recall=server.uri(name))
    return tmp_path / "idx"


def test_an_add_is_found_at_once_a_delete_never_again_and_both_survive_a_restart(writable, model, items, server):
    new = [it for it in items if it.split == "validation"][:3]
    index = CatalogIndex(writable)
    base = len(index)
    e, _ = model.encode_images(np.stack([it.image for it in new]))
    index.add(new, model)
    for i, it in enumerate(new):
        assert index.search(e[i], 1)[0].id == it.id
    deleted_row = index.rows_of([new[0].id])[new[0].id]
    index.delete([new[0].id])
    assert new[0].id not in ids(index.search(e[0], base + 3))
    assert deleted_row not in set(index._remote.rows().tolist())  # gone from Milvus itself, not only from SQLite
    index.close()

    server.stop()
    server.start()
    again = CatalogIndex(writable)
    assert len(again) == base + 2 and again.info()["milvus_vectors"] == base + 2
    assert new[0].id not in ids(again.search(e[0], base + 3))
    assert again.search(e[1], 1)[0].id == new[1].id
    again.close()


def test_a_kill_9_of_milvus_mid_batch_loses_no_acknowledged_item(writable, model, items, server):
    new = [it for it in items if it.split == "validation"][:24]
    index = CatalogIndex(writable)
    base = len(index)
    acknowledged, failed = [], []
    started = threading.Event()

    def writer():
        for it in new:
            try:
                index.add([it], model)
                acknowledged.append(it.id)
            except MilvusError:
                failed.append(it.id)
            started.set()

    t = threading.Thread(target=writer)
    t.start()
    started.wait(120)
    while len(acknowledged) < 4 and t.is_alive():
        t.join(0.05)
    assert t.is_alive(), "the batch ended before the kill"  # the kill lands mid-batch
    server.kill()
    server.start()  # as a supervisor would; the writer's calls in between fail or wait for it
    t.join(600)
    assert not t.is_alive()
    assert len(acknowledged) >= 4, (acknowledged, failed)
    index.close()

    healed = CatalogIndex(writable)  # brought up to date on open if the kill left Milvus behind SQLite
    assert healed.info()["milvus_vectors"] == len(healed)
    e, _ = model.encode_images(np.stack([it.image for it in new]))
    present = set(ids(healed.search(e[0], len(healed))))
    assert set(acknowledged) <= present
    held = set(healed._remote.rows().tolist())  # in Milvus itself, not only found by the exact fallback
    assert set(healed.rows_of(acknowledged).values()) <= held
    for i, it in enumerate(new):
        if it.id in acknowledged:
            assert healed.search(e[i], 1)[0].id == it.id
    assert len(healed) >= base + len(acknowledged)
    healed.close()


def test_a_collection_behind_the_database_is_repaired_on_open(writable, model, items):
    # As after a writer that died between its SQLite commit and Milvus: two rows missing from
    # Milvus, one there that the database does not have, the generation not recorded.
    index = CatalogIndex(writable)
    train = [it for it in items if it.split == "train"]
    lost = sorted(index.rows_of([train[0].id, train[1].id]).values())
    index._remote.delete(lost)
    e, _ = model.encode_images(np.stack([train[2].image]))
    index._remote.upsert(np.array([10**6], dtype=np.int64), e, [{"category": "x", "subcategory": "x", "price": 1.0}])
    index._remote.set_generation(-1)
    index.close()
    healed = CatalogIndex(writable)
    rows, _ = healed.embeddings()
    assert sorted(healed._remote.rows().tolist()) == sorted(rows.tolist())
    assert healed._remote.generation() == healed.generation()
    healed.close()


def test_an_item_with_fields_longer_than_milvus_holds_is_still_found_by_its_filter(writable, model, items):
    long = "x" * 700  # Milvus keeps 512 bytes of it
    it = replace(next(i for i in items if i.split == "validation"), id="long-fields", category=long)
    index = CatalogIndex(writable)
    index.add([it], model)
    e, _ = model.encode_images(np.stack([it.image]))
    assert ids(index.search(e[0], 5, Filters(category=long))) == ["long-fields"]
    assert ids(index.search(e[0], 1)) == ["long-fields"]
    index.close()


def test_a_search_while_milvus_is_down_is_a_clear_error(writable, model, server, queries):
    index = CatalogIndex(writable)
    server.stop()
    try:
        with pytest.raises(MilvusError, match="Milvus at 127.0.0.1"):
            index.search(queries[0], 5)
    finally:
        server.start()
    assert len(index.search(queries[0], 5)) == 5  # and it recovers when the server is back
    index.close()


def test_the_collection_is_checked_against_the_model(writable, server):
    with pytest.raises(IndexError_, match="holds embeddings of model"):
        MilvusRecall(server.uri("w_" + "test_the_collection_is_checked_against_the_model"[-40:]), 64,
                     IndexConfig(), "another-model-hash")
    built = CatalogIndex(writable)
    uri, model_hash = built.recall, built.manifest["model_hash"]
    built.close()
    with pytest.raises(MilvusError, match="another build of the index") as mismatch:
        MilvusRecall(uri, 64, IndexConfig(), model_hash, build_id="a-different-build")
    with pytest.raises(MilvusError, match="no such collection") as missing:
        MilvusRecall(server.uri("never_built"), 64, IndexConfig(), "x")
    # Mismatches are final; an API waits only for what may come right (service/state.py).
    assert not isinstance(mismatch.value, MilvusUnavailable) and not isinstance(missing.value, MilvusUnavailable)
    with pytest.raises(MilvusUnavailable, match="cannot reach Milvus"):
        MilvusRecall(f"milvus://127.0.0.1:{free_port()}/x", 64, IndexConfig(), "x", timeout=3)
    # A meta collection that answers empty (as a server recovering from a restart can): worth waiting for.
    empty = MilvusRecall(server.uri("empty_meta"), 8, IndexConfig(), "h", create=True)
    empty.meta.delete("key >= 0")
    empty.close()
    with pytest.raises(MilvusUnavailable, match="answers empty"):
        MilvusRecall(server.uri("empty_meta"), 8, IndexConfig(), "h", recovery_s=1)
    for bad in ("http://h:1/c", "milvus://h:1/", "milvus://h:1/bad-name", "milvus://h:port/c"):
        with pytest.raises(ValueError):
            MilvusAddress.parse(bad)


def test_the_cli_builds_adds_to_and_describes_a_milvus_index(model, tiny_model_dir, demo_catalog, server, tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "fashionbert.cli", *map(str, args)], capture_output=True,
                              text=True, timeout=600)

    uri = server.uri("cli_built")
    out = tmp_path / "idx"
    built = cli("--quiet", "index", "build", "--model", tiny_model_dir, "--catalog", demo_catalog, "--split", "train",
                "--out", out, "--recall", uri)
    assert built.returncode == 0, built.stderr
    info = cli("index", "info", "--index", out)
    assert info.returncode == 0 and f'"recall": "{uri}"' in info.stdout and '"milvus_vectors"' in info.stdout
    added = cli("index", "add", "--model", tiny_model_dir, "--catalog", demo_catalog, "--split", "validation",
                "--index", out)
    assert added.returncode == 0, added.stderr
    deleted = cli("index", "delete", "--index", out, next(it.id for it in open_catalog(demo_catalog).items()))
    assert deleted.returncode == 0, deleted.stderr
    with CatalogIndex(out) as index:
        assert index.info()["milvus_vectors"] == len(index) == len(list(open_catalog(demo_catalog).items())) - 1
    down = cli("index", "info", "--index", out, "--recall", f"milvus://127.0.0.1:{free_port()}/cli_built")
    assert down.returncode == 2 and "cannot reach Milvus" in down.stderr and "Traceback" not in down.stderr


def test_the_api_searches_through_milvus_and_answers_503_while_it_is_down(both, tiny_model_dir, server, items):
    from .test_service import Server as Api

    _, _, root = both
    texts = [it.caption for it in items if it.split == "validation"][:8]
    on_faiss, on_milvus = Api(tiny_model_dir, root / "faiss").start(), Api(tiny_model_dir, root / "milvus").start()
    try:
        with httpx.Client(timeout=60) as c:
            for text in texts:
                a = c.post(on_faiss.url + "/search", json={"text": text, "k": 10}).json()
                b = c.post(on_milvus.url + "/search", json={"text": text, "k": 10}).json()
                assert [x["id"] for x in a["items"]] == [x["id"] for x in b["items"]]
            assert c.get(on_milvus.url + "/readyz").json()["status"] == "ready"
            server.stop()
            late = Api(tiny_model_dir, root / "milvus")  # started while Milvus is down: it waits for it
            late.log = open(root / "late.log", "a")
            late.proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "serve", "--port", str(late.port),
                                          "--model", str(tiny_model_dir), "--index", str(root / "milvus")],
                                         env=late.env, stdout=late.log, stderr=subprocess.STDOUT)
            try:
                try:
                    down = c.post(on_milvus.url + "/search", json={"text": texts[0]})
                    waiting = None
                    for _ in range(120):
                        try:
                            waiting = c.get(late.url + "/readyz")
                            if "waiting for the recall server" in waiting.text:
                                break
                        except httpx.HTTPError:
                            pass
                        time.sleep(0.5)
                finally:
                    server.start()
                assert waiting is not None and waiting.status_code == 503 and "cannot reach Milvus" in waiting.text
                # Ready once Milvus is back and serves the collections again, without a restart (a
                # server back from a stop may answer a while before it serves the meta collection).
                deadline = time.monotonic() + 240
                while c.get(late.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
                    time.sleep(0.5)
                ready = c.get(late.url + "/readyz")
                assert ready.status_code == 200, ready.text + (root / "late.log").read_text()[-3000:]
                assert c.post(late.url + "/search", json={"text": texts[0], "k": 3}).status_code == 200
            finally:
                late.stop()
            assert down.status_code == 503 and down.headers["Retry-After"] == "5", down.text
            assert "recall backend is unavailable" in down.json()["detail"] and "Traceback" not in down.text
            back = c.post(on_milvus.url + "/search", json={"text": texts[0], "k": 10})
            assert back.status_code == 200 and len(back.json()["items"]) == 10
    finally:
        on_milvus.stop()
        on_faiss.stop()
