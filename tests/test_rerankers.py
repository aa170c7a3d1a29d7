"""/search with its rerank on cross-encoder replicas on Ray Serve (`fashionbert rerankers`, a real Ray
instance on loopback, started and stopped here): the in-process ranking, the deadline across the
hop, bad requests refused, and a replica killed under load costing no 5xx. Nothing is mocked."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest

from fashionbert.catalog.readers import open_catalog
from fashionbert.index.build import build
from fashionbert.runtime.exported import ExportedModel
from fashionbert.service.rerank_client import RerankClient

from .test_service import Server, free_port

pytest.importorskip("ray", reason="the scale extra (pip install '.[scale]') is not installed")
pytestmark = pytest.mark.timeout(900)


class Rerankers:
    """`fashionbert rerankers` in a subprocess: a local Ray instance with N replicas."""

    def __init__(self, model_dir, index_dir, root, replicas=2):
        self.port, self.root = free_port(), root
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = root / f"rerankers-{self.port}.log"
        self.cmd = [sys.executable, "-m", "fashionbert.cli", "rerankers", "--model", str(model_dir), "--index",
                    str(index_dir), "--replicas", str(replicas), "--port", str(self.port),
                    "--ray-dir", str(root / "ray")]

    def start(self) -> "Rerankers":
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()[-3000:]
            if "rerankers ready on" in self.log_path.read_text():
                return self
            time.sleep(0.5)
        raise AssertionError("the rerankers did not start in 240 s:\n" + self.log_path.read_text()[-3000:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def ray_processes(ray_dir) -> list[str]:
    """Processes still running from this Ray session directory."""
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(ray_dir) in line and "ps -eo" not in line]


@pytest.fixture(scope="module")
def items(demo_catalog):
    return list(open_catalog(demo_catalog).items())


@pytest.fixture(scope="module")
def setup(tiny_model_dir, demo_catalog, tmp_path_factory):
    root = tmp_path_factory.mktemp("rerankers")
    index_dir = root / "index"
    build(ExportedModel(tiny_model_dir), open_catalog(demo_catalog), index_dir, progress=False)
    replicas = Rerankers(tiny_model_dir, index_dir, root).start()
    local = Server(tiny_model_dir, index_dir).start()
    remote = Server(tiny_model_dir, index_dir, rerankers=replicas.url).start()
    yield replicas, local, remote, index_dir
    remote.stop()
    local.stop()
    replicas.stop()
    leftover = ray_processes(root / "ray")
    assert not leftover, f"Ray processes left after the rerankers stopped: {leftover}"


def replicas_seen(url: str, want: int = 2, probes: int = 200) -> set[int]:
    """Replica pids answering probes, 8 at a time (Ray may send sequential ones all to one replica),
    until `want` distinct ones have answered or `probes` were sent."""
    seen: set[int] = set()
    with httpx.Client(timeout=30) as c, cf.ThreadPoolExecutor(8) as pool:
        for _ in range(probes // 8):
            seen |= set(pool.map(lambda _: c.get(url).json()["replica"], range(8)))
            if len(seen) >= want:
                break
    return seen


def captions(items, n=12):
    return [it.caption for it in items if it.split == "validation"][:n]


def test_search_through_the_replicas_returns_the_in_process_ranking(setup, items):
    _, local, remote, _ = setup
    with httpx.Client(timeout=60) as c:
        for text in captions(items):
            a = c.post(local.url + "/search", json={"text": text, "k": 10}).json()
            b = c.post(remote.url + "/search", json={"text": text, "k": 10}).json()
            assert b["reranked"] == 20 and b["rerank_error"] is None and not b["deadline_exceeded"]
            assert [x["id"] for x in a["items"]] == [x["id"] for x in b["items"]]
            np.testing.assert_allclose([x["score"] for x in a["items"]], [x["score"] for x in b["items"]], atol=1e-3)


def test_a_replica_refuses_bad_requests_clearly(setup, tiny_model_dir):
    replicas, *_ = setup
    probe = httpx.get(replicas.url, timeout=30).json()
    model = ExportedModel(tiny_model_dir, variant="fp32").model_hash
    assert probe["model"] == model
    ok = {"text": "a red dress", "rows": [0, 1], "model": model, "index": probe["index"], "budget_ms": None}
    with httpx.Client(timeout=30) as c:
        good = c.post(replicas.url, json=ok)
        assert good.status_code == 200 and len(good.json()["logits"]) == 2
        cases = [(b"not json", 422, "not JSON"), ({**ok, "rows": []}, 422, "rows"), ({**ok, "rows": [-1]}, 422, "rows"),
                 ({**ok, "text": ""}, 422, "text"), ({**ok, "budget_ms": "soon"}, 422, "budget_ms"),
                 ({**ok, "model": "another"}, 409, "holds model"), ({**ok, "rows": [10**6]}, 409, "no patch states"),
                 ({**ok, "budget_ms": 0}, 504, "deadline passed")]
        for body, status, message in cases:
            r = c.post(replicas.url, content=body) if isinstance(body, bytes) else c.post(replicas.url, json=body)
            assert r.status_code == status and message in r.json()["detail"], (body, r.status_code, r.text)


def test_the_deadline_crosses_the_hop(setup):
    # The client sends the time left; past it, the replica drops the request unrun (504) or the
    # call stops waiting: either way no logits, and the pipeline returns the recall order.
    replicas, *_ = setup
    probe = httpx.get(replicas.url, timeout=30).json()
    client = RerankClient(replicas.url, probe["model"], probe["index"])

    async def calls():
        try:
            return (await client.logits("a red dress", [0, 1, 2], None),
                    await client.logits("a red dress", [0, 1, 2], time.perf_counter() + 0.0005),
                    await client.logits("a red dress", [0, 1, 2], time.perf_counter() - 1))
        finally:
            await client.client.aclose()

    ok, late, gone = asyncio.run(calls())
    assert ok.shape == (3,) and late is None and gone is None


def test_rerankers_down_give_the_recall_order_flagged_not_an_error(tiny_model_dir, setup, items):
    _, _, _, index_dir = setup
    s = Server(tiny_model_dir, index_dir, rerankers=f"http://127.0.0.1:{free_port()}").start()
    try:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            r = c.post("/search", json={"text": items[0].caption, "k": 5})
            plain = c.post("/search", json={"text": items[0].caption, "k": 5, "rerank": False}).json()
            metrics = c.get("/metrics").text
        assert r.status_code == 200
        body = r.json()
        assert body["reranked"] == 0 and "unreachable" in body["rerank_error"] and not body["deadline_exceeded"]
        assert [x["id"] for x in body["items"]] == [x["id"] for x in plain["items"]]
        assert "fashionbert_search_rerank_lost_total 1.0" in metrics
    finally:
        s.stop()


def test_a_replica_killed_under_load_costs_no_5xx(setup, items):
    replicas, _, remote, _ = setup
    texts = captions(items, 8)
    before = replicas_seen(replicas.url)
    assert len(before) == 2, before  # both replicas answer
    victim = min(before)
    results, stop = [], threading.Event()

    def client(i: int) -> None:
        with httpx.Client(base_url=remote.url, timeout=60) as c:
            n = 0
            while not stop.is_set() and n < 60:  # bounded: 60 requests a client at most
                r = c.post("/search", json={"text": texts[(i + n) % len(texts)], "k": 5})
                results.append((time.monotonic(), r.status_code, r.json() if r.status_code == 200 else r.text))
                n += 1

    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(client, i) for i in range(4)]
        time.sleep(3)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        time.sleep(8)
        stop.set()
        for f in futures:
            f.result(timeout=120)
    bad = [(round(t - killed, 2), s, body) for t, s, body in results if s != 200]
    assert len(results) >= 20 and not bad, bad
    after = [body for t, _, body in results if t > killed]
    lost = [b for b in after if b["reranked"] == 0]
    assert after and len(lost) <= 4, [b["rerank_error"] for b in lost]  # at most the 4 in flight at the kill
    # Ray restarts the killed replica; the survivors served meanwhile.
    deadline = time.monotonic() + 120
    while True:
        now = replicas_seen(replicas.url) - {victim}
        if len(now) == 2:
            break
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {now}"
        time.sleep(1)
    print(f"{len(results)} searches under load, {len(lost)} in recall order after the kill")
