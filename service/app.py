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

from .errors import HANDLERS, error
from .http import Gate
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
        if not settings.api_key:
            log.warning("No API key is set: adding, deleting and reload are disabled (403). "
                        "Set FASHIONBERT_API_KEY to enable them.")
        hosts = settings.hosts()
        log.info("Serving the Host names %s.", "of any name" if hosts is None else ", ".join(sorted(hosts)))
        # Loaded beside the event loop: /healthz answers at once, /readyz says 503 until ready.
        threading.Thread(target=state.load_initial, daemon=True).start()
        yield
        state.close()

    app = FastAPI(title="FashionBERT retrieval", version="0.1.0", lifespan=lifespan)
    app.state.settings, app.state.metrics = settings, Metrics()
    app.middleware("http")(guard)
    app.add_middleware(Gate, settings=settings, metrics=app.state.metrics)  # outermost: before any work
    for exc, handler in HANDLERS.items():
        app.add_exception_handler(exc, handler)
    for module in (search, match, items, ops):
        app.include_router(module.router)
    return app


async def guard(request: Request, call_next):
    """The concurrency limit (503), no stack traces (500), and request metrics."""
    settings: Settings = request.app.state.settings
    metrics: Metrics = request.app.state.metrics
    endpoint = endpoint_label(request.url.path)
    state: State | None = getattr(request.app.state, "serving", None)
    slot = state is not None and request.url.path in LIMITED
    start = time.perf_counter()
    if slot:
        # A short, bounded wait for a slot (a client's next request can arrive a moment
        # before the previous one has let go of its slot); beyond it, 503 rather than a queue.
        try:
            await asyncio.wait_for(state.slots.acquire(), settings.queue_wait_ms / 1000)
        except asyncio.TimeoutError:
            metrics.rejected.labels("concurrency").inc()
            metrics.requests.labels(endpoint, request.method, "503").inc()
            return error(503, "busy: too many requests in flight, retry shortly",
                         {"Retry-After": str(settings.retry_after_s)})
    metrics.in_flight.inc()
    try:
        response = await call_next(request)
    except Exception:  # never a stack trace to the client
        log.exception("Unhandled error on %s", request.url.path)
        response = error(500, "internal error")
    finally:
        metrics.in_flight.dec()
        if slot:
            state.slots.release()
    metrics.requests.labels(endpoint, request.method, str(response.status_code)).inc()
    metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
    return response
