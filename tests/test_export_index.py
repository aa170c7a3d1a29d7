"""Export to ONNX and the FAISS index: parity with PyTorch, a torch-free process, updates, filters, crashes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from fashionbert.catalog.demo import generate
from fashionbert.catalog.readers import open_catalog
from fashionbert.runtime.exported import ExportedModel, ModelError
from fashionbert.index.search import Searcher
from fashionbert.index.build import build
from fashionbert.index.store import CatalogIndex, Filters, IndexConfig, IndexError_, IndexMismatch
from fashionbert.model.export import parity
from fashionbert.model.onnx_graphs import CrossEncoder, ImageTower, TextTower
from fashionbert.model.protocol import protocol_ranks
from fashionbert.model.fashionbert import load_model
from fashionbert.model.features import FeatureConfig, PatchFeatureExtractor


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "fashionbert.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, **kw)


@pytest.fixture(scope="module")
def run_dir(tiny_run):
    return tiny_run


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir


@pytest.fixture(scope="module")
def model(model_dir):
    return ExportedModel(model_dir, variant="fp32")


@pytest.fixture(scope="module")
def items(demo_catalog):
    return list(open_catalog(demo_catalog).items())


@pytest.fixture
def index_dir(model, demo_catalog, tmp_path):
    build(model, open_catalog(demo_catalog), tmp_path / "index", progress=False)
    return tmp_path / "index"


# Export ------------------------------------------------------------------------------------------


def test_export_writes_a_complete_manifest(model_dir):
    m = json.loads((model_dir / "manifest.json").read_text())
    assert m["layers"] == 2 and m["fusion_layers"] == 1 and m["num_patches"] == 64 and m["embed_dim"] == 256
    assert m["opset"] == 17 and {"torch", "onnx", "onnxruntime"} <= set(m["versions"])
    assert set(m["cross_encoder_variants"]) == {"fp32", "optimized", "int8", "optimized-int8", "mixed-int8"}
    for name in [m["text_tower"], m["image_tower"], *m["cross_encoder_variants"].values(), "tokenizer.json"]:
        assert (model_dir / name).is_file()
    variants = m["selection"]["variants"]
    chosen = variants[m["default_variant"]]
    assert chosen["scored"] and chosen["eligible"] and variants["fp32"]["scored"]
    # Every faster variant was scored and lost too much; slower ones needed no scoring.
    for name, v in variants.items():
        if v["rerank_k20_ms"] < chosen["rerank_k20_ms"]:
            assert v["scored"] and not v["eligible"] and v["r1_loss"] > 1.0, name
        elif name not in ("fp32", m["default_variant"]):
            assert not v["scored"], name
    assert "Could not find an implementation" in m["selection"]["bf16"] or m["selection"]["bf16"] == "supported"
    # Chosen on the lists /search reranks, every variant on the same ones: fp32 agrees with itself.
    assert m["selection"]["K"] == min(20, m["selection"]["items"]) and variants["fp32"]["top1_agreement"] == 1.0


def test_onnx_matches_pytorch_within_1e4_on_real_items(run_dir, model, items):
    torch_model, _ = load_model(run_dir / "model")
    torch_model.float().eval()
    extractor = PatchFeatureExtractor(FeatureConfig("grid")).eval()
    diffs = parity(torch_model, extractor, model, items[:12], model.tokenizer)
    assert max(diffs.values()) <= 1e-4, diffs


def test_onnx_and_pytorch_rank_an_evaluation_draw_identically(run_dir, model, items):
    torch_model, _ = load_model(run_dir / "model")
    torch_model.float().eval()
    captions = [it.caption for it in items]
    pixels = np.stack([it.image for it in items])
    enc = model.tokenizer(captions)
    with torch.no_grad():
        _, t_states = TextTower(torch_model)(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
        _, v_states = ImageTower(torch_model, PatchFeatureExtractor(FeatureConfig("grid")).eval())(torch.from_numpy(pixels))
    text = model.encode_text(captions)
    _, o_states = model.encode_images(pixels)
    cross = CrossEncoder(torch_model)

    def torch_score(t, v):
        with torch.no_grad():
            return cross(t_states[t], torch.from_numpy(enc.mask[t]), v_states[v]).numpy()

    def onnx_score(t, v):
        return model.match_logits(text.states[t], text.mask[t], o_states[v])

    sub = np.array([hash(it.subcategory) % 1000 for it in items])
    a = protocol_ranks(torch_score, np.arange(len(items)), sub, 20, negatives=20)
    b = protocol_ranks(onnx_score, np.arange(len(items)), sub, 20, negatives=20)
    for d in ("t2i", "i2t"):
        assert np.array_equal(a[d], b[d])


def test_every_variant_loads_and_scores_close_to_fp32(model_dir, model, items):
    text = model.encode_text([items[0].caption])
    _, states = model.encode_images(np.stack([it.image for it in items[:8]]))
    ref = model.rerank_logits(text, 0, states)
    for variant in ("optimized", "int8", "optimized-int8", "mixed-int8"):
        got = ExportedModel(model_dir, variant=variant).rerank_logits(text, 0, states)
        assert got.shape == ref.shape and np.all(np.isfinite(got))
        assert np.abs(got - ref).max() < (1e-3 if variant == "optimized" else 1.0)


def test_missing_or_broken_model_files_are_clear_errors(model_dir, tmp_path):
    with pytest.raises(ModelError, match="no manifest.json"):
        ExportedModel(tmp_path)
    broken = tmp_path / "model"
    shutil.copytree(model_dir, broken)
    (broken / "cross_encoder.fp32.onnx").unlink()
    with pytest.raises(ModelError, match="cross-encoder file cross_encoder.fp32.onnx is missing"):
        ExportedModel(broken, variant="fp32")
    with pytest.raises(ModelError, match="no cross-encoder variant 'bf16'"):
        ExportedModel(model_dir, variant="bf16")
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ExportedModel(broken)


# A process without torch -------------------------------------------------------------------------

TORCH_FREE = textwrap.dedent("""
    import json, sys
    import numpy as np
    from fashionbert.runtime.exported import ExportedModel
    from fashionbert.index.search import Searcher
    from fashionbert.index.store import CatalogIndex
    model = ExportedModel(sys.argv[1], variant="fp32")
    index = CatalogIndex(sys.argv[2], model_hash=model.model_hash)
    searcher = Searcher(model, index)
    out = {}
    for q in json.loads(sys.argv[3]):
        r = searcher.search_text(q, k=int(sys.argv[4]), candidates=int(sys.argv[4]), rerank_k=10)
        out[q] = [x.id for x in r.results]
    assert "torch" not in sys.modules, "serving imported torch"
    print(json.dumps({"rankings": out, "modules": sorted(m for m in sys.modules if m.split(".")[0] in
                      ("onnxruntime", "tokenizers", "faiss", "numpy", "torch"))}))
