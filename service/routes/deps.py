"""What the handlers get through FastAPI dependencies: settings, metrics, the serving state and
engine (all on `app.state`, set by create_app), and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, HTTPException, Request

from ..engine import Engine
from ..errors import ERROR_RESPONSES
from ..http import JSONRoute
from ..metrics import Metrics
from ..settings import Settings
from ..state import State


def router() -> APIRouter:
    """Every route parses JSON off the event loop and declares the one error body."""
    return APIRouter(route_class=JSONRoute, responses=ERROR_RESPONSES)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_state(request: Request) -> State:
    return request.app.state.serving


async def get_engine(state: Annotated[State, Depends(get_state)]):
    """The engine in use, held until the response is done (a reload closes the old one after)."""
    engine = state.acquire()
    if engine is None:
        raise HTTPException(503, "loading the model and index" if state.loading else
                            f"the model and index failed to load: {state.load_error}", headers={"Retry-After": "5"})
    try:
        yield engine
    finally:
        state.release(engine)


def require_api_key(settings: Annotated[Settings, Depends(get_settings)],
                    x_api_key: Annotated[str | None, Header(description="the server's API key")] = None) -> None:
    if not settings.api_key:
        raise HTTPException(403, "writes are disabled on this server: start it with FASHIONBERT_API_KEY set to "
                                 "enable POST/DELETE /items and /admin/reload (then send the key as X-API-Key)")
    # Compared as bytes: headers arrive as latin-1, and a non-ASCII key is simply a wrong key.
    given = (x_api_key or "").encode("latin-1", "replace")
    if not x_api_key or not hmac.compare_digest(given, settings.api_key.encode("utf-8")):
        raise HTTPException(401, "this endpoint needs the server's API key in the X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StateDep = Annotated[State, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]
KeyDep = [Depends(require_api_key)]


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"
