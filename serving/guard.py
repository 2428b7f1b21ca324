"""The service's front door: an ASGI middleware that refuses what the API must never parse or queue.

Before BentoML reads a request body it checks, for POST requests to the service's APIs:
  - `Content-Type` is `application/json` (else 415: a form or pickle body is never parsed);
  - the body is at most `max_body_bytes` (413, from `Content-Length` or while reading a chunked
    body, so an over-size request never reaches the JSON parser or pydantic);
  - the worker is ready (503 + `Retry-After` while the engine loads, e.g. after a restart);
  - fewer than `max_concurrency` requests are in flight in this worker (503 + `Retry-After`:
    load shedding, so the requests it accepts keep a bounded latency).

Why not BentoML's `traffic.max_concurrency`: in BentoML 1.4 it answers 429 without a
`Retry-After` header and sits outside the service's middlewares, so it could not be combined
with the readiness and body checks here; the limit is split over workers the same way
(ceil(per service / workers)). It also serves `/docs.json` with the error responses declared.
Client mistakes are logged as one INFO line, never with a traceback; shed requests as one
WARNING line per 10 s with their count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

# Under "bentoml": in a worker BentoML configures (level, handlers) only that logger tree.
log = logging.getLogger("bentoml.recsys.guard")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyTooLarge(Exception):
    pass


async def _json(send: Send, status: int, body: dict, headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class Guard:
    """ASGI middleware (see the module docstring); one instance per worker process."""

    def __init__(self, app, api_paths: frozenset[str], max_body_bytes: int, max_concurrency: int,
                 retry_after_s: int, ready: Callable[[], bool],
                 openapi: Callable[[], dict] | None = None,
                 unlimited_paths: frozenset[str] = frozenset()) -> None:
        """`unlimited_paths` skip the concurrency limit (not the other checks): /embed when the
        service calls it itself through BentoML's batching, so an accepted /recommend is never
        refused its own model call."""
        self.app = app
        self.api_paths = api_paths
        self.max_body_bytes = max_body_bytes
        self.max_concurrency = max_concurrency  # 0: no limit
        self.retry_after = {"Retry-After": str(retry_after_s)}
        self.ready = ready
        self.openapi = openapi
        self.unlimited_paths = unlimited_paths
        self._spec: bytes | None = None
        self.in_flight = 0  # one event loop per worker: a plain counter is race-free
        self.shed = 0
        self._shed_logged = (time.monotonic(), 0)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, method = scope["path"], scope["method"]
        if path == "/docs.json" and method == "GET" and self.openapi is not None:
            return await self._docs(send)
        if method != "POST" or path not in self.api_paths:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        media = headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            log.info("415 %s: Content-Type %s", path, (media or "missing")[:40])
            return await _json(send, 415, {"error": f"Content-Type must be application/json, got "
                                                    f"{(media or 'none')[:40]!r}"})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(send, path, length[:20])
        if not self.ready():
            return await _json(send, 503, {"error": "not ready: the model is still loading"},
                               self.retry_after)
        limited = bool(self.max_concurrency) and path not in self.unlimited_paths
        if limited and self.in_flight >= self.max_concurrency:
            return await self._shed(send)
        self.in_flight += limited
        try:
            try:
                body = await self._read(receive)
            except BodyTooLarge:
                return await self._too_large(send, path, "chunked")
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.in_flight -= limited

    async def _read(self, receive: Receive) -> bytes:
        """The whole body, never more than max_body_bytes of it in memory."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _too_large(self, send: Send, path: str, length: str) -> None:
        log.info("413 %s: body of %s bytes, limit %d", path, length, self.max_body_bytes)
        await _json(send, 413, {"error": f"request body larger than {self.max_body_bytes} bytes "
                                         "(RECSYS_MAX_BODY_BYTES)"})

    async def _shed(self, send: Send) -> None:
        self.shed += 1
        since, count = self._shed_logged
        if time.monotonic() - since >= 10:
            log.warning("shed %d request(s) in %.0f s: more than %d in flight in this worker",
                        self.shed - count, time.monotonic() - since, self.max_concurrency)
            self._shed_logged = (time.monotonic(), self.shed)
        await _json(send, 503, {"error": f"overloaded: {self.max_concurrency} requests in flight; "
                                         "retry later"}, self.retry_after)

    async def _docs(self, send: Send) -> None:
        if self._spec is None:
            self._spec = json.dumps(self.openapi()).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self._spec)).encode())]})
        await send({"type": "http.response.body", "body": self._spec})


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive() that hands the buffered body to the app, then waits for the client as usual."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


class ClientErrorLogFilter(logging.Filter):
    """BentoML logs a request that fails validation as ERROR with a ~2 KB traceback; a client's
    mistake is one INFO line here (the error count and the first message, clipped)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        status = _client_status(exc)
        if status is None:
            return True  # a server fault keeps its ERROR and traceback
        where = record.getMessage().replace("Exception on ", "")
        record.msg, record.args = "%d %s: %s", (status, where, _summary(exc))
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return True


def _client_status(exc: BaseException) -> int | None:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return 400
    code = getattr(getattr(exc, "error_code", None), "value", None)
    return code if isinstance(code, int) and 400 <= code < 500 else None


def _summary(exc: BaseException) -> str:
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        first = exc.errors(include_input=False, include_context=False)[0]
        loc = ".".join(map(str, first.get("loc", ())))[:60]
        return f"{exc.error_count()} validation error(s); {loc}: {first['msg'][:120]}"
    return str(exc)[:160]
