"""The ASGI application: a lean scoring path in front of the admin app.

``POST /v1/score`` is the one path on which every microsecond is paid per
event, so it is served by a plain ASGI callable: read the body under its
limit, decode, call the engine, encode.  Everything else (the admin API,
listings) goes to a quart-trio app built in ``_admin_http``, behind the same
body limit.  ``/healthz``, ``/readyz`` and ``/metrics`` are answered here too.

Errors never escape as a 500 for anything a client sent: every ``MuseError``
becomes its status and a ``{"error", "detail"}`` body in the request's own
media type; anything else is our bug, logged, and answered 500.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any


from muse._admin_http import build_admin_app
from muse._errors import (
    BadRequest,
    InternalError,
    MuseError,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
)
from muse._metrics import CONTENT_TYPE as METRICS_TYPE
from muse._metrics import Metrics
from muse._wire import (
    MSGPACK,
    decode_body,
    encode_body,
    media_type,
    parse_score_request,
)

__all__ = ["build_app", "HttpLimits"]

log = logging.getLogger("muse.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpLimits:
    """Body limits by route, in bytes.

    Args:
        score_body: most bytes in a ``/v1/score`` body.  4096 events of 15
            features is about 1.3 MB in msgpack.
        admin_body: most bytes in an admin body (model uploads).
    """

    def __init__(self, score_body: int = 4 << 20, admin_body: int = 256 << 20) -> None:
        self.score_body = score_body
        self.admin_body = admin_body


class _ClientGone(Exception):
    """The client disconnected before its body arrived."""


def build_app(engine: Any, limits: HttpLimits | None = None) -> Callable[..., Any]:
    """The ASGI callable serving ``engine``.

    Args:
        engine: a running engine (from ``open_engine``).
        limits: body limits; defaults as in ``HttpLimits``.
    """
    limits = limits or HttpLimits()
    metrics = Metrics(engine)
    admin = build_admin_app(engine, limits.admin_body)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            path = scope["path"]
            started = time.perf_counter()
            if path == "/v1/score":
                status = await _score(engine, scope, receive, send, limits.score_body)
            elif path in _PROBES:
                status = await _PROBES[path](engine, metrics, scope, send)
            else:
                limit = limits.admin_body
                status = await _admin(
                    admin, scope, _limited(receive, limit), send, limit
                )
                path = "admin"
            metrics.observe(
                path if path in _ROUTES else "other",
                status,
                time.perf_counter() - started,
            )
        elif kind == "lifespan":
            await _lifespan(receive, send)

    app.metrics = metrics  # type: ignore[attr-defined]
    return app


_ROUTES = frozenset({"/v1/score", "/healthz", "/readyz", "/metrics", "admin"})


async def _score(
    engine: Any, scope: Scope, receive: Receive, send: Send, limit: int
) -> int:
    headers = _headers(scope)
    kind = MSGPACK
    try:
        if scope["method"] != "POST":
            return await _respond(
                send,
                405,
                {"error": "method_not_allowed", "detail": "use POST /v1/score"},
                kind,
            )
        kind = media_type(_single(headers, b"content-type"))
        principal = engine.authenticate(_single(headers, b"authorization"))
        _check_declared_length(headers, limit)
        body = await _read_body(receive, limit)
        request = parse_score_request(
            decode_body(body, kind), max_events=engine.options.max_events
        )
        results = await engine.score(
            principal.tenant,
            request.intent,
            request.events,
            deadline_ms=request.deadline_ms,
        )
    except _ClientGone:
        return 499
    except MuseError as exc:
        return await _error(send, exc, kind)
    except Exception:
        log.exception("unexpected error scoring a request")
        return await _error(
            send, InternalError("internal error; see the server log"), kind
        )
    return await _respond(send, 200, {"results": results}, kind)


async def _admin(
    admin: Any, scope: Scope, receive: Receive, send: Send, limit: int
) -> int:
    status = 500
    started = False

    async def tracking_send(message: dict[str, Any]) -> None:
        nonlocal status, started
        if message["type"] == "http.response.start":
            status = message["status"]
            started = True
        await send(message)

    try:
        _check_declared_length(_headers(scope), limit)
        await admin(scope, receive, tracking_send)
    except MuseError as exc:
        if not started:
            return await _error(send, exc, MSGPACK)
    return status


def _limited(receive: Receive, limit: int) -> Receive:
    """Wrap ``receive`` so a body over ``limit`` fails as its bytes arrive."""
    seen = 0

    async def limited() -> dict[str, Any]:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        return message

    return limited


async def _read_body(receive: Receive, limit: int) -> bytes:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _check_declared_length(headers: dict[bytes, list[bytes]], limit: int) -> None:
    # Refusing on the declared length answers before reading (and before
    # any 100 Continue), so an oversized upload costs the server nothing.
    declared = headers.get(b"content-length")
    if declared:
        try:
            length = int(declared[0])
        except ValueError:
            raise BadRequest("Content-Length is not a number") from None
        if length > limit:
            raise PayloadTooLarge(
                f"body of {length} bytes is over the limit of {limit} bytes"
            )


def _headers(scope: Scope) -> dict[bytes, list[bytes]]:
    found: dict[bytes, list[bytes]] = {}
    for name, value in scope["headers"]:
        found.setdefault(name.lower(), []).append(value)
    return found


def _single(headers: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1 and len(set(values)) > 1:
        raise BadRequest(f"conflicting {name.decode()} headers")
    return values[0].decode("latin-1")


async def _error(send: Send, exc: MuseError, kind: str) -> int:
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(exc, (Overloaded, TooManyRequests)):
        extra.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    if exc.status >= 500 and not isinstance(exc, (Overloaded,)) and exc.status != 504:
        log.warning("answering %d: %s", exc.status, exc.detail)
    return await _respond(send, exc.status, exc.to_body(), kind, extra)


async def _respond(
    send: Send,
    status: int,
    body: Any,
    kind: str,
    extra: list[tuple[bytes, bytes]] | None = None,
) -> int:
    payload = encode_body(body, kind)
    headers = [
        (b"content-type", kind.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return status


async def _healthz(engine: Any, metrics: Metrics, scope: Scope, send: Send) -> int:
    return await _respond(send, 200, {"status": "ok"}, _accept(scope))


async def _readyz(engine: Any, metrics: Metrics, scope: Scope, send: Send) -> int:
    missing = engine.ready()
    if missing:
        return await _respond(
            send, 503, {"status": "not_ready", "missing": missing}, _accept(scope)
        )
    return await _respond(send, 200, {"status": "ready"}, _accept(scope))


async def _metrics(engine: Any, metrics: Metrics, scope: Scope, send: Send) -> int:
    # Rendered on the trio thread: the collector reads actor state that only
    # this thread mutates.
    payload = metrics.render()
    headers = [
        (b"content-type", METRICS_TYPE.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
    return 200


def _accept(scope: Scope) -> str:
    accept = _headers(scope).get(b"accept", [b""])[0]
    return "application/json" if b"json" in accept else MSGPACK


_PROBES = {"/healthz": _healthz, "/readyz": _readyz, "/metrics": _metrics}


async def _lifespan(receive: Receive, send: Send) -> None:
    # The engine is opened and closed by whoever runs the server, around the
    # ASGI app, so lifespan events only need acknowledging.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
