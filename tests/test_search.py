"""The search pipeline (index/search.py) over a stand-in backend: fusion order, the deadline rule,
image queries, and the cross-encoder batch packing (runtime/exported.py). No model needed."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from fashionbert.index.search import LocalBackend, RerankUnavailable, SearchPipeline
from fashionbert.index.store import Hit
from fashionbert.runtime.exported import ExportedModel
from fashionbert.runtime.scoring import fused_scores, sigmoid

COSINES = [0.9, 0.8, 0.7, 0.6, 0.5]
MANIFEST = {"itc_scale": 10.0, "cross_weight": 0.5}


class Backend(LocalBackend):
    """Recall returns items 0..4 by falling cosine; the cross-encoder answers `logits` after `delay` s."""

    def __init__(self, logits, delay: float = 0.0):
        self.logits, self.delay = np.asarray(logits, dtype=np.float32), delay
        self.cross_runs: list[int] = []  # pairs per finished cross-encoder run

    async def encode_text(self, text):
        return np.zeros(4, np.float32), np.zeros((3, 8), np.float32)

    async def encode_image(self, pixels):
        return np.zeros(4, np.float32), np.zeros((2, 8), np.float32)

    async def recall(self, embedding, n, filters):
        return [Hit(row=i, id=f"item{i}", score=c) for i, c in enumerate(COSINES)][:n]

    async def patch_states(self, rows):
        return np.zeros((len(rows), 2, 8), np.float32)

    async def match_logits(self, text_states, patch_states):
        await asyncio.sleep(self.delay)
        self.cross_runs.append(len(patch_states))
        return self.logits[: len(patch_states)]


class DownBackend(Backend):
    async def rerank_logits(self, text, text_states, rows, deadline):
        raise RerankUnavailable("the rerankers at http://x/ are unreachable")


def test_a_rerank_that_cannot_run_returns_the_recall_order_with_the_reason():
    result = asyncio.run(SearchPipeline(DownBackend([1.0] * 4), MANIFEST).search(text="navy shirt", k=5, rerank_k=4))
    assert result.reranked == 0 and not result.deadline_exceeded and "unreachable" in result.rerank_error
    assert [r.id for r in result.results] == [f"item{i}" for i in range(5)]
    assert all(r.match_probability is None for r in result.results)


def test_rerank_orders_the_top_k_by_the_fused_score_and_keeps_the_tail():
    logits = [0.0, 0.0, 6.0, -1.0]
    result = asyncio.run(SearchPipeline(Backend(logits), MANIFEST).search(text="navy shirt", k=5, rerank_k=4))
    assert result.reranked == 4 and not result.deadline_exceeded
    assert [r.id for r in result.results] == ["item2", "item0", "item1", "item3", "item4"]
    assert [r.rank for r in result.results] == [1, 2, 3, 4, 5]
    fused = fused_scores(np.array(logits), COSINES[:4], 10.0, 0.5)
    by_id = {r.id: r for r in result.results}
    for i in range(4):
        assert by_id[f"item{i}"].score == pytest.approx(fused[i])
        assert by_id[f"item{i}"].match_probability == pytest.approx(sigmoid(logits[i]))
    assert by_id["item4"].score == by_id["item4"].recall_score == 0.5 and by_id["item4"].match_probability is None
    assert {"encode", "recall", "rerank"} <= set(result.timings_ms)


def test_a_rerank_past_the_deadline_returns_the_recall_order_and_is_not_cancelled():
    backend = Backend([5.0, 0.0, 9.0, 0.0], delay=0.3)
    pipeline = SearchPipeline(backend, MANIFEST)

    async def run():
        started = time.perf_counter()
        result = await pipeline.search(text="navy shirt", k=3, rerank_k=4, deadline=started + 0.05)
        waited = time.perf_counter() - started
        await asyncio.sleep(0.4)  # the run goes on for whoever shares it
        return result, waited

    result, waited = asyncio.run(run())
    assert result.deadline_exceeded and result.reranked == 0 and waited < 0.25
    assert [r.id for r in result.results] == ["item0", "item1", "item2"]
    assert all(r.match_probability is None for r in result.results)
    assert backend.cross_runs == [4]


def test_a_deadline_already_past_skips_the_rerank():
    backend = Backend([0.0] * 4)
    result = asyncio.run(SearchPipeline(backend, MANIFEST).search(text="x", k=2, deadline=time.perf_counter() - 1))
    assert result.deadline_exceeded and result.reranked == 0 and backend.cross_runs == []
    assert [r.id for r in result.results] == ["item0", "item1"]


def test_image_queries_are_recall_only():
    backend = Backend([9.0] * 4)
    pixels = np.zeros((256, 256, 3), np.uint8)
    result = asyncio.run(SearchPipeline(backend, MANIFEST).search(pixels=pixels, k=2, candidates=1))
    assert [r.id for r in result.results] == ["item0", "item1"]  # recall depth is at least k
    assert result.reranked == 0 and backend.cross_runs == [] and not result.deadline_exceeded
    with pytest.raises(ValueError, match="exactly one"):
        asyncio.run(SearchPipeline(backend, MANIFEST).search(text="x", pixels=pixels))


def test_rerank_jobs_pad_captions_into_one_run_and_split_the_logits_back():
    runs = []

    class Cross:  # the cross-encoder's stand-in: logit = the caption's unmasked states' sum + the item's patch value
        def match_logits(self, text, mask, patches):
            runs.append((text.shape, mask.copy()))
            return (text * mask[..., None]).sum(axis=(1, 2)) + patches[:, 0, 0]

    short = (np.ones((2, 3), np.float32), np.arange(2, dtype=np.float32).reshape(2, 1, 1) * np.ones((2, 4, 3)))
    long = (np.full((5, 3), 2.0, np.float32), 10 + np.arange(3, dtype=np.float32).reshape(3, 1, 1) * np.ones((3, 4, 3)))
    out = ExportedModel.rerank_jobs(Cross(), [short, long])
    assert len(runs) == 1 and runs[0][0] == (5, 5, 3)
    assert runs[0][1].sum(1).tolist() == [2, 2, 5, 5, 5]
    assert [o.tolist() for o in out] == [[6.0, 7.0], [40.0, 41.0, 42.0]]
