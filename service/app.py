"""The FastAPI app: search, match, items, health, metrics, reload, and the web page.

    fashionbert serve [--host 127.0.0.1] [--port 8000]       (settings: service/settings.py)
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

from ..catalog.items import CatalogItem
from ..runtime.scoring import sigmoid
from ..index.store import Filters
from .engine import BadInput, Engine, decode_base64_image
from .schemas import (ItemOut, MatchBatchRequest, MatchBatchResponse, MatchPair, MatchRequest, MatchResult, NewItem,
                      ReloadRequest, ResultItem, SearchRequest, SearchResponse)
from .settings import Settings

log = logging.getLogger("fashionbert.service")
PAGE = Path(__file__).with_name("page.html")
LATENCY_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10)


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("fashionbert_requests", "HTTP requests", ["endpoint", "method", "status"], registry=r)
        self.latency = Histogram("fashionbert_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.stage = Histogram("fashionbert_stage_seconds", "time per search stage", ["stage"], buckets=LATENCY_BUCKETS,
                               registry=r)
        self.batch = Histogram("fashionbert_rerank_batch_pairs", "pairs per cross-encoder run (micro-batched)",
                               buckets=(1, 5, 10, 20, 40, 80, 160), registry=r)
        self.index_size = Gauge("fashionbert_index_items", "items in the index", registry=r)
        self.in_flight = Gauge("fashionbert_requests_in_flight", "requests being served", registry=r)
        self.rejected = Counter("fashionbert_rejected_busy", "requests turned away with 503 (too many in flight)",
                                registry=r)
        self.build = Info("fashionbert_build", "model and index loaded", registry=r)


class State:
    """The serving engine and its swap: requests take `engine` once and keep it to the end."""

    def __init__(self, settings: Settings, metrics: Metrics):
        self.settings, self.metrics = settings, metrics
        self.engine: Engine | None = None
        self.loading = True
        self.load_error: str | None = None
        self.reload_lock = asyncio.Lock()
        self.slots = asyncio.Semaphore(settings.max_concurrency)

    def set_engine(self, engine: Engine) -> None:
        old, self.engine = self.engine, engine
        self.metrics.build.info({"model": engine.model_version, "index": str(engine.index_dir),
                                 "model_dir": str(engine.model_dir)})
        self.metrics.index_size.set(len(engine.index))
        if old is not None:
            # Requests in flight hold their own reference to the old engine: stop its workers
            # only once they have surely finished.
            timer = threading.Timer(max(60.0, self.settings.deadline_ms / 1000 * 4), old.close)
            timer.daemon = True
            timer.start()


def _key_checker(settings: Settings):
    def check(x_api_key: str | None = Header(None)):
        if settings.api_key and not (x_api_key and hmac.compare_digest(x_api_key, settings.api_key)):
            raise HTTPException(401, "this endpoint needs the X-API-Key header")

    return check


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    metrics = Metrics()
    state_holder: dict[str, State] = {}

    def load_initial(state: State) -> None:
        try:
            state.set_engine(Engine(settings, on_batch=metrics.batch.observe))
            log.info("Serving %s with index %s (%d items).", state.engine.model_version, settings.index_dir,
                     len(state.engine.index))
        except Exception as exc:  # the message is what /readyz says
            state.load_error = str(exc)
            log.error("Could not load the model and index: %s", exc)
        finally:
            state.loading = False

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = State(settings, metrics)
        state_holder["state"] = state
        # Loaded beside the event loop: /healthz answers at once, /readyz says 503 until ready.
        threading.Thread(target=load_initial, args=(state,), daemon=True).start()
        yield
        if state.engine:
            state.engine.close()

    app = FastAPI(title="FashionBERT retrieval", version="0.1.0", lifespan=lifespan)
    require_key = _key_checker(settings)

    def engine() -> Engine:
        state = state_holder["state"]
        if state.engine is None:
            raise HTTPException(503, "loading the model and index" if state.loading else
                                f"model and index failed to load: {state.load_error}", headers={"Retry-After": "5"})
        return state.engine

    # Middleware: body limit, concurrency limit, metrics ------------------------------------------

    limited = {"/search", "/match", "/match/batch", "/items"}

    @app.middleware("http")
    async def guard(request: Request, call_next):
        endpoint = _endpoint_label(request.url.path)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            metrics.requests.labels(endpoint, request.method, "413").inc()
            return JSONResponse({"detail": f"request body over the {settings.max_body_bytes:,}-byte limit"}, 413)
        state = state_holder.get("state")
        slot = state is not None and request.url.path in limited
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

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
        summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
        return JSONResponse({"detail": summary or "invalid request", "errors": errors}, 422)

    @app.exception_handler(BadInput)
    async def bad_input(request: Request, exc: BadInput):
        return JSONResponse({"detail": str(exc)}, 422)

    # Search --------------------------------------------------------------------------------------

    def check_text(text: str) -> str:
        text = text.strip()
        if not text:
            raise BadInput("text is empty")
        if len(text) > settings.max_text_chars:
            raise BadInput(f"text is over the {settings.max_text_chars}-character limit")
        return text

    @app.post("/search", response_model=SearchResponse)
    async def search(req: SearchRequest, eng: Engine = Depends(engine)):
        started = time.perf_counter()
        deadline = started + settings.deadline_ms / 1000
        timings: dict[str, float] = {}
        filters = Filters(**req.filters.model_dump()) if req.filters else None
        t0 = time.perf_counter()
        if req.text is not None:
            text = check_text(req.text)
            embedding, text_states = await eng.encode_text(text)
            timings["encode"] = _ms(t0)
        else:
            pixels = decode_base64_image(req.image, settings.max_image_bytes)
            timings["decode"] = _ms(t0)
            t0 = time.perf_counter()
            embedding, _ = await eng.encode_image(pixels)
            timings["encode"] = _ms(t0)
        t0 = time.perf_counter()
        hits = await eng.recall(embedding, max(req.candidates, req.k), filters)
        timings["recall"] = _ms(t0)
        order = [(h, h.score, None) for h in hits]
        reranked, late = 0, False
        if req.text is not None and req.rerank and req.rerank_k > 0 and hits:
            top = hits[: req.rerank_k]
            if time.perf_counter() >= deadline:
                late = True
            else:
                t0 = time.perf_counter()
                patches = await eng.patch_states([h.row for h in top])
                remaining = deadline - time.perf_counter()
                # Waited on, never cancelled: the batched run goes on for its other requests.
                job = asyncio.ensure_future(eng.match_logits(text_states, patches))
                done, _ = await asyncio.wait({job}, timeout=max(remaining, 0.001))
                if not done:
                    late = True
                    job.add_done_callback(lambda f: f.cancelled() or f.exception())  # nobody awaits it now
                else:
                    logits = job.result()
                    fused, prob = eng.rerank_scores(logits, top)
                    head = sorted(zip(top, fused, prob), key=lambda x: -x[1])
                    order = [(h, float(f), float(p)) for h, f, p in head] + order[len(top):]
                    reranked = len(top)
                timings["rerank"] = _ms(t0)
        order = order[: req.k]
        meta = eng.index.items_by_row([h.row for h, _, _ in order])
        items = []
        for rank, (h, score, prob) in enumerate(order, 1):
            m = meta.get(h.row)
            if m is None:  # deleted while this request ran
                continue
            items.append(ResultItem(id=m["id"], name=m["name"], description=m["description"], category=m["category"],
                                    subcategory=m["subcategory"], gender=m["gender"], price=m["price"],
                                    image_url=f"/items/{_quote(m['id'])}/image", score=score, recall_score=h.score,
                                    match_probability=prob, rank=len(items) + 1))
        for stage, ms in timings.items():
            metrics.stage.labels(stage).observe(ms / 1000)
        timings["total"] = _ms(started)
        return SearchResponse(items=items, timings_ms={k: round(v, 2) for k, v in timings.items()}, reranked=reranked,
                              deadline_exceeded=late, model_version=eng.model_version, index_version=eng.index_version)

    # Match ---------------------------------------------------------------------------------------

    async def match_pairs(pairs: list[MatchPair], eng: Engine) -> list[MatchResult]:
        if len(pairs) > settings.max_match_pairs:
            raise BadInput(f"at most {settings.max_match_pairs} pairs per request")
        texts = [check_text(p.text) for p in pairs]
        patches = []
        for p in pairs:
            if p.item_id is not None:
                row = eng.index.rows_of([p.item_id]).get(p.item_id)
                if row is None:
                    raise HTTPException(404, f"no item with id {p.item_id!r}")
                patches.append((await eng.patch_states([row]))[0])
            else:
                _, states = await eng.encode_image(decode_base64_image(p.image, settings.max_image_bytes))
                patches.append(states)
        encoded = await asyncio.gather(*(eng.encode_text(t) for t in texts))
        logits = await asyncio.gather(*(eng.match_logits(states, patch[None]) for (_, states), patch in zip(encoded, patches)))
        probs = [float(sigmoid(lg)[0]) for lg in logits]
        return [MatchResult(score=p, match=p >= settings.match_threshold) for p in probs]

    @app.post("/match", response_model=MatchResult)
    async def match(req: MatchRequest, eng: Engine = Depends(engine)):
        return (await match_pairs([req], eng))[0]

    @app.post("/match/batch", response_model=MatchBatchResponse)
    async def match_batch(req: MatchBatchRequest, eng: Engine = Depends(engine)):
        return MatchBatchResponse(results=await match_pairs(req.pairs, eng))

    # Items ---------------------------------------------------------------------------------------

    @app.get("/items/{item_id}", response_model=ItemOut)
    async def get_item(item_id: str, eng: Engine = Depends(engine)):
        m = eng.index.item(item_id)
        if m is None:
            raise HTTPException(404, f"no item with id {item_id!r}")
        return ItemOut(**{k: m[k] for k in ("id", "product_id", "name", "description", "category", "subcategory", "gender",
                                            "price", "metadata")}, image_url=f"/items/{_quote(item_id)}/image")

    @app.get("/items/{item_id}/image")
    async def get_image(item_id: str, eng: Engine = Depends(engine)):
        data = eng.index.image(item_id)
        if data is None:
            raise HTTPException(404, f"no item with id {item_id!r}")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    @app.post("/items", status_code=201, response_model=ItemOut, dependencies=[Depends(require_key)])
    async def add_item(req: NewItem, eng: Engine = Depends(engine)):
        if eng.index.config.kind == "hnsw":
            raise HTTPException(409, "this index is hnsw (rebuild-only): it cannot take new items")
        if eng.index.item(req.id) is not None:
            raise HTTPException(409, f"an item with id {req.id!r} exists: delete it first")
        pixels = decode_base64_image(req.image, settings.max_image_bytes)
        item = CatalogItem(id=req.id, product_id=req.product_id or req.id, name=req.name, description=req.description,
                           category=req.category, subcategory=req.subcategory, split="all", metadata=dict(req.metadata),
                           image=pixels)
        try:
            await eng.add_item(item)
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
        metrics.index_size.set(len(eng.index))
        return await get_item(req.id, eng)

    @app.delete("/items/{item_id}", dependencies=[Depends(require_key)])
    async def delete_item(item_id: str, eng: Engine = Depends(engine)):
        if eng.index.config.kind == "hnsw":
            raise HTTPException(409, "this index is hnsw (rebuild-only): it cannot delete items")
        if not await eng.delete_item(item_id):
            raise HTTPException(404, f"no item with id {item_id!r}")
        metrics.index_size.set(len(eng.index))
        return {"deleted": item_id}

    # Operations ----------------------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        state = state_holder["state"]
        if state.engine is None:
            detail = "loading" if state.loading else f"failed: {state.load_error}"
            return JSONResponse({"status": detail}, 503, headers={"Retry-After": "5"})
        if state.reload_lock.locked():
            return JSONResponse({"status": "reloading", "model": state.engine.model_version}, 503,
                                headers={"Retry-After": "2"})
        return {"status": "ready", "model": state.engine.model_version, "index": state.engine.index_version,
                "items": len(state.engine.index)}

    @app.get("/metrics")
    async def prometheus_metrics():
        state = state_holder.get("state")
        if state and state.engine:
            metrics.index_size.set(len(state.engine.index))
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/admin/reload", dependencies=[Depends(require_key)])
    async def reload(req: ReloadRequest | None = None):
        state = state_holder["state"]
        req = req or ReloadRequest()
        if state.reload_lock.locked():
            raise HTTPException(409, "a reload is already running")
        async with state.reload_lock:
            try:
                new = await asyncio.to_thread(Engine, settings, req.model_dir, req.index_dir, req.variant,
                                              metrics.batch.observe)
            except Exception as exc:  # the old engine keeps serving
                log.warning("Reload failed, still serving the previous model: %s", exc)
                return JSONResponse({"reloaded": False, "detail": str(exc),
                                     "serving": state.engine.model_version if state.engine else None}, 422)
            state.set_engine(new)
        return {"reloaded": True, "model": new.model_version, "index": new.index_version, "items": len(new.index)}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text())

    return app


def _endpoint_label(path: str) -> str:
    if path.startswith("/items/"):
        return "/items/{id}/image" if path.endswith("/image") else "/items/{id}"
    return path if path in {"/", "/search", "/match", "/match/batch", "/items", "/healthz", "/readyz", "/metrics",
                            "/admin/reload"} else "other"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _quote(item_id: str) -> str:
    from urllib.parse import quote

    return quote(item_id, safe="")
