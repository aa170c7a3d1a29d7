"""Cross-encoder replicas on Ray Serve: the rerank stage of /search run by N replicas of a Ray Serve
deployment, called by the API over HTTP (FASHIONBERT_RERANKERS=http://HOST:PORT). The in-process
engine stays the default.

Each replica holds the ONNX text tower and cross-encoder and reads patch states from its own copy of
the index's patch file (beside the reranker, not shipped over the hop): a request is the caption, the
candidates' row numbers and the time left to the caller's deadline, about 200 bytes, and the answer
their logits. The replica encodes the caption again (a few milliseconds, against the cross-encoder's
tens) rather than receive 50 KB of text states. `@serve.batch` groups requests that are already
waiting into one cross-encoder run (no waiting for company: on a CPU a bigger run only delays the
first request; BENCHMARKS.md). A request whose deadline passed before its run is dropped unrun.

This module is what the Ray cluster imports; the API only needs service/rerank_client.py.

    fashionbert rerankers --model data/model --index data/index --replicas 2 --port 8100
or on a running Ray cluster:
    serve run fashionbert.service.rerankers:app model_dir=... index_dir=... replicas=2
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from ..index.patches import IndexError_, PatchFile
from ..runtime.exported import ExportedModel

log = logging.getLogger(__name__)
MAX_ROWS = 1000  # candidates per request (the API's rerank_k is at most 100)
MAX_TEXT = 4000


class BadRequest(ValueError):
    pass


def parse_request(body: bytes) -> dict:
    """The JSON body -> {text, rows, model, index, budget_ms}, or BadRequest saying what is wrong."""
    try:
        req = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body is not JSON") from None
    if not isinstance(req, dict):
        raise BadRequest("the body is not a JSON object")
    text, rows = req.get("text"), req.get("rows")
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
        raise BadRequest(f"text: a non-empty string of at most {MAX_TEXT} characters")
    if (not isinstance(rows, list) or not 1 <= len(rows) <= MAX_ROWS
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows)):
        raise BadRequest(f"rows: a list of 1 to {MAX_ROWS} row numbers")
    budget = req.get("budget_ms")
    if budget is not None and (not isinstance(budget, (int, float)) or isinstance(budget, bool) or budget < 0):
        raise BadRequest("budget_ms: a number of milliseconds, or null for no deadline")
    for key in ("model", "index"):
        if not isinstance(req.get(key), str):
            raise BadRequest(f"{key}: the caller's {key} version, a string")
    return {"text": text, "rows": rows, "model": req["model"], "index": req["index"], "budget_ms": budget}


class Reranker:
    """One replica: the model, the patch file, and the batched scoring."""

    def __init__(self, model_dir: str, index_dir: str, variant: str | None = None, threads: int = 1):
        self.model = ExportedModel(model_dir, variant=variant, threads=threads)
        self.index_dir = Path(index_dir)
        self.patches: PatchFile | None = None
        self.index_built: str | None = None
        self._open_patches()
        log.info("Reranker replica (pid %d) holds model %s and the patch file of index %s.", os.getpid(),
                 self.model.model_hash[:12], self.index_built)

    def _open_patches(self) -> None:
        m = json.loads((self.index_dir / "manifest.json").read_text())
        if m["model_hash"] != self.model.model_hash:
            raise IndexError_(f"{self.index_dir} was built with model {m['model_hash'][:12]}, the replica holds "
                              f"{self.model.model_hash[:12]}")
        # Swapped, not closed: a batch may still be reading the old one (its maps go with it).
        self.patches = PatchFile(self.index_dir, m["num_patches"], m["hidden_size"], m["config"]["patch_dtype"],
                                 read_only=True)
        self.index_built = m["built"]

    def rows_held(self) -> int:
        """Rows the patch file has states for (it grows as the API adds items)."""
        return os.path.getsize(self.patches.path) // self.patches.record

    def check(self, model: str, index: str) -> str | None:
        """None when this replica holds the caller's model and index, else why not (after re-reading
        the index's manifest once: a rebuild the caller already reloaded)."""
        if model != self.model.model_hash:
            return f"the replica holds model {self.model.model_hash[:12]}, the caller {model[:12]}"
        if index != self.index_built:
            try:  # reopened only when the directory holds another build than the one open
                on_disk = json.loads((self.index_dir / "manifest.json").read_text())["built"]
                if on_disk != self.index_built:
                    self._open_patches()
            except (OSError, ValueError, KeyError) as exc:
                return f"the replica could not reopen its index: {exc}"
            if index != self.index_built:
                return f"the replica's index was built {self.index_built}, the caller's {index}"
        return None

    def score(self, jobs: list[dict]) -> list[np.ndarray | None]:
        """One text-tower and one cross-encoder run for all the jobs whose deadline has not passed
        (None for the others)."""
        now = time.monotonic()
        live = [i for i, j in enumerate(jobs) if j["deadline"] is None or j["deadline"] > now]
        out: list[np.ndarray | None] = [None] * len(jobs)
        if not live:
            return out
        text = self.model.encode_text([jobs[i]["text"] for i in live])
        pairs = []
        for n, i in enumerate(live):
            width = int(text.mask[n].sum())
            pairs.append((text.states[n, :width], self.patches.read(jobs[i]["rows"])))
        for i, logits in zip(live, self.model.rerank_jobs(pairs)):
            out[i] = logits
        return out


