"""Saturation soak: 16 clients searching with rerank for minutes; errors, kept reranks, latency, liveness, memory.

    .venv/bin/python bench/soak.py --model data/model --index data/index [--minutes 10] [--clients 16]
        [--k 10] [--rerank-k 20] [--threads N] [--reload-every S]

Starts `fashionbert serve` (default settings) on a free 127.0.0.1 port. --clients concurrent
clients POST /search with captions from the index's SQLite (name. description, shuffled), k 10,
rerank_k 20, back to back for --minutes; a client answered 503 sleeps min(Retry-After, 2) s before
its next request. Beside them, a probe in its own thread on its own connection GETs /healthz every
100 ms and times it, and the server's RSS (VmRSS) is sampled every 10 s, and once more just
before the clients stop (the end sample, under load as the others).

Reports requests by status, 5xx other than 503, the share of 200 answers that kept their rerank
(not deadline_exceeded and reranked > 0), QPS and p50/p95/p99 latency of the 200 answers, /healthz
p50/p99/max, and the RSS at --warmup-s (default 60 s), at the end, and its growth.

Exit status 1 when an acceptance fails: any 5xx other than 503; kept-rerank share under 90 %;
RSS growth from the warm-up sample to the end over 10 %; /healthz p99 over 50 ms; a /healthz that
failed or answered other than 200; a search that timed out on the client (--timeout-s) or found no
server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shlex
import sqlite3
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ holds plain scripts
from durability import cpu_class, rss_mb  # noqa: E402
from load import Server, peak_rss_mb  # noqa: E402

CAPTIONS = ["navy cotton shirt with long sleeves", "black leather ankle boots", "red wool coat with notched lapel",
            "white sneakers", "striped knit sweater", "blue denim jeans, slim fit", "floral summer dress",
            "grey hooded sweatshirt", "brown suede loafers", "green silk scarf"]


def captions_of(index: str | Path, n: int = 500) -> list[str]:
    try:
        db = sqlite3.connect(f"file:{Path(index) / 'items.sqlite'}?mode=ro", uri=True)
        try:
            rows = db.execute("SELECT name || '. ' || description FROM items WHERE name IS NOT NULL "
                              "AND description IS NOT NULL ORDER BY random() LIMIT ?", (n,)).fetchall()
        finally:
            db.close()
        found = [r[0][:1000] for r in rows if r[0] and r[0].strip(". ")]
    except sqlite3.Error:
        found = []
    return found or CAPTIONS


def pct(values, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


class Probe(threading.Thread):
    """GET /healthz every `every_s` on a connection of its own, in a thread of its own: its latency is
    the server's, not the clients' queue."""

    def __init__(self, url: str, every_s: float = 0.1):
        super().__init__(name="healthz-probe", daemon=True)
        self.url, self.every_s = url, every_s
        self.latencies_ms: list[float] = []
        self.failures: Counter = Counter()
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=5, limits=httpx.Limits(max_connections=1)) as client:
            next_at = time.perf_counter()
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    r = client.get("/healthz")
                    if r.status_code == 200:
                        self.latencies_ms.append((time.perf_counter() - t0) * 1000)
                    else:
                        self.failures[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    self.failures[type(exc).__name__] += 1
                next_at += self.every_s
                self.stop.wait(max(0.0, next_at - time.perf_counter()))


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 10):
        super().__init__(name="rss-sampler", daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.stop = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            self.samples.append((time.monotonic() - self.t0, rss_mb(self.pid)))

    def sample_now(self) -> None:
        self.samples.append((time.monotonic() - self.t0, rss_mb(self.pid)))


async def soak(url: str, captions: list[str], clients: int, seconds: float, k: int, rerank_k: int, candidates: int,
               timeout_s: float, on_end=None) -> dict:
    """The clients, for `seconds`; `on_end` is called just before they stop (the load still on)."""
    status: Counter = Counter()
    latencies: list[float] = []
    kept = lost = 0
    samples_5xx: list[str] = []
    stop_at = time.monotonic() + seconds

    async def client_loop(client: httpx.AsyncClient, n: int) -> None:
        nonlocal kept, lost
        rng = random.Random(n)
        while time.monotonic() < stop_at:
            body = {"text": rng.choice(captions), "k": k, "candidates": candidates, "rerank": rerank_k > 0,
                    "rerank_k": rerank_k}
            t0 = time.perf_counter()
            try:
                r = await client.post("/search", json=body)
            except httpx.TimeoutException:
                status["client timeout"] += 1
                continue
            except httpx.TransportError as exc:
                status[type(exc).__name__] += 1
                await asyncio.sleep(0.5)
                continue
            elapsed = time.perf_counter() - t0
            status[str(r.status_code)] += 1
            if r.status_code == 200:
                latencies.append(elapsed)
                answer = r.json()
                if not answer["deadline_exceeded"] and answer["reranked"] > 0:
                    kept += 1
                else:
                    lost += 1
            elif r.status_code == 503:
                try:
                    wait = float(r.headers.get("Retry-After", 1))
                except ValueError:
                    wait = 1.0
                await asyncio.sleep(max(0.0, min(wait, 2.0, stop_at - time.monotonic())))
            elif r.status_code >= 500 and len(samples_5xx) < 10:
                samples_5xx.append(f"{r.status_code} {r.text[:200]}")

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s, limits=limits) as client:
        await client.post("/search", json={"text": captions[0], "k": k, "rerank_k": max(rerank_k, 1)})  # warm-up
        start = time.monotonic()
        stop_at = start + seconds
        if on_end:
            asyncio.get_running_loop().call_later(max(0.0, seconds - 0.2), on_end)
        await asyncio.gather(*(client_loop(client, n) for n in range(clients)))
        wall = time.monotonic() - start
    return {"status": status, "latencies_ms": np.array(latencies) * 1000, "kept": kept, "lost": lost, "wall": wall,
            "samples_5xx": samples_5xx}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="data/model")
    parser.add_argument("--index", default="data/index")
    parser.add_argument("--minutes", type=float, default=10)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rerank-k", type=int, default=20)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--warmup-s", type=float, default=60, help="the RSS baseline: the sample at this time")
    parser.add_argument("--timeout-s", type=float, default=30, help="client timeout of a search")
    parser.add_argument("--threads", type=int, help="FASHIONBERT_THREADS of the server (default: all cores)")
    parser.add_argument("--reload-every", type=float, default=0, metavar="S",
                        help="also POST /admin/reload every S seconds through the soak (0: never)")
    args = parser.parse_args()
    captions = captions_of(args.index)
    print(f"Machine: CPU class {cpu_class()}, {platform.machine()}; {time.strftime('%Y-%m-%d')}.")
    print(f"Command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"{args.clients} clients, POST /search k {args.k}, candidates {args.candidates}, rerank_k {args.rerank_k}, "
          f"{len(captions)} captions, {args.minutes:g} min; /healthz every 100 ms; RSS every 10 s.", flush=True)
    env = {"threads": args.threads} if args.threads else {}
    if args.reload_every:
        env["api_key"] = "soak-key"
    server = Server(args.model, args.index, **env)
    probe, sampler = Probe(server.url), RssSampler(server.proc.pid)
    reloads: Counter = Counter()
    stop_reloads = threading.Event()

    def reloader() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            while not stop_reloads.wait(args.reload_every):
                try:
                    r = c.post("/admin/reload", json={}, headers={"X-API-Key": "soak-key"})
                    reloads[str(r.status_code)] += 1
                except httpx.HTTPError as exc:
                    reloads[type(exc).__name__] += 1

    reload_thread = threading.Thread(target=reloader, daemon=True)
    try:
        sampler.sample_now()
        probe.start()
        sampler.start()
        if args.reload_every:
            reload_thread.start()

        def last_sample():  # under load, as every other sample
            sampler.stop.set()
            sampler.sample_now()

        r = asyncio.run(soak(server.url, captions, args.clients, args.minutes * 60, args.k, args.rerank_k,
                             args.candidates, args.timeout_s, on_end=last_sample))
        stop_reloads.set()
        probe.stop.set()
        probe.join(10)
        sampler.join(1)
        peak = peak_rss_mb(server.proc.pid)
    finally:
        stop_reloads.set()
        probe.stop.set()
        sampler.stop.set()
        server.stop()

    status, lat = r["status"], r["latencies_ms"]
    ok = status.get("200", 0)
    other_5xx = sum(n for s, n in status.items() if s.isdigit() and int(s) >= 500 and s != "503")
    no_answer = sum(n for s, n in status.items() if not s.isdigit())
    kept_share = r["kept"] / ok * 100 if ok else 0.0
    health = probe.latencies_ms
    samples = sampler.samples
    base = next(((t, mb) for t, mb in samples if t >= args.warmup_s - 1), samples[-1])
    end = samples[-1]
    growth = (end[1] - base[1]) / base[1] * 100 if base[1] else float("nan")

    print()
    rows = [
        ("requests by status", ", ".join(f"{s}: {n}" for s, n in sorted(status.items())) or "none"),
        ("5xx other than 503", f"{other_5xx}"),
        ("searches without an answer (client timeout, connection)", f"{no_answer}"),
        ("200s that kept their rerank", f"{kept_share:.1f} % ({r['kept']} of {ok})"),
        ("QPS of 200s", f"{ok / r['wall']:.2f} over {r['wall']:.0f} s"),
        ("latency of 200s p50 / p95 / p99", f"{pct(lat, 50):.0f} / {pct(lat, 95):.0f} / {pct(lat, 99):.0f} ms"),
        ("/healthz p50 / p99 / max", f"{pct(health, 50):.1f} / {pct(health, 99):.1f} / "
                                     f"{max(health, default=float('nan')):.1f} ms ({len(health)} probes)"),
        ("/healthz failures", ", ".join(f"{s}: {n}" for s, n in probe.failures.items()) or "none"),
        (f"RSS at {base[0]:.0f} s / at end ({end[0]:.0f} s)", f"{base[1]:.0f} / {end[1]:.0f} MB"),
        ("RSS growth after warm-up", f"{growth:+.1f} %"),
        ("server peak RSS (VmHWM)", f"{peak:.0f} MB"),
    ]
    if args.reload_every:
        rows.append((f"reloads (every {args.reload_every:g} s)", ", ".join(f"{s}: {n}" for s, n in sorted(reloads.items()))
                     or "none"))
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"| {'-' * width} | --- |")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    print()
    print("RSS MB every 10 s: " + " ".join(f"{mb:.0f}" for _, mb in samples))
    for line in r["samples_5xx"]:
        print(f"  5xx: {line}")

    failures = []
    if other_5xx:
        failures.append(f"{other_5xx} answers were a 5xx other than 503")
    if kept_share < 90:
        failures.append(f"only {kept_share:.1f} % of the 200 answers kept their rerank (floor 90 %)")
    if not growth <= 10:
        failures.append(f"RSS grew {growth:+.1f} % from {base[0]:.0f} s to the end (ceiling 10 %)")
    if not pct(health, 99) <= 50:
        failures.append(f"/healthz p99 {pct(health, 99):.1f} ms (ceiling 50 ms)")
    if args.reload_every and set(reloads) - {"200", "409"}:
        failures.append(f"reloads answered {dict(reloads)}")
    if probe.failures:
        failures.append(f"/healthz failed or answered other than 200: {dict(probe.failures)}")
    if no_answer:
        failures.append(f"{no_answer} searches got no answer (client timeout {args.timeout_s:g} s or no connection)")
    if args.minutes * 60 < args.warmup_s + 10:
        print(f"\nNote: a run of {args.minutes:g} min has no RSS sample after the {args.warmup_s:g} s warm-up to "
              f"compare with: the growth is not meaningful.")
    print()
    if failures:
        print("FAILED:\n" + "\n".join(f"- {f}" for f in failures))
        return 1
    print("PASSED: no 5xx but 503, reranks kept, memory flat, /healthz fast.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
