"""Recall at scale, FAISS in process vs a Milvus server, with filters; and the rerank on Ray Serve
replicas, 1 vs 2.

    .venv/bin/python bench/scale_bench.py recall [--sizes 100000,1000000] [--kinds hnsw,ivf]
    .venv/bin/python bench/scale_bench.py rerank --model data/model --index data/index
    .venv/bin/python bench/scale_bench.py patches [--rows 20000]

recall: synthetic clustered embeddings (dimension 256, as the exported towers': 2,000 "looks",
each item a look plus noise, re-normalised), queries near items. Both engines get the same index
parameters (hnsw: M 16, efConstruction 100, ef 128; ivf: 4*sqrt(n) lists, nprobe 16) and the same
filters: none, a category (10 % of items) and a rare subcategory (0.5 %). FAISS filters with an
id selector over the allowed rows, as index/store.py does; Milvus with its boolean expression.
One client, sequential (p50/p99), then 4 client threads for QPS. recall@10 against exact
filtered search. Milvus runs as the embedded standalone server on this machine, sharing its cores
with the client and FAISS: a like-for-like on one machine, not a cluster's numbers.

rerank: `fashionbert rerankers` with 1, then 2 replicas (1 ONNX thread each), 4 concurrent
clients posting 20 candidates each for a bounded time; requests/s and latency.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_class() -> str:
    flags = set(open("/proc/cpuinfo").read().split())
    return "AVX-512 + bf16" if "avx512_bf16" in flags else "AVX-512" if "avx512f" in flags else "AVX2/FMA"


def header() -> None:
    print(f"Machine: {platform.machine()} {cpu_class()}, {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d')}.")


def latency(fn, queries, threads: int = 4) -> tuple[float, float, float]:
    times = []
    for q in queries:
        t = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - t)
    started = time.perf_counter()
    with cf.ThreadPoolExecutor(threads) as pool:
        list(pool.map(fn, queries))
    qps = len(queries) / (time.perf_counter() - started)
    return float(np.percentile(times, 50) * 1000), float(np.percentile(times, 99) * 1000), qps


def recall_bench(args) -> None:
    import faiss

    from fashionbert.index.milvus import MilvusRecall
    from fashionbert.index.milvus_local import LocalMilvus
    from fashionbert.index.vectors import IndexConfig

    header()
    faiss.omp_set_num_threads(len(os.sched_getaffinity(0)))
    rng = np.random.default_rng(0)
    dim = 256
    work = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    server = LocalMilvus(work / "milvus").start()
    print("| items | kind | engine | load + index s | filter | p50 ms | p99 ms | QPS (4 clients) | recall@10 |")
    print("| ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: |")
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            looks = rng.standard_normal((2000, dim)).astype(np.float32)
            emb = looks[rng.integers(0, 2000, n)] + 0.35 * rng.standard_normal((n, dim)).astype(np.float32)
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            category = rng.integers(0, 10, n)  # 10 %
            rare = rng.random(n) < 0.005  # 0.5 %
            queries = emb[rng.integers(0, n, args.queries)] + 0.2 * rng.standard_normal((args.queries, dim)).astype(np.float32)
            queries /= np.linalg.norm(queries, axis=1, keepdims=True)
            filters = {"none": None, "category 10 %": np.flatnonzero(category == 3), "rare 0.5 %": np.flatnonzero(rare)}
            exprs = {"none": "", "category 10 %": 'category == "c3"', "rare 0.5 %": 'subcategory == "rare"'}
            truth = {}
            for name, allowed in filters.items():
                sub = emb if allowed is None else emb[allowed]
                ids = np.arange(n) if allowed is None else allowed
                truth[name] = [set(ids[np.argsort(-(sub @ q))[:10]].tolist()) for q in queries]
            for kind in args.kinds.split(","):
                cfg = IndexConfig(kind=kind, hnsw_m=16, ef_construction=100, ef_search=128,
                                  nlist=int(4 * np.sqrt(n)), nprobe=16)
                # FAISS
                t = time.perf_counter()
                if kind == "hnsw":
                    index = faiss.IndexHNSWFlat(dim, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
                    index.hnsw.efConstruction = cfg.ef_construction
                    index.add(emb)
                else:
                    quantizer = faiss.IndexFlatIP(dim)
                    index = faiss.IndexIVFFlat(quantizer, dim, cfg.nlist, faiss.METRIC_INNER_PRODUCT)
                    index.train(emb[rng.choice(n, min(n, 50 * cfg.nlist), replace=False)])
                    index.add(emb)
                built = time.perf_counter() - t
                for name, allowed in filters.items():
                    sel = None if allowed is None else faiss.IDSelectorBatch(allowed.astype(np.int64))
                    if kind == "hnsw":
                        params = faiss.SearchParametersHNSW(sel=sel, efSearch=cfg.ef_search)
                    else:
                        params = faiss.SearchParametersIVF(sel=sel, nprobe=cfg.nprobe)

                    def search(q, params=params):
                        return index.search(q[None], 10, params=params)[1][0]

                    got = [set(search(q).tolist()) for q in queries]
                    rec = np.mean([len(a & b) / max(len(b), 1) for a, b in zip(got, truth[name])])
                    p50, p99, qps = latency(search, queries)
                    print(f"| {n:,} | {kind} | FAISS | {built:.0f} | {name} | {p50:.2f} | {p99:.2f} | {qps:,.0f} | {rec:.3f} |",
                          flush=True)
                index = None  # its memory back before Milvus loads the same vectors
                # Milvus
                t = time.perf_counter()
                remote = MilvusRecall(server.uri(f"bench_{kind}_{n}"), dim, cfg, "bench", create=True, timeout=600)
                fields = [{"category": f"c{c}", "subcategory": "rare" if r else "common", "gender": None, "price": 1.0}
                          for c, r in zip(category, rare)]
                remote.upsert(np.arange(n, dtype=np.int64), emb, fields)
                remote.flush()
                built = time.perf_counter() - t
                for name in filters:
                    def search(q, expr=exprs[name]):
                        return [r for r, _ in remote.search(q, 10, expr)]

                    got = [set(search(q)) for q in queries]
                    rec = np.mean([len(a & b) / max(len(b), 1) for a, b in zip(got, truth[name])])
                    p50, p99, qps = latency(search, queries)
                    print(f"| {n:,} | {kind} | Milvus | {built:.0f} | {name} | {p50:.2f} | {p99:.2f} | {qps:,.0f} | {rec:.3f} |",
                          flush=True)
                remote.close()
    finally:
        server.stop()


def rerank_bench(args) -> None:
    import httpx

    from fashionbert.index.milvus_local import free_port
    from fashionbert.runtime.exported import ExportedModel

    header()
    model = ExportedModel(args.model)
    import json

    manifest = json.loads((Path(args.index) / "manifest.json").read_text())
    items = manifest.get("items_at_build", 20)
    rng = np.random.default_rng(0)
    print(f"Model {args.model} ({model.hidden_size} hidden, {model.num_patches} patches), 20 candidates a request, "
          f"{args.clients} clients, {args.seconds:g} s each.")
    print("| replicas | requests | req/s | p50 ms | p99 ms | errors |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for replicas in (1, 2):
        port = free_port()
        log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "rerankers", "--model", args.model, "--index",
                                 args.index, "--replicas", str(replicas), "--port", str(port)],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while "rerankers ready" not in Path(log.name).read_text():
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(Path(log.name).read_text()[-2000:])
                time.sleep(0.5)
            url = f"http://127.0.0.1:{port}/"
            probe = httpx.get(url, timeout=30).json()
            body = {"model": probe["model"], "index": probe["index"], "budget_ms": None,
                    "text": "navy striped long-sleeve shirt with a spread collar"}
            times, errors = [], 0

            def client(seed: int) -> None:
                nonlocal errors
                r = np.random.default_rng(seed)
                stop = time.monotonic() + args.seconds
                with httpx.Client(timeout=60) as c:
                    for _ in range(10_000):  # bounded in count and time
                        if time.monotonic() > stop:
                            break
                        t = time.perf_counter()
                        resp = c.post(url, json={**body, "rows": r.integers(0, items, 20).tolist()})
                        times.append(time.perf_counter() - t)
                        errors += resp.status_code != 200

            for seed in range(args.clients):  # warm-up
                httpx.post(url, json={**body, "rows": rng.integers(0, items, 20).tolist()}, timeout=60)
            started = time.perf_counter()
            with cf.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client, range(args.clients)))
            elapsed = time.perf_counter() - started
            print(f"| {replicas} | {len(times)} | {len(times) / elapsed:.1f} | {np.percentile(times, 50) * 1000:.1f} | "
                  f"{np.percentile(times, 99) * 1000:.1f} | {errors} |", flush=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def patches_bench(args) -> None:
    """Bytes per item and the read of one request's 20 candidates from a patch file (float16 and
    int8), warm in the page cache and cold (dropped from it first)."""
    from fashionbert.index.patches import PatchFile

    header()
    rng = np.random.default_rng(0)
    print(f"{args.rows:,} rows of 64 x 384 patch states; 20 random rows a read, {args.reads} reads each.")
    print("| dtype | bytes/item | file GB | warm p50 ms | warm p99 ms | cold p50 ms | cold p99 ms |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype in ("float16", "int8"):
        d = Path(tempfile.mkdtemp(prefix="patch-bench-", dir=args.dir))
        f = PatchFile(d, 64, 384, dtype)
        for first in range(0, args.rows, 1000):
            f.write(first, rng.standard_normal((min(1000, args.rows - first), 64, 384)).astype(np.float32))
        size = sum(p.stat().st_size for p in d.iterdir())
        rows = [rng.integers(0, args.rows, 20) for _ in range(args.reads)]
        f.read(rows[0])
        warm = []
        for r in rows:
            t = time.perf_counter()
            f.read(r)
            warm.append(time.perf_counter() - t)
        f.close()
        cold = []
        for r in rows:
            # Out of the page cache (no map holds its pages), so the read goes to the disk.
            for p in d.iterdir():
                fd = os.open(p, os.O_RDONLY)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
            f = PatchFile(d, 64, 384, dtype, read_only=True)
            t = time.perf_counter()
            f.read(r)
            cold.append(time.perf_counter() - t)
            f.close()
        print(f"| {dtype} | {f.bytes_per_item:,} | {size / 1e9:.2f} | {np.percentile(warm, 50) * 1000:.2f} | "
              f"{np.percentile(warm, 99) * 1000:.2f} | {np.percentile(cold, 50) * 1000:.2f} | "
              f"{np.percentile(cold, 99) * 1000:.2f} |", flush=True)
        for p in d.iterdir():
            p.unlink()
        d.rmdir()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    r = sub.add_parser("recall")
    r.add_argument("--sizes", default="100000,1000000")
    r.add_argument("--kinds", default="hnsw,ivf")
    r.add_argument("--queries", type=int, default=200)
    r.set_defaults(func=recall_bench)
    k = sub.add_parser("rerank")
    k.add_argument("--model", required=True)
    k.add_argument("--index", required=True)
    k.add_argument("--clients", type=int, default=4)
    k.add_argument("--seconds", type=float, default=20)
    k.set_defaults(func=rerank_bench)
    p = sub.add_parser("patches")
    p.add_argument("--rows", type=int, default=20000)
    p.add_argument("--reads", type=int, default=200)
    p.add_argument("--dir", default=None, help="where the files go (default: the temp directory)")
    p.set_defaults(func=patches_bench)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