""")


def test_a_torch_free_process_reproduces_the_pytorch_rankings(run_dir, model_dir, index_dir, items, tmp_path):
    queries = [it.caption for it in items[:6]]
    # The CI run holds out too few products to fit the rerank weight (it is 1); serve a copy with
    # another weight, as a full run's export would carry, to check the rerank applies it.
    assert ExportedModel(model_dir).manifest["cross_weight"] == 1.0
    served_dir = tmp_path / "weighted"
    shutil.copytree(model_dir, served_dir)
    manifest = json.loads((served_dir / "manifest.json").read_text())
    (served_dir / "manifest.json").write_text(json.dumps({**manifest, "cross_weight": 0.35}))
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, str(served_dir), str(index_dir), json.dumps(queries),
                           str(len(items))],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    served = json.loads(proc.stdout)
    assert "torch" not in {m.split(".")[0] for m in served["modules"]}

    # The same search in PyTorch: towers, cosine recall over every item, fused rerank of the top 10.
    torch_model, _ = load_model(run_dir / "model")
    torch_model.float().eval()
    tok = ExportedModel(model_dir, variant="fp32").tokenizer
    pixels = torch.from_numpy(np.stack([it.image for it in items]))
    scale = float(torch_model.itc.scale().detach())
    unweighted_differs = False
    with torch.no_grad():
        v, v_states = ImageTower(torch_model, PatchFeatureExtractor(FeatureConfig("grid")).eval())(pixels)
        for q in queries:
            enc = tok([q])
            t, t_states = TextTower(torch_model)(torch.from_numpy(enc.ids), torch.from_numpy(enc.mask))
            cos = (v @ t[0]).numpy()
            order = np.argsort(-cos, kind="stable")
            top = order[:10]
            logits = CrossEncoder(torch_model)(t_states.expand(10, -1, -1), torch.from_numpy(enc.mask).expand(10, -1),
                                               v_states[top]).numpy()
            ranked = {w: [items[i].id for i in top[np.argsort(-(w * logits + scale * cos[top]), kind="stable")]]
                      for w in (0.35, 1.0)}
            assert served["rankings"][q] == ranked[0.35] + [items[i].id for i in order[10:]]
            unweighted_differs |= ranked[0.35] != ranked[1.0]
    assert unweighted_differs, "the weight changed no ranking: this check could not tell it was applied"


# Index -------------------------------------------------------------------------------------------


def test_build_stores_everything_and_finds_each_image_by_its_own_embedding(model, index_dir, items):
    index = CatalogIndex(index_dir, model_hash=model.model_hash)
    assert len(index) == len(items) and index.faiss.ntotal == len(items)
    info = index.info()
    assert info["bytes_per_item"]["patch_states"] == 64 * model.hidden_size * 2
    emb, states = model.encode_images(np.stack([it.image for it in items[:5]]))
    for i in range(5):
        assert index.search(emb[i], 1)[0].id == items[i].id
    rows = index.rows_of([it.id for it in items[:5]])
    stored = index.patches.read([rows[it.id] for it in items[:5]])
    np.testing.assert_allclose(stored, states, atol=0.02)  # float16 storage
    meta = index.item(items[0].id)
    assert meta["name"] == items[0].name and meta["gender"] == items[0].metadata["gender"]
    assert index.image(items[0].id)[:2] == b"\xff\xd8"  # a JPEG
    assert index.item("no-such-id") is None


def test_a_build_reuses_the_training_features_for_unchanged_images(model, run_dir, demo_catalog, tmp_path, items):
    from PIL import Image

    catalog = tmp_path / "catalog"
    shutil.copytree(demo_catalog, catalog)
    first = json.loads((catalog / "catalog.jsonl").read_text().splitlines()[0])
    image = catalog / first["image"]
    Image.open(image).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(image)  # changed since the features were made

    plain = build(model, open_catalog(catalog), tmp_path / "plain", progress=False)
    reused = build(model, open_catalog(catalog), tmp_path / "reused", progress=False, features=run_dir.parent / "grid.h5")
    assert plain["from_cached_features"] == 0 and reused["from_cached_features"] == len(items) - 1
    a, b = CatalogIndex(tmp_path / "plain"), CatalogIndex(tmp_path / "reused")
    rows = a.rows_of([it.id for it in items])
    assert rows == b.rows_of([it.id for it in items])
    ra, ea = a.embeddings()
    rb, eb = b.embeddings()
    assert np.array_equal(ra, rb)
    # The CNN's features stored in float16 (and made the way training made them): the same embeddings.
    assert (ea * eb).sum(1).min() > 0.999
    np.testing.assert_allclose(b.patches.read([rows[first["id"]]]), a.patches.read([rows[first["id"]]]), atol=1e-3)
    for it in items[1:6]:
        assert b.search(ea[int(np.flatnonzero(ra == rows[it.id])[0])], 1)[0].id == it.id
    # Features made another way (one global vector per image) are never fed to the grid model's head.
    from fashionbert.model.feature_cache import compute_features

    compute_features(open_catalog(catalog), tmp_path / "global.h5", mode="global", progress=False)
    other = build(model, open_catalog(catalog), tmp_path / "other", progress=False, features=tmp_path / "global.h5")
    assert other["from_cached_features"] == 0


def test_int8_patch_storage_is_half_the_size_and_close(model, demo_catalog, tmp_path, items):
    build(model, open_catalog(demo_catalog), tmp_path / "i8", IndexConfig(patch_dtype="int8"), progress=False)
    index = CatalogIndex(tmp_path / "i8")
    assert index.patches.bytes_per_item == 64 * model.hidden_size + 64 * 2
    _, states = model.encode_images(np.stack([it.image for it in items[:4]]))
    rows = index.rows_of([it.id for it in items[:4]])
    got = index.patches.read([rows[it.id] for it in items[:4]])
    assert np.abs(got - states).max() <= np.abs(states).max() / 127 + 1e-3


def test_a_mismatched_model_refuses_to_load(index_dir, model_dir, demo_catalog):
    with pytest.raises(IndexMismatch, match="rebuild the index"):
        CatalogIndex(index_dir, model_hash="0" * 32)
    manifest = json.loads((index_dir / "manifest.json").read_text())
    manifest["model_hash"] = "f" * 32
    (index_dir / "manifest.json").write_text(json.dumps(manifest))
    proc = cli("index", "search", "--model", model_dir, "--index", index_dir, "--text", "red shirt")
    assert proc.returncode == 2 and "was built with model ffff" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_add_and_delete_are_immediate_and_persisted(model, demo_catalog, tmp_path, items, kind):
    catalog = open_catalog(demo_catalog)
    build(model, catalog, tmp_path / "idx", IndexConfig(kind=kind, nlist=2, nprobe=2), split="train", progress=False)
    index = CatalogIndex(tmp_path / "idx", model_hash=model.model_hash)
    new = [it for it in items if it.split == "validation"]
    before = len(index)
    assert index.add(new, model) == len(new)
    emb, _ = model.encode_images(np.stack([it.image for it in new]))
    assert index.search(emb[0], 1)[0].id == new[0].id
    with pytest.raises(ValueError, match="already in the index"):
        index.add(new[:1], model)

    gone = new[0].id
    assert index.delete([gone, "no-such-id"]) == ["no-such-id"]
    everything = len(index)
    assert everything == before + len(new) - 1
    assert gone not in [h.id for h in index.search(emb[0], everything)]

    reopened = CatalogIndex(tmp_path / "idx", model_hash=model.model_hash)  # as after a restart
    assert len(reopened) == everything and reopened.faiss.ntotal == everything
    ids = [h.id for h in reopened.search(emb[0], everything + 5)]
    assert gone not in ids and new[1].id in ids and len(ids) == everything
    assert reopened.item(gone) is None


def test_hnsw_is_rebuild_only(model, demo_catalog, tmp_path, items):
    build(model, open_catalog(demo_catalog), tmp_path / "h", IndexConfig(kind="hnsw"), progress=False)
    index = CatalogIndex(tmp_path / "h")
    emb, _ = model.encode_images(items[0].image[None])
    assert index.search(emb[0], 1)[0].id == items[0].id
    with pytest.raises(IndexError_, match="rebuild"):
        index.delete([items[0].id])
    with pytest.raises(IndexError_, match="rebuild"):
        index.add(items[:1], model)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_filters_return_n_results_however_deep_the_matches(model, demo_catalog, tmp_path, items, kind):
    # One probed list of four: most matching items sit in lists an unfiltered search never visits.
    build(model, open_catalog(demo_catalog), tmp_path / kind, IndexConfig(kind=kind, nlist=4, nprobe=1, ef_search=4),
          progress=False)
    index = CatalogIndex(tmp_path / kind)
    emb, _ = model.encode_images(items[0].image[None])
    target = next(it for it in items if it.subcategory != items[0].subcategory)
    matching = [it for it in items if it.subcategory == target.subcategory]
    hits = index.search(emb[0], 5, Filters(subcategory=target.subcategory.lower()))  # case does not matter
    assert len(hits) == min(5, len(matching))
    assert {h.id for h in hits} <= {it.id for it in matching}
    # The same items, in the same order, as an exact search over the matching items.
    exact = sorted(((float(e @ emb[0]), it.id) for it, e in
                    zip(matching, model.encode_images(np.stack([it.image for it in matching]))[0])), reverse=True)
    assert [h.id for h in hits] == [i for _, i in exact[:5]]

    prices = sorted(it.metadata["price"] for it in items)
    lo, hi = prices[10], prices[20]
    hits = index.search(emb[0], 100, Filters(price_min=lo, price_max=hi))
    assert len(hits) == sum(lo <= p <= hi for p in prices)
    gender = items[0].metadata["gender"]
    hits = index.search(emb[0], 100, Filters(gender=gender, category=items[0].category))
    assert len(hits) == sum(it.metadata["gender"] == gender and it.category == items[0].category for it in items)
    assert index.search(emb[0], 10, Filters(subcategory="NO SUCH THING")) == []


def test_a_crash_between_commit_and_vector_write_heals_on_open(model, demo_catalog, tmp_path, items):
    catalog = open_catalog(demo_catalog)
    build(model, catalog, tmp_path / "idx", split="train", progress=False)
    saved = tmp_path / "vectors.1.faiss"
    shutil.copy(tmp_path / "idx" / "vectors.1.faiss", saved)
    index = CatalogIndex(tmp_path / "idx")
    new = [it for it in items if it.split == "validation"][:3]
    index.add(new, model)
    # As if the process died after the SQLite commit, before vectors.2.faiss was written.
    (tmp_path / "idx" / "vectors.2.faiss").unlink()
    shutil.copy(saved, tmp_path / "idx" / "vectors.1.faiss")
    healed = CatalogIndex(tmp_path / "idx")
    emb, _ = model.encode_images(new[0].image[None])
    assert healed.search(emb[0], 1)[0].id == new[0].id
    assert healed.faiss.ntotal == len(healed) and (tmp_path / "idx" / "vectors.2.faiss").is_file()


def test_killing_a_build_leaves_the_previous_index_intact(model_dir, demo_catalog, tmp_path, items):
    index_dir = tmp_path / "index"
    assert cli("index", "build", "--model", model_dir, "--catalog", demo_catalog, "--out", index_dir,
               "--split", "train").returncode == 0
    before = CatalogIndex(index_dir).info()
    big = generate(tmp_path / "big", n=400, seed=5).out
    proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "index", "build", "--model", str(model_dir),
                             "--catalog", str(big), "--out", str(index_dir), "--overwrite", "--batch-size", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    tmp_dirs = []
    while time.time() < deadline and proc.poll() is None:
        tmp_dirs = [p for p in tmp_path.glob(".index.tmp-*") if (p / "items.sqlite").exists()]
        if tmp_dirs and (tmp_dirs[0] / "patches.bin").exists() and (tmp_dirs[0] / "patches.bin").stat().st_size > 0:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the build finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    after = CatalogIndex(index_dir)
    assert after.info()["items"] == before["items"] and after.generation() == before["generation"]
    assert after.faiss.ntotal == before["items"]
    # The next build clears what the killed one left behind.
    assert cli("index", "build", "--model", model_dir, "--catalog", demo_catalog, "--out", index_dir,
               "--overwrite").returncode == 0
    assert not list(tmp_path.glob(".index.tmp-*"))
    assert CatalogIndex(index_dir).info()["items"] == len(items)


def test_cli_add_delete_info_search(model_dir, demo_catalog, tmp_path, items):
    index_dir = tmp_path / "index"
    assert cli("--quiet", "index", "build", "--model", model_dir, "--catalog", demo_catalog, "--out", index_dir,
               "--split", "train").returncode == 0
    proc = cli("index", "add", "--model", model_dir, "--index", index_dir, "--catalog", demo_catalog, "--split",
               "validation")
    assert proc.returncode == 0, proc.stderr
    proc = cli("index", "add", "--model", model_dir, "--index", index_dir, "--catalog", demo_catalog, "--split",
               "validation")
    assert proc.returncode == 2 and "already in the index" in proc.stderr
    proc = cli("index", "delete", "--index", index_dir, items[0].id, "nope")
    assert proc.returncode == 1 and "Not in the index: nope" in proc.stderr
    info = json.loads(cli("index", "info", "--index", index_dir).stdout)
    assert info["items"] == info["faiss_vectors"] == len(items) - 1
    proc = cli("index", "search", "--model", model_dir, "--index", index_dir, "--text", items[1].caption, "--k", "3")
    assert proc.returncode == 0 and proc.stdout.count("score") == 3 and "rerank" in proc.stdout
    proc = cli("index", "search", "--model", model_dir, "--index", tmp_path / "nothing", "--text", "x")
    assert proc.returncode == 2 and "no manifest.json" in proc.stderr
    proc = cli("index", "build", "--model", tmp_path / "nothing", "--catalog", demo_catalog, "--out", tmp_path / "x")
    assert proc.returncode == 2 and "not a model exported" in proc.stderr


def test_searcher_reranks_the_top_k_and_keeps_the_tail(model, index_dir, items):
    searcher = Searcher(model, CatalogIndex(index_dir))
    plain = searcher.search_text(items[3].caption, k=30, candidates=30, rerank=False)
    reranked = searcher.search_text(items[3].caption, k=30, candidates=30, rerank_k=10)
    assert reranked.reranked == 10 and plain.reranked == 0
    assert {r.id for r in reranked.results[:10]} == {r.id for r in plain.results[:10]}
    assert [r.id for r in reranked.results[10:]] == [r.id for r in plain.results[10:]]
    assert all(r.match_probability is not None for r in reranked.results[:10])
    assert [r.rank for r in reranked.results] == list(range(1, 31))
    late = searcher.search_text(items[3].caption, k=5, rerank_k=10, deadline=time.perf_counter() - 1)
    assert late.deadline_exceeded and late.reranked == 0 and [r.id for r in late.results] == [r.id for r in plain.results[:5]]


def test_cli_export_with_a_fixed_variant_and_refusing_to_overwrite(run_dir, tmp_path):
    out = tmp_path / "model"
    proc = cli("export", "--run", run_dir, "--out", out, "--variant", "fp32", "--catalog", run_dir / "nowhere")
    assert proc.returncode == 2 and "nowhere" in proc.stderr and not out.exists()  # a bad catalog: nothing written
    proc = cli("export", "--run", run_dir, "--out", out, "--variant", "fp32")
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["default_variant"] == "fp32" and list(manifest["cross_encoder_variants"]) == ["fp32"]
    assert ExportedModel(out).variant == "fp32"
    proc = cli("export", "--run", run_dir, "--out", out, "--variant", "fp32")
    assert proc.returncode == 2 and "pass --overwrite" in proc.stderr
    proc = cli("export", "--run", tmp_path / "no-run", "--out", tmp_path / "m2")
    assert proc.returncode == 2 and "not a trained FashionBERT model directory" in proc.stderr


def test_searches_run_safely_while_items_are_added_and_deleted(model, demo_catalog, tmp_path, items):
    import threading

    build(model, open_catalog(demo_catalog), tmp_path / "idx", split="train", progress=False)
    index = CatalogIndex(tmp_path / "idx")
    new = [it for it in items if it.split == "validation"]
    emb, _ = model.encode_images(np.stack([it.image for it in items[:4]]))
    stop, errors, searches = threading.Event(), [], [0]

    def searcher():
        while not stop.is_set():
            try:
                hits = index.search(emb[searches[0] % 4], 20)
                assert len(hits) == 20 and len({h.id for h in hits}) == 20
                searches[0] += 1
            except Exception as exc:  # reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            index.add(new, model)
            index.delete([it.id for it in new])
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert searches[0] > 0 and len(index) == len([it for it in items if it.split == "train"])


def test_a_pooled_model_exports_and_indexes_from_the_cached_grid(run_dir, demo_catalog, tmp_path, items):
    """patch_pool 2: the exported graphs take the 8x8 grid (pixels, or cached features) and pool it
    themselves; ONNX matches PyTorch, and the index stores 16 patch states an item."""
    from fashionbert.model.export import ExportConfig, export
    from fashionbert.model.fashionbert import FashionBert, FashionBertConfig, save_model
    from dataclasses import asdict

    tiny, meta = load_model(run_dir / "model")
    pooled = FashionBert(FashionBertConfig(**{**asdict(tiny.config), "num_patches": 16, "patch_pool": 2}))
    state = tiny.state_dict()
    state["patch_embeddings.position_embeddings.weight"] = state["patch_embeddings.position_embeddings.weight"][:16]
    pooled.load_state_dict(state)
    run = tmp_path / "run"
    shutil.copytree(run_dir / "model", run / "model")
    save_model(pooled.eval(), run / "model", {k: v for k, v in meta.items() if k not in asdict(pooled.config)})
    shutil.copy(run_dir / "summary.json", run / "summary.json")
    manifest = export(run, tmp_path / "model", ExportConfig(catalog=str(demo_catalog), variant="fp32"), progress=False)
    assert manifest["num_patches"] == 16 and max(manifest["parity"].values()) <= 1e-4, manifest["parity"]
    model = ExportedModel(tmp_path / "model", variant="fp32")
    emb, states = model.encode_images(np.stack([it.image for it in items[:4]]))
    assert states.shape == (4, 16, model.hidden_size)
    report = build(model, open_catalog(demo_catalog), tmp_path / "index", progress=False, features=run_dir.parent / "grid.h5")
    assert report["from_cached_features"] == len(items)
    index = CatalogIndex(tmp_path / "index", model_hash=model.model_hash)
    assert index.info()["bytes_per_item"]["patch_states"] == 16 * model.hidden_size * 2
    rows = index.rows_of([it.id for it in items[:4]])
    np.testing.assert_allclose(index.patches.read([rows[it.id] for it in items[:4]]), states, atol=0.02)
    for i in range(4):
        assert index.search(emb[i], 1)[0].id == items[i].id
