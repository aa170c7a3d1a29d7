"""The API's side of the cross-encoder replicas (service/rerankers.py): one HTTP call per /search.

The caller's deadline crosses the hop: the request carries the time left, the replica drops it unrun
once that has passed, and the call itself gives up then (the pipeline returns the recall order,
flagged, as for a local rerank that misses its deadline). A replica that dies mid-request (a reset
connection, or Ray's proxy answering 500/502) is retried once on another while time is left, so a
killed replica costs nothing beyond the requests it was running when both tries fail. Ray's own
load shedding (503 once its queues are full) is not retried: the pipeline falls back to the
recall order at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

import httpx
import numpy as np

from ..index.search import RerankUnavailable

log = logging.getLogger(__name__)
CONNECT_S = 1.0


class RerankClient:
    def __init__(self, url: str, model_hash: str, index_built: str, timeout_s: float = 10.0):
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"FASHIONBERT_RERANKERS={url!r}: use http://HOST:PORT of the Ray Serve proxy")
        self.url, self.model_hash, self.index_built = url.rstrip("/") + "/", model_hash, index_built
        self.timeout_s = timeout_s
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=64))

    async def logits(self, text: str, rows: list[int], deadline: float | None) -> np.ndarray | None:
        """The cross-encoder's logits for these rows, or None when the deadline (a
        time.perf_counter() value) came first."""
        body = {"text": text, "rows": [int(r) for r in rows], "model": self.model_hash, "index": self.index_built}
        for attempt in (1, 2):
            left = None if deadline is None else deadline - time.perf_counter()
            if left is not None and left <= 0:
                return None
            body["budget_ms"] = None if left is None else left * 1000
            total = self.timeout_s if left is None else left
            try:
                # httpx's timeout is per phase: connecting gets at most a second, so a host that drops
                # packets is reported as unreachable rather than waited on for the whole deadline.
                resp = await self.client.post(self.url, json=body,
                                              timeout=httpx.Timeout(total, connect=min(total, CONNECT_S)))
            except httpx.ConnectTimeout:
                problem = f"the rerankers at {self.url} did not accept a connection within {CONNECT_S:g} s"
            except httpx.TimeoutException:
                if deadline is not None:
                    return None
                raise RerankUnavailable(f"the rerankers at {self.url} did not answer within {self.timeout_s:g} s") from None
            except httpx.TransportError as exc:
                problem = f"the rerankers at {self.url} are unreachable ({type(exc).__name__})"
            else:
                if resp.status_code == 200:
                    try:
                        logits = np.asarray(resp.json()["logits"], dtype=np.float32)
                    except (ValueError, KeyError, TypeError):
                        raise RerankUnavailable(f"the rerankers at {self.url} answered 200 without logits") from None
                    if logits.shape != (len(rows),):
                        raise RerankUnavailable(f"the rerankers answered {logits.size} logits for {len(rows)} rows")
                    return logits
                if resp.status_code == 504:
                    return None
                detail = _detail(resp)
                if resp.status_code == 503:
                    raise RerankUnavailable(f"the rerankers are overloaded ({detail})")
                if resp.status_code not in (500, 502):
                    raise RerankUnavailable(f"the rerankers refused the request: {resp.status_code} {detail}")
                problem = f"a reranker failed: {resp.status_code} {detail}"
            if attempt == 1:
                log.warning("%s; trying once more.", problem)
        raise RerankUnavailable(problem)

    def probe(self) -> dict:
        """What a replica serves (model, index, pid), or RerankUnavailable (a blocking call)."""
        try:
            resp = httpx.get(self.url, timeout=min(self.timeout_s, 5.0))
        except httpx.HTTPError as exc:
            raise RerankUnavailable(f"the rerankers at {self.url} are unreachable ({type(exc).__name__})") from None
        if resp.status_code != 200:
            raise RerankUnavailable(f"the rerankers at {self.url} answered {resp.status_code} {_detail(resp)}")
        return resp.json()

    def close(self) -> None:
        """Let go of the connections (on the event loop that used them, when there is one)."""
        try:
            asyncio.get_running_loop().create_task(self.client.aclose())
        except RuntimeError:
            pass


def _detail(resp: httpx.Response) -> str:
    try:
        body = resp.json()
    except ValueError:
        return resp.text[:300].strip()
    return str(body.get("detail", "") if isinstance(body, dict) else body)[:300]
