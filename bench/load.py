"""Load benchmark of the real API on loopback: latency percentiles and QPS by concurrency and rerank depth.

    .venv/bin/python bench/load.py --model data/model --index data/index [--requests 48]

Starts `fashionbert serve` on a free 127.0.0.1 port, sends validation captions with
POST /search (k 10, candidates 100) at concurrency 1, 4 and 16 for rerank_k 0, 10, 20 and 50,
a fixed number of requests per cell (bounded in count and time), and reports p50/p95/p99
latency, QPS, errors and 5xx, the server's peak RSS, and the share of server time per stage
(from the responses' timings_ms). Then what micro-batching changes: the same load at
concurrency 16, rerank_k 20, with cross-request batching off (the default: batch_max_pairs 1,
batch_wait_ms 0, each request's pairs run alone), on without waiting (up to 64 pairs, whatever is
queued) and on with a 2 ms wait, each in a fresh server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Server:
    def __init__(self, model: str, index: str, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        extra = {f"FASHIONBERT_{k.upper()}": str(v) for k, v in env.items()}
        self.proc = subprocess.Popen([sys.executable, "-m", "fashionbert.cli", "-q", "serve", "--port", str(self.port),
                                      "--model", model, "--index", index], env={**os.environ, **extra},
                                     stdout=subprocess.DEVNULL, stderr=open(os.environ.get("LOAD_SERVER_LOG", os.devnull), "a"))
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


async def run_cell(url: str, captions: list[str], concurrency: int, rerank_k: int, requests: int, limit_s: float):
    latencies, errors, fivexx, stages, late = [], 0, 0, [], 0
    sent = 0
    lock = asyncio.Lock()

    async def worker(client: httpx.AsyncClient):
        nonlocal sent, errors, fivexx, late
        while True:
            async with lock:
                if sent >= requests or time.perf_counter() > stop_at:
                    return
                i = sent
                sent += 1
            body = {"text": captions[i % len(captions)], "k": 10, "candidates": 100, "rerank": rerank_k > 0,
                    "rerank_k": rerank_k}
            t0 = time.perf_counter()
            try:
                r = await client.post("/search", json=body)
            except httpx.HTTPError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code >= 500:
                fivexx += 1
                print(f"  {r.status_code}: {r.text[:200]}", file=sys.stderr)
            if r.status_code != 200:
                errors += 1
            else:
                body = r.json()
                stages.append(body["timings_ms"])
                late += body["deadline_exceeded"]

    async with httpx.AsyncClient(base_url=url, timeout=60, limits=httpx.Limits(max_connections=concurrency)) as client:
        await client.post("/search", json={"text": captions[0], "rerank_k": max(rerank_k, 1)})  # warm-up
        start = time.perf_counter()
        stop_at = start + limit_s
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) * 1000
    share = {}
    if stages:
        total = sum(s.get("total", 0) for s in stages)
        for key in ("encode", "recall", "rerank"):
            share[key] = sum(s.get(key, 0) for s in stages) / total * 100 if total else 0
    return {"n": len(latencies), "p50": np.percentile(lat, 50), "p95": np.percentile(lat, 95),
            "p99": np.percentile(lat, 99), "qps": len(latencies) / wall, "errors": errors, "5xx": fivexx, "share": share,
            "late": late}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="data/model")
    parser.add_argument("--index", default="data/index")
    parser.add_argument("--requests", type=int, default=48, help="requests per cell")
    parser.add_argument("--limit-s", type=float, default=60, help="time cap per cell")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rerank-k", default="0,10,20,50")
    args = parser.parse_args()
    db = sqlite3.connect(Path(args.index) / "items.sqlite")
    captions = [r[0] for r in db.execute("SELECT name || '. ' || description FROM items ORDER BY random() LIMIT 500")]

    print(f"Machine: {platform.machine()}, {len(os.sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d')}; "
          f"`bench/load.py --requests {args.requests}`; POST /search k 10, candidates 100, real captions.")
    print()
    print("| concurrency | rerank_k | requests | p50 ms | p95 ms | p99 ms | QPS | errors | 5xx | deadline hit | "
          "encode / recall / rerank share |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    server = Server(args.model, args.index)
    try:
        for c in (int(x) for x in args.concurrency.split(",")):
            for k in (int(x) for x in args.rerank_k.split(",")):
                r = asyncio.run(run_cell(server.url, captions, c, k, args.requests, args.limit_s))
                share = " / ".join(f"{r['share'].get(s, 0):.0f} %" for s in ("encode", "recall", "rerank"))
                print(f"| {c} | {k} | {r['n']} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | {r['qps']:.1f} | "
                      f"{r['errors']} | {r['5xx']} | {r['late']} | {share} |", flush=True)
        rss = peak_rss_mb(server.proc.pid)
    finally:
        server.stop()
    print()
    print(f"Server peak RSS over the whole run: {rss:.0f} MB.")
    print()
    print("Micro-batching (concurrency 16, rerank_k 20, fresh server each):")
    print()
    print("| cross-request batching | p50 ms | p95 ms | QPS | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, env in (("off (default: each request's pairs alone)", {}),
                      ("on, no wait (up to 64 pairs, whatever is queued)", {"batch_max_pairs": 64}),
                      ("on, 2 ms wait (up to 64 pairs)", {"batch_max_pairs": 64, "batch_wait_ms": 2})):
        server = Server(args.model, args.index, **env)
        try:
            r = asyncio.run(run_cell(server.url, captions, 16, 20, args.requests, args.limit_s))
        finally:
            server.stop()
        print(f"| {name} | {r['p50']:.1f} | {r['p95']:.1f} | {r['qps']:.1f} | {r['errors']} |", flush=True)


if __name__ == "__main__":
    main()
