"""What every request passes before a handler sees it, as plain ASGI (service/app.py installs it):

- the Host allow-list (a DNS-rebinding page cannot reach a loopback server under its own name);
- state-changing methods need `Content-Type: application/json`, so a cross-site "simple" request
  (text/plain, a form, no body) from any web page is refused before it does anything;
- the body limit, counted on the bytes received, so a chunked body without Content-Length is
  bounded too;

and `JSONRoute`, which parses JSON bodies in a worker thread (a 12 MB body would otherwise hold
the event loop, and /healthz with it), refusing non-finite numbers and unpaired surrogates.
"""

from __future__ import annotations

import asyncio
import json
import math

from fastapi.routing import APIRoute
from starlette.datastructures import Headers

from .errors import BadInput, error
from .metrics import Metrics, endpoint_label
from .settings import Settings

WRITES = {"POST", "PUT", "PATCH"}


class Gate:
    def __init__(self, app, settings: Settings, metrics: Metrics):
        self.app, self.settings, self.metrics = app, settings, metrics
        self.hosts = settings.hosts()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self._refuse(scope, headers)
        if refusal is None and scope["method"] in WRITES | {"DELETE"}:
            body, refusal = await self._read_body(receive, headers)
            if refusal is None:
                receive = _replay(body, receive)
        if refusal is not None:
            self.metrics.requests.labels(endpoint_label(scope["path"]), scope["method"], str(refusal.status_code)).inc()
            return await refusal(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refuse(self, scope, headers: Headers):
        if self.hosts is not None:
            host = _host_name(headers.get("host", ""))
            if host not in self.hosts:
                return error(400, f"this server does not serve the host {host[:100]!r} "
                                  "(FASHIONBERT_ALLOWED_HOSTS lists the ones it does)")
        if scope["method"] in WRITES:
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                return error(415, "send the body as JSON, with the header Content-Type: application/json")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.settings.max_body_bytes):
            return self._too_big()
        return None

    async def _read_body(self, receive, headers: Headers):
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", error(400, "the client went away before sending the whole body")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.settings.max_body_bytes:
                return b"", self._too_big()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None

    def _too_big(self):
        return error(413, f"request body over the {self.settings.max_body_bytes:,}-byte limit")


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8000
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _replay(body: bytes, receive):
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: the disconnect, when it comes

    return replay


class JSONRoute(APIRoute):
    """An APIRoute whose JSON body is parsed in a worker thread (FastAPI then uses the parsed value)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request):
            if request.method in WRITES:
                body = await request.body()
                if body:
                    request._json = await asyncio.to_thread(parse_json, body)
            return await handler(request)

        return route


def parse_json(body: bytes):
    try:
        value = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except json.JSONDecodeError as exc:
        raise BadInput(f"the body is not valid JSON: {exc.msg} (at character {exc.pos})") from None
    except UnicodeDecodeError:
        raise BadInput("the body is not UTF-8 text") from None
    except ValueError as exc:  # a non-finite number, or an integer of thousands of digits
        raise BadInput(f"the body is not usable JSON: {exc}") from None
    _check_strings(value)
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number this API accepts (only finite numbers)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is out of the range of a number (only finite numbers)")
    return value


def _check_strings(value) -> None:
    """Unpaired surrogates (\\ud800) are valid JSON escapes but not text: refuse them here, once."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise BadInput("the body has a string with an unpaired surrogate (e.g. \\ud800): not valid text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
