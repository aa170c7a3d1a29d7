"""What the handlers get through FastAPI dependencies: settings, metrics, the serving state and
engine (all on `app.state`, set by create_app), and the API-key check."""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Header, HTTPException, Request

from ..engine import Engine
from ..metrics import Metrics
from ..settings import Settings
from ..state import State


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_state(request: Request) -> State:
    return request.app.state.serving


def get_engine(state: Annotated[State, Depends(get_state)]) -> Engine:
    if state.engine is None:
        raise HTTPException(503, "loading the model and index" if state.loading else
                            f"model and index failed to load: {state.load_error}", headers={"Retry-After": "5"})
    return state.engine


def require_api_key(settings: Annotated[Settings, Depends(get_settings)], x_api_key: str | None = Header(None)) -> None:
    if settings.api_key and not (x_api_key and hmac.compare_digest(x_api_key, settings.api_key)):
        raise HTTPException(401, "this endpoint needs the X-API-Key header")


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[Metrics, Depends(get_metrics)]
StateDep = Annotated[State, Depends(get_state)]
EngineDep = Annotated[Engine, Depends(get_engine)]


def image_url(item_id: str) -> str:
    return f"/items/{quote(item_id, safe='')}/image"
