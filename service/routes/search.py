"""POST /search: a text or image query through the search pipeline (index/search.py)."""

from __future__ import annotations

import time

from ...index.store import Filters
from ..admission import Work
from ..engine import check_text, decode_in_thread
from ..schemas import ResultItem, SearchRequest, SearchResponse
from .deps import EngineDep, MetricsDep, SettingsDep, StateDep, image_url, router as new_router

router = new_router()


@router.post("/search", response_model=SearchResponse)
async def search(req: SearchRequest, eng: EngineDep, state: StateDep, settings: SettingsDep, metrics: MetricsDep):
    started = time.perf_counter()
    timings: dict[str, float] = {}
    text = pixels = None
    if req.text is not None:
        text = check_text(req.text, settings.max_text_chars)
    else:
        pixels = await decode_in_thread(req.image, settings.max_image_bytes)
        timings["decode"] = (time.perf_counter() - started) * 1000
    rerank = text is not None and req.rerank and req.rerank_k > 0
    # Admission counts this server's own work: a rerank on remote replicas is theirs.
    work = Work(texts=int(text is not None), images=int(text is None), recalls=1,
                pairs=min(req.rerank_k, req.candidates) if rerank and eng.remote is None else 0)
    with state.admission.admit(work):
        result = await eng.pipeline.search(text=text, pixels=pixels, k=req.k, candidates=req.candidates,
                                           rerank=req.rerank, rerank_k=req.rerank_k,
                                           filters=Filters(**req.filters.model_dump()) if req.filters else None,
                                           deadline=started + settings.deadline_ms / 1000)
    if rerank:
        metrics.rerank_requested.inc()
        if result.deadline_exceeded or result.rerank_error:
            metrics.rerank_lost.inc()
    timings.update(result.timings_ms)
    meta = eng.index.items_by_row([r.row for r in result.results])
    items = []
    for r in result.results:
        m = meta.get(r.row)
        if m is None:  # deleted while this request ran
            continue
        items.append(ResultItem(id=m["id"], name=m["name"], description=m["description"], category=m["category"],
                                subcategory=m["subcategory"], gender=m["gender"], price=m["price"],
                                image_url=image_url(m["id"]), score=r.score, recall_score=r.recall_score,
                                match_probability=r.match_probability, rank=len(items) + 1))
    for stage, ms in timings.items():
        metrics.stage.labels(stage).observe(ms / 1000)
    timings["total"] = (time.perf_counter() - started) * 1000
    return SearchResponse(items=items, timings_ms={k: round(v, 2) for k, v in timings.items()},
                          reranked=result.reranked, deadline_exceeded=result.deadline_exceeded,
                          rerank_error=result.rerank_error,
                          model_version=eng.model_version, index_version=eng.index_version)
