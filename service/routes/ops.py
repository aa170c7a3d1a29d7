"""Operations: liveness, readiness, Prometheus metrics, hot reload, and the web page."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..schemas import Alive, Ready, ReloadOut, ReloadRequest
from .deps import KeyDep, MetricsDep, StateDep, router as new_router

log = logging.getLogger("fashionbert.service")
PAGE = Path(__file__).parent.parent / "page.html"

router = new_router()


@router.get("/healthz", response_model=Alive)
async def healthz():
    return Alive(status="alive")


@router.get("/readyz", response_model=Ready, responses={503: {"model": Ready, "description": "loading or reloading"}})
async def readyz(state: StateDep):
    if state.engine is None:
        if state.loading:
            detail = f"loading, waiting for the recall server: {state.load_error}" if state.load_error else "loading"
        else:
            detail = f"failed: {state.load_error}"
        return JSONResponse({"status": detail}, 503, headers={"Retry-After": "5"})
    if state.reload_lock.locked():
        return JSONResponse({"status": "reloading", "model": state.engine.model_version}, 503,
                            headers={"Retry-After": "2"})
    return Ready(status="ready", model=state.engine.model_version, index=state.engine.index_version,
                 items=len(state.engine.index), read_only=state.engine.index.read_only)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}})
async def prometheus_metrics(state: StateDep, metrics: MetricsDep):
    if state.engine:
        metrics.index_size.set(len(state.engine.index))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", response_model=ReloadOut, dependencies=KeyDep)
async def reload(state: StateDep, req: ReloadRequest | None = None):
    """Re-open the configured model and index directories (after a rebuild into them), optionally
    with another cross-encoder variant of the export."""
    req = req or ReloadRequest()
    if state.reload_lock.locked():
        raise HTTPException(409, "a reload is already running")
    variants = state.engine.model.manifest["cross_encoder_variants"] if state.engine else {}
    if req.variant is not None and variants and req.variant not in variants:
        raise HTTPException(422, f"no cross-encoder variant {req.variant!r}: the export has {', '.join(sorted(variants))}")
    async with state.reload_lock:
        try:
            new = await asyncio.to_thread(state.new_engine, req.variant)
        except Exception as exc:  # the old engine keeps serving; the log has the paths, the answer not
            log.warning("Reload failed, still serving the previous model: %s", exc)
            serving = state.engine.model_version if state.engine else "nothing"
            raise HTTPException(422, f"reload failed: the configured model or index could not be opened "
                                     f"({type(exc).__name__}; the server log says why); still serving {serving}") from None
        state.set_engine(new)
    log.info("Reloaded: serving %s with %d items.", new.model_version, len(new.index))
    return ReloadOut(reloaded=True, model=new.model_version, index=new.index_version, items=len(new.index))


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE.read_text())
