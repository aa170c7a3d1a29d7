"""The FastAPI app: search, match, items, health, metrics, reload, and the web page (service/routes/).

    fashionbert serve [--host 127.0.0.1] [--port 8000]       (settings: service/settings.py)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .engine import BadInput
from .metrics import Metrics, endpoint_label
from .routes import items, match, ops, search
from .settings import Settings
from .state import State

log = logging.getLogger("fashionbert.service")
LIMITED = {"/search", "/match", "/match/batch", "/items"}  # the paths that take a concurrency slot


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state.serving = State(settings, app.state.metrics)
        # Loaded beside the event loop: /healthz answers at once, /readyz says 503 until ready.
        threading.Thread(target=state.load_initial, daemon=True).start()
        yield
        if state.engine:
            state.engine.close()

    app = FastAPI(title="FashionBERT retrieval", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, Metrics()
    app.middleware("http")(guard)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(BadInput, bad_input)
    for module in (search, match, items, ops):
        app.include_router(module.router)
    return app


async def guard(request: Request, call_next):
    """The body limit (413), the concurrency limit (503), no stack traces (500), and request metrics."""
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    endpoint = endpoint_label(request.url.path)
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
        metrics.requests.labels(endpoint, request.method, "413").inc()
        return JSONResponse({"detail": f"request body over the {settings.max_body_bytes:,}-byte limit"}, 413)
    state: State | None = getattr(request.app.state, "serving", None)
    slot = state is not None and request.url.path in LIMITED
    start = time.perf_counter()
    if slot:
        # A short, bounded wait for a slot (a client's next request can arrive a moment
        # before the previous one has let go of its slot); beyond it, 503 rather than a queue.
        try:
            await asyncio.wait_for(state.slots.acquire(), settings.queue_wait_ms / 1000)
        except asyncio.TimeoutError:
            metrics.rejected.inc()
            metrics.requests.labels(endpoint, request.method, "503").inc()
            return JSONResponse({"detail": "busy: too many requests in flight, retry shortly"}, 503,
                                headers={"Retry-After": str(settings.retry_after_s)})
    metrics.in_flight.inc()
    try:
        response = await call_next(request)
    except Exception:  # never a stack trace to the client
        log.exception("Unhandled error on %s", request.url.path)
        response = JSONResponse({"detail": "internal error"}, 500)
    finally:
        metrics.in_flight.dec()
        if slot:
            state.slots.release()
    metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response


async def invalid(request: Request, exc: RequestValidationError):
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return JSONResponse({"detail": summary or "invalid request", "errors": errors}, 422)


async def bad_input(request: Request, exc: BadInput):
    return JSONResponse({"detail": str(exc)}, 422)
