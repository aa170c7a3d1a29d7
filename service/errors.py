"""One error body everywhere, {"detail": str, "errors": [...]?}, declared in the OpenAPI, and the
handlers that turn every failure into it."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from ..index.milvus import MilvusError


class BadInput(ValueError):
    """A request's content is unusable (the message says why); answered with 422."""


class Busy(Exception):
    """Over capacity: answered 503 with Retry-After."""

    def __init__(self, detail: str, retry_after_s: int):
        super().__init__(detail)
        self.retry_after_s = retry_after_s


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, in a sentence")
    errors: list[FieldError] | None = Field(None, description="validation errors, one per field (422 only)")


_WHY = {400: "bad request (e.g. a Host this server does not serve)", 401: "the X-API-Key header is missing or wrong",
        403: "writes are disabled (no API key configured)", 404: "no such item", 409: "conflict with the index's state",
        413: "request body over the limit", 415: "the body must be application/json",
        422: "the request's content is invalid", 503: "busy or not ready: retry after Retry-After seconds"}
ERROR_RESPONSES = {code: {"model": ErrorBody, "description": why} for code, why in _WHY.items()}


def error(status: int, detail: str, headers: dict | None = None, errors: list | None = None) -> JSONResponse:
    body = {"detail": detail} if errors is None else {"detail": detail, "errors": errors}
    return JSONResponse(body, status, headers=headers)


async def invalid(request: Request, exc: RequestValidationError):
    errors = [{"loc": [p if isinstance(p, int) else str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
               "type": str(e.get("type", ""))} for e in exc.errors()]
    summary = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in errors)
    return error(422, summary or "invalid request", errors=errors)


async def bad_input(request: Request, exc: BadInput):
    return error(422, str(exc))


async def busy(request: Request, exc: Busy):
    request.app.state.metrics.rejected.labels("capacity").inc()
    return error(503, str(exc), {"Retry-After": str(exc.retry_after_s)})


async def http_error(request: Request, exc: HTTPException):
    return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


async def recall_down(request: Request, exc: MilvusError):
    return error(503, f"the recall backend is unavailable: {exc}", {"Retry-After": "5"})


HANDLERS = {RequestValidationError: invalid, BadInput: bad_input, Busy: busy, HTTPException: http_error,
            MilvusError: recall_down}