def deployment(replicas: int = 1, max_batch: int = 8, max_ongoing: int = 8, max_queued: int = 64):
    """The Ray Serve deployment class (ray imported here, not by the API)."""
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    @serve.deployment(num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                      max_ongoing_requests=max_ongoing, max_queued_requests=max_queued,
                      health_check_period_s=2, health_check_timeout_s=10)
    class CrossEncoderReplica:
        def __init__(self, model_dir: str, index_dir: str, variant: str | None = None, threads: int = 1):
            self.reranker = Reranker(model_dir, index_dir, variant, threads)
            self.pid = os.getpid()

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=0.0)
        async def _score(self, jobs: list[dict]) -> list:
            return await asyncio.to_thread(self.reranker.score, jobs)

        async def __call__(self, request: Request):
            received = time.monotonic()
            if request.method == "GET":  # a probe: which model and index this replica serves
                return JSONResponse({"model": self.reranker.model.model_hash, "index": self.reranker.index_built,
                                     "replica": self.pid})
            try:
                req = parse_request(await request.body())
            except BadRequest as exc:
                return JSONResponse({"detail": str(exc)}, 422)
            problem = self.reranker.check(req["model"], req["index"])
            if problem:
                return JSONResponse({"detail": problem}, 409)
            held = self.reranker.rows_held()
            if max(req["rows"]) >= held:  # refused alone, before it joins a batch with others
                return JSONResponse({"detail": f"the replica's patch file has no patch states for row "
                                     f"{max(req['rows'])} (it holds {held} rows)"}, 409)
            budget = req["budget_ms"]
            job = {"text": req["text"], "rows": req["rows"],
                   "deadline": None if budget is None else received + budget / 1000}
            try:
                logits = await self._score(job)
            except IndexError_ as exc:  # the patch file changed under the batch
                return JSONResponse({"detail": str(exc)}, 409)
            if logits is None:
                return JSONResponse({"detail": "the deadline passed before the rerank ran"}, 504)
            return JSONResponse({"logits": [float(x) for x in logits], "replica": self.pid})

    return CrossEncoderReplica


def app(args: dict):
    """`serve run fashionbert.service.rerankers:app model_dir=... index_dir=... [replicas=N]`."""
    cls = deployment(replicas=int(args.get("replicas", 1)), max_batch=int(args.get("max_batch", 8)))
    return cls.bind(args["model_dir"], args["index_dir"], args.get("variant"), int(args.get("threads", 1)))


def run(model_dir: str, index_dir: str, host: str, port: int, replicas: int, variant: str | None = None,
        threads: int = 1, max_batch: int = 8, temp_dir: str | None = None, stop=None) -> None:
    """Start a local Ray instance with the deployment on http://host:port/ and serve until `stop`
    (a threading.Event) is set or the process is interrupted."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray reports usage to its servers otherwise
    import ray
    from ray import serve

    ray.init(num_cpus=max(os.cpu_count() or 1, 1), include_dashboard=False, _node_ip_address="127.0.0.1",
             _temp_dir=temp_dir, logging_level=logging.WARNING, log_to_driver=False)
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        cls = deployment(replicas=replicas, max_batch=max_batch)
        serve.run(cls.bind(model_dir, index_dir, variant, threads), name="rerankers", route_prefix="/")
        log.info("%d cross-encoder replica(s) on Ray Serve at http://%s:%d/ (model %s, index %s).", replicas, host,
                 port, model_dir, index_dir)
        print(f"rerankers ready on http://{host}:{port}/", flush=True)
        while stop is None or not stop.is_set():
            time.sleep(0.5)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
