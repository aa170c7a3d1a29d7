"""Operations: liveness, readiness, Prometheus metrics, hot reload, and the web page."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..schemas import ReloadRequest
from .deps import MetricsDep, StateDep, require_api_key

log = logging.getLogger("fashionbert.service")
PAGE = Path(__file__).parent.parent / "page.html"

router = APIRouter()


@router.get("/healthz")
async def healthz():
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(state: StateDep):
    if state.engine is None:
        detail = "loading" if state.loading else f"failed: {state.load_error}"
        return JSONResponse({"status": detail}, 503, headers={"Retry-After": "5"})
    if state.reload_lock.locked():
        return JSONResponse({"status": "reloading", "model": state.engine.model_version}, 503,
                            headers={"Retry-After": "2"})
    return {"status": "ready", "model": state.engine.model_version, "index": state.engine.index_version,
            "items": len(state.engine.index)}


@router.get("/metrics")
async def prometheus_metrics(state: StateDep, metrics: MetricsDep):
    if state.engine:
        metrics.index_size.set(len(state.engine.index))
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/admin/reload", dependencies=[Depends(require_api_key)])
async def reload(state: StateDep, req: ReloadRequest | None = None):
    req = req or ReloadRequest()
    if state.reload_lock.locked():
        raise HTTPException(409, "a reload is already running")
    async with state.reload_lock:
        try:
            new = await asyncio.to_thread(state.new_engine, req.model_dir, req.index_dir, req.variant)
        except Exception as exc:  # the old engine keeps serving
            log.warning("Reload failed, still serving the previous model: %s", exc)
            return JSONResponse({"reloaded": False, "detail": str(exc),
                                 "serving": state.engine.model_version if state.engine else None}, 422)
        state.set_engine(new)
    return {"reloaded": True, "model": new.model_version, "index": new.index_version, "items": len(new.index)}


@router.get("/", response_class=HTMLResponse)
async def page():
    return HTMLResponse(PAGE.read_text())
