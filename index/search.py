"""The one search pipeline: query tower -> FAISS recall -> cross-encoder rerank of the top K -> results.

The CLI (`fashionbert index search`, through `Searcher`) and the service's POST /search
(service/engine.py's Engine, which batches across requests) both run `SearchPipeline.search`;
they differ only in the backend that runs the model and the index.

The rerank orders the top K by the cross-encoder's match logit, times a weight fitted on products
the model never trained on (manifest "cross_weight", runtime/scoring.py), plus the two-tower
logit (the towers' learned inverse temperature times the cosine): the two models' evidence added.
On the demo catalog this ordering measured far better than the cross-encoder alone and level with
the towers alone at R@1, ahead at R@5 and R@10 (docs/results-history.md). Image queries ("more
like this") are recall only.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import numpy as np

from ..runtime.exported import ExportedModel, TextBatch
from ..runtime.scoring import fused_scores, sigmoid
from .store import CatalogIndex, Filters, Hit


class RerankUnavailable(RuntimeError):
    """The rerank could not run (remote replicas down or overloaded); the message says why."""


@dataclass
class Result:
    id: str
    row: int
    recall_score: float  # two-tower cosine
    score: float  # what the list is ordered by: the fused rerank score, or the recall score
    match_probability: float | None = None  # the cross-encoder's, for reranked items
    rank: int = 0


@dataclass
class SearchResult:
    results: list[Result]
    timings_ms: dict[str, float] = field(default_factory=dict)
    reranked: int = 0
    deadline_exceeded: bool = False
    rerank_error: str | None = None  # why the top is in recall order although a rerank was asked for


def text_queries(batch: TextBatch) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per caption of a text-tower batch: its embedding (E,) and its unpadded text states (T, H)."""
    return [(batch.embedding[i], batch.states[i, : int(batch.mask[i].sum())]) for i in range(len(batch.embedding))]


class LocalBackend:
    """What the pipeline runs, over a model and index loaded in this process. Each call runs in a
    worker thread, so a deadline can stop waiting for a rerank while it runs."""

    def __init__(self, model: ExportedModel, index: CatalogIndex):
        self.model, self.index = model, index

    async def encode_text(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        return text_queries(await asyncio.to_thread(self.model.encode_text, [text]))[0]

    async def encode_image(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        emb, states = await asyncio.to_thread(self.model.encode_images, pixels[None])
        return emb[0], states[0]

    async def recall(self, embedding: np.ndarray, n: int, filters: Filters | None) -> list[Hit]:
        return await asyncio.to_thread(self.index.search, embedding, n, filters)

    async def patch_states(self, rows: list[int]) -> np.ndarray:
        return await asyncio.to_thread(self.index.patches.read, rows)

    async def match_logits(self, text_states: np.ndarray, patch_states: np.ndarray) -> np.ndarray:
        return (await asyncio.to_thread(self.model.rerank_jobs, [(text_states, patch_states)]))[0]

    async def rerank_logits(self, text: str, text_states: np.ndarray, rows: list[int],
                            deadline: float | None) -> np.ndarray | None:
        """The cross-encoder's logits for these rows (None: the deadline came first). Here: their
        patch states read and scored in this process; service/engine.py can send it to replicas."""
        return await self.match_logits(text_states, await self.patch_states(rows))


class SearchPipeline:
    """`backend`: a LocalBackend or anything with its async methods; `manifest`: the export's,
    for the fusion's two numbers."""

    def __init__(self, backend: LocalBackend, manifest: dict):
        self.backend = backend
        self.itc_scale = float(manifest.get("itc_scale", 0.0))
        self.cross_weight = float(manifest.get("cross_weight", 1.0))

    async def search(self, text: str | None = None, pixels: np.ndarray | None = None, k: int = 10,
                     candidates: int = 100, rerank: bool = True, rerank_k: int = 20, filters: Filters | None = None,
                     deadline: float | None = None) -> SearchResult:
        """One of `text` or `pixels` (a model image). `deadline`: a time.perf_counter() value; the
        rerank is waited on until then at most, and if it is not done the recall order is returned,
        flagged `deadline_exceeded`."""
        if (text is None) == (pixels is None):
            raise ValueError("give exactly one of text or pixels")
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        if text is not None:
            embedding, text_states = await self.backend.encode_text(text)
        else:
            embedding, _ = await self.backend.encode_image(pixels)
        timings["encode"] = _ms(t0)
        t0 = time.perf_counter()
        hits = await self.backend.recall(embedding, max(candidates, k), filters)
        timings["recall"] = _ms(t0)
        results = [Result(h.id, h.row, h.score, h.score) for h in hits]
        top = hits[:rerank_k] if text is not None and rerank else []
        reranked, late, error = 0, False, None
        if top and deadline is not None and time.perf_counter() >= deadline:
            late = True
        elif top:
            t0 = time.perf_counter()
            try:
                logits = await self._rerank_logits(text, text_states, top, deadline)
            except RerankUnavailable as exc:  # remote replicas down or shedding: the recall order, flagged
                logits, error = None, str(exc)
            if logits is None:
                late = error is None
            else:
                fused = fused_scores(logits, [h.score for h in top], self.itc_scale, self.cross_weight)
                head = [Result(h.id, h.row, h.score, float(f), float(p)) for h, f, p in zip(top, fused, sigmoid(logits))]
                head.sort(key=lambda r: -r.score)
                results = head + results[len(top) :]
                reranked = len(top)
            timings["rerank"] = _ms(t0)
        results = results[:k]
        for rank, r in enumerate(results, 1):
            r.rank = rank
        return SearchResult(results, timings, reranked, late, error)

    async def _rerank_logits(self, text: str, text_states: np.ndarray, top: list[Hit],
                             deadline: float | None) -> np.ndarray | None:
        """The cross-encoder's logits for the top hits, or None when the deadline came first."""
        job = asyncio.ensure_future(self.backend.rerank_logits(text, text_states, [h.row for h in top], deadline))
        if deadline is None:
            return await job
        # Waited on, never cancelled: a batched run goes on for the other requests in it.
        done, _ = await asyncio.wait({job}, timeout=max(deadline - time.perf_counter(), 0.001))
        if not done:
            job.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
            return None
        return job.result()  # None: a remote rerank's own deadline came first


class Searcher:
    """The pipeline run synchronously, over a model and index in this process: the CLI's search,
    and scripts'. It starts an event loop of its own, so call it from plain code, not from inside
    a running loop (async code awaits `SearchPipeline.search` instead)."""

    def __init__(self, model: ExportedModel, index: CatalogIndex):
        self.pipeline = SearchPipeline(LocalBackend(model, index), model.manifest)

    def search_text(self, query: str, k: int = 10, candidates: int = 100, rerank: bool = True, rerank_k: int = 20,
                    filters: Filters | None = None, deadline: float | None = None) -> SearchResult:
        return asyncio.run(self.pipeline.search(text=query, k=k, candidates=candidates, rerank=rerank,
                                                rerank_k=rerank_k, filters=filters, deadline=deadline))


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000
