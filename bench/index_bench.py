"""FAISS recall stage: latency of one query and recall@100 against exact search, flat vs ivf vs hnsw.

    .venv/bin/python bench/index_bench.py --model data/model --index data/index [--sizes 10000,100000]

The demo catalog has 6,000 images; larger galleries are made from its real image embeddings:
each synthetic item is a real embedding plus Gaussian noise (sigma 0.05 per dimension before
re-normalising), so the neighbourhood structure stays that of real fashion embeddings. Queries
are real validation captions through the exported text tower. Index parameters are the CLI
defaults (ivf: ~4*sqrt(n) lists, nprobe 16; hnsw: M 32, efConstruction 80, efSearch 128).
Build images/s and bytes per item come from the real index's manifest.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import faiss
import numpy as np

from fashionbert.runtime.exported import ExportedModel
from fashionbert.index.store import CatalogIndex
from fashionbert.index.vectors import IndexConfig, new_faiss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--index", required=True)
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    threads = len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(threads)
    model = ExportedModel(args.model)
    index = CatalogIndex(args.index, model_hash=model.model_hash)
    _, real = index.embeddings()
    captions = [r[0] for r in index.db.execute("SELECT name || '. ' || description FROM items ORDER BY row").fetchall()]
    rng = np.random.default_rng(0)
    picked = rng.choice(len(captions), min(args.queries, len(captions)), replace=False)
    queries = np.concatenate([model.encode_text([captions[i] for i in picked[j : j + 64]]).embedding
                              for j in range(0, len(picked), 64)]).astype(np.float32)

    m = index.manifest
    print(f"Machine: {platform.processor() or platform.machine()}, {threads} threads; {time.strftime('%Y-%m-%d')}.")
    print(f"Real index ({m['items_at_build']} demo images, {m['config']['kind']}): built in {m['seconds']} s, "
          f"image tower {m['encode_images_per_s']} images/s; bytes per item: patch states "
          f"{m['bytes_per_item']['patch_states']:,}, everything on disk {m['bytes_per_item']['total_on_disk']:,}.")
    print()
    print("| items | kind | build s | p50 ms | p99 ms | recall@100 vs exact |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for n in (int(s) for s in args.sizes.split(",")):
        base = real[rng.integers(0, len(real), n)] + rng.normal(0, 0.05, (n, real.shape[1])).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        base = base.astype(np.float32)
        ids = np.arange(n, dtype=np.int64)
        exact = None
        for kind in ("flat", "ivf", "hnsw"):
            cfg = IndexConfig(kind=kind)
            start = time.perf_counter()
            faiss_index = new_faiss(cfg, base.shape[1], base)
            faiss_index.add_with_ids(base, ids)
            build_s = time.perf_counter() - start
            if kind == "ivf":
                faiss.extract_index_ivf(faiss_index).nprobe = cfg.nprobe
            elif kind == "hnsw":
                faiss.downcast_index(faiss_index.index).hnsw.efSearch = cfg.ef_search
            lat, found = [], []
            for q in queries:
                t0 = time.perf_counter()
                _, got = faiss_index.search(q[None], 100)
                lat.append((time.perf_counter() - t0) * 1000)
                found.append(got[0])
            found = np.array(found)
            if kind == "flat":
                exact = found
            recall = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(found, exact)])
            print(f"| {n:,} | {kind} | {build_s:.1f} | {np.percentile(lat, 50):.2f} | {np.percentile(lat, 99):.2f} | "
                  f"{recall:.3f} |")


if __name__ == "__main__":
    main()
