"""The ASGI application: a lean scoring path in front of the admin app.

``POST /v1/score`` is the one path on which every microsecond is paid per
event, so it is served by a plain ASGI callable: read the body under its
limit, decode, call the engine, encode.  Everything else (the admin API,
listings) goes to a quart-trio app built in ``_admin_http``, behind the same
body limit.  ``/healthz``, ``/readyz`` and ``/metrics`` are answered here too.

Errors never escape as a 500 for anything a client sent: every ``MuseError``
becomes its status and a ``{"error", "detail"}`` body in the request's own
media type; anything else is our bug, logged, and answered 500.

Bodies are counted as they arrive, chunked or not, and refused at the first
byte over the route's limit (or at once, from a declared Content-Length).  A
request framed both by Content-Length and Transfer-Encoding is refused and
its connection closed, so no byte after it can be read as another request.
An answer given before the body was read to its end is sent while the rest
of the body is read and dropped: hypercorn queues at most ten unread chunks
and then blocks its reader, which would wedge the connection, and leak its
descriptor, once the answer tries to queue ``http.disconnect`` behind them.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from muse._admin_http import build_admin_app
from muse._errors import (
    BadRequest,
    ClientError,
    InternalError,
    MuseError,
    Overloaded,
    PayloadTooLarge,
    TooManyRequests,
)
from muse._metrics import CONTENT_TYPE as METRICS_TYPE
from muse._metrics import Metrics
from muse._events import read_score_call
from muse._keys import Principal
from muse._wire import JSON, MSGPACK, encode_body, media_type

__all__ = [
    "build_app",
    "BodyTimeout",
    "error_reply",
    "reply_kind",
    "single_header",
    "HttpApp",
    "HttpLimits",
    "ScoreRoute",
]

log = logging.getLogger("muse.http")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class HttpLimits:
    """Body limits by route: bytes, and seconds for the body to arrive.

    Args:
        score_body: most bytes in a ``/v1/score`` body.  4096 events of 15
            features is about 1.3 MB in msgpack.
        admin_body: most bytes in an admin body (model uploads).
        score_body_timeout: seconds a ``/v1/score`` body may take to arrive,
            from the first read; 4 MB in 10 s is 400 kB/s.
        admin_body_timeout: the same for admin bodies; uploads are large.
    """

    def __init__(
        self,
        score_body: int = 4 << 20,
        admin_body: int = 256 << 20,
        score_body_timeout: float = 10.0,
        admin_body_timeout: float = 300.0,
    ) -> None:
        self.score_body = score_body
        self.admin_body = admin_body
        self.score_body_timeout = score_body_timeout
        self.admin_body_timeout = admin_body_timeout


class _ClientGone(Exception):
    """The client disconnected before its body arrived."""


class BodyTimeout(ClientError):
    """The body did not arrive in time.

    Kept here rather than in ``_errors``: only the HTTP layer reads bodies.
    """

    status = 408
    code = "request_timeout"


class _Framing(BadRequest):
    """The request's framing is ambiguous; its connection must close."""


# Answers after which the connection must not carry another request.
_CLOSE = [(b"connection", b"close")]


def build_app(
    engine: Any,
    limits: HttpLimits | None = None,
    *,
    max_score_requests: int = 256,
) -> HttpApp:
    """The ASGI callable serving ``engine``.

    Args:
        engine: a running engine (from ``open_engine``).
        limits: body limits; defaults as in ``HttpLimits``.
        max_score_requests: scoring requests admitted at once (reading,
            decoding or waiting on the engine); more are answered 503 at
            once.  The engine sheds load when its queue fills, but decoding
            happens before that queue, on the event loop: with small models
            decoding is the bottleneck, and without this cap excess requests
            would wait, ever longer, instead of being turned away.
    """
    limits = limits or HttpLimits()
    metrics = Metrics(engine)
    route = ScoreRoute(engine, limits, metrics, max_score_requests)
    return HttpApp(route, build_admin_app(engine, limits.admin_body))


class HttpApp:
    """The ASGI app; ``score_route`` is also served by the direct lane."""

    def __init__(self, score_route: ScoreRoute, admin: Any) -> None:
        self.score_route = score_route
        self.metrics = score_route.metrics
        self._admin = admin

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await _lifespan(receive, send)
            return
        if kind != "http":
            return
        route = self.score_route
        path = scope["path"]
        started = time.perf_counter()
        status = 499  # unless an answer is given: the client went away
        try:
            headers = _headers(scope)
            problem = _framing_problem(headers)
            if problem is not None:
                status = await _refuse(problem, headers, receive, send, route.limits)
            elif path == "/v1/score":
                status = await _score(route, scope, headers, receive, send)
            elif path in _PROBES:
                if _has_body(headers):
                    send = _draining(send, receive)
                status = await _PROBES[path](route.engine, self.metrics, scope, send)
            else:
                path = "admin"
                status = await _admin(
                    self._admin, scope, headers, receive, send, route.limits
                )
        finally:
            self.metrics.observe(
                path if path in _ROUTES else "other",
                status,
                time.perf_counter() - started,
            )


_ROUTES = frozenset({"/v1/score", "/healthz", "/readyz", "/metrics", "admin"})


class _Admission:
    """Counts scoring requests in progress against a cap."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_progress = 0
        self.refused = 0

    def enter(self) -> bool:
        if self.in_progress >= self.capacity:
            self.refused += 1
            return False
        self.in_progress += 1
        return True

    def leave(self) -> None:
        self.in_progress -= 1


class ScoreRoute:
    """``POST /v1/score`` apart from how its bytes travel.

    The admission cap, decoding, the engine call and the answer's encoding,
    shared by the ASGI app and the direct lane (``_direct``).
    """

    def __init__(
        self,
        engine: Any,
        limits: HttpLimits,
        metrics: Metrics,
        max_score_requests: int,
    ) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.admission = _Admission(max_score_requests)

    def overloaded(self) -> Overloaded:
        return Overloaded(
            f"{self.admission.capacity} scoring requests are in progress; retry shortly"
        )

    async def answer(self, principal: Principal, kind: str, body: bytes) -> bytes:
        """The encoded 200 body for a request's body.

        Raises:
            MuseError: whatever makes the request unanswerable.
        """
        engine = self.engine
        call = read_score_call(body, kind, max_events=engine.options.max_events)
        results = await engine.score_events(
            principal.tenant, call.intent, call.events, deadline_ms=call.deadline_ms
        )
        return encode_body({"results": results}, kind)


async def _score(
    route: ScoreRoute,
    scope: Scope,
    headers: dict[bytes, list[bytes]],
    receive: Receive,
    send: Send,
) -> int:
    admission = route.admission
    if not admission.enter():
        return await _error(send, route.overloaded(), reply_kind(headers), receive)
    try:
        return await _score_admitted(route, scope, headers, receive, send)
    finally:
        admission.leave()


async def _score_admitted(
    route: ScoreRoute,
    scope: Scope,
    headers: dict[bytes, list[bytes]],
    receive: Receive,
    send: Send,
) -> int:
    kind = MSGPACK
    # Until the body is read to its end, an answer must drain the rest.
    unread: Receive | None = receive
    try:
        if scope["method"] != "POST":
            return await _respond(
                send,
                405,
                {"error": "method_not_allowed", "detail": "use POST /v1/score"},
                kind,
                drain=unread,
            )
        kind = media_type(single_header(headers, b"content-type"))
        principal = route.engine.authenticate(single_header(headers, b"authorization"))
        limits = route.limits
        _check_declared_length(headers, limits.score_body)
        body = await _read_body(receive, limits.score_body, limits.score_body_timeout)
        unread = None
        payload = await route.answer(principal, kind, body)
    except _ClientGone:
        return 499
    except MuseError as exc:
        return await _error(send, exc, kind, unread)
    except Exception:
        log.exception("unexpected error scoring a request")
        return await _error(
            send, InternalError("internal error; see the server log"), kind, unread
        )
    return await _send(send, 200, payload, kind)


async def _admin(
    admin: Any,
    scope: Scope,
    headers: dict[bytes, list[bytes]],
    receive: Receive,
    send: Send,
    limits: HttpLimits,
) -> int:
    status = 500
    started = False
    try:
        _check_declared_length(headers, limits.admin_body)
    except MuseError as exc:
        return await _error(send, exc, reply_kind(headers), receive)
    body = _LimitedBody(receive, limits.admin_body, limits.admin_body_timeout)

    async def tracking_send(message: dict[str, Any]) -> None:
        nonlocal status, started
        if message["type"] == "http.response.start":
            status = message["status"]
            started = True
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            # Inside this send hypercorn queues http.disconnect and then
            # restarts the connection's keep-alive timer; quart cancels its
            # request on that disconnect, which would cut the restart short
            # and leave the connection with no idle timeout at all.
            with trio.CancelScope(shield=True):
                await send(message)
            return
        await send(message)

    await admin(scope, body.receive, tracking_send)
    if body.problem is not None and not started:
        # quart saw a disconnect and stopped; the answer is ours to give.
        return await _error(send, body.problem, reply_kind(headers), receive)
    return status


class _LimitedBody:
    """``receive`` for the admin app, refusing a body over its limits.

    Raising inside quart's message task would reach us wrapped in an
    exception group and end as a 500, so a body over the limit, or one that
    takes too long, is reported to quart as a disconnect (it then stops the
    request) and kept in ``problem`` for the caller to answer.

    Args:
        receive: the server's ``receive``.
        limit: most bytes in the body.
        timeout: seconds for the whole body, from the first read.
    """

    def __init__(self, receive: Receive, limit: int, timeout: float) -> None:
        self._receive = receive
        self._limit = limit
        self._timeout = timeout
        self._seen = 0
        self._deadline: float | None = None
        self._complete = False
        self.problem: ClientError | None = None

    async def receive(self) -> dict[str, Any]:
        if self._complete or self.problem is not None:
            # quart keeps listening for a disconnect once the body is in.
            return await self._receive()
        if self._deadline is None:
            self._deadline = trio.current_time() + self._timeout
        with trio.move_on_at(self._deadline):
            message = await self._receive()
            if message["type"] == "http.request":
                self._seen += len(message.get("body", b""))
                if self._seen > self._limit:
                    self.problem = PayloadTooLarge(
                        f"body is over the limit of {self._limit} bytes"
                    )
                    return {"type": "http.disconnect"}
                self._complete = not message.get("more_body", False)
            return message
        self.problem = BodyTimeout(f"body did not arrive within {self._timeout:g} s")
        return {"type": "http.disconnect"}


async def _read_body(receive: Receive, limit: int, timeout: float) -> bytes:
    chunks = []
    size = 0
    with trio.move_on_after(timeout):
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
    raise BodyTimeout(f"body did not arrive within {timeout:g} s ({size} bytes came)")


def _framing_problem(headers: dict[bytes, list[bytes]]) -> MuseError | None:
    """Why a request cannot be read safely, or None.

    h11 frames a request that has both Content-Length and Transfer-Encoding
    by the latter, as RFC 9112 allows, but the RFC also asks the server to
    close the connection afterwards: two parties in a chain that disagree on
    where the body ends is how requests are smuggled.  A second, different
    Content-Type would let the body be decoded as either.
    """
    if b"transfer-encoding" in headers and b"content-length" in headers:
        return _Framing(
            "both Content-Length and Transfer-Encoding are present; send exactly one"
        )
    types = headers.get(b"content-type")
    if types is not None and len(types) > 1 and len(set(types)) > 1:
        return BadRequest("conflicting content-type headers")
    return None


async def _refuse(
    problem: MuseError,
    headers: dict[bytes, list[bytes]],
    receive: Receive,
    send: Send,
    limits: HttpLimits,
) -> int:
    """Answer a request whose framing is at fault."""
    if isinstance(problem, _Framing):
        # Answering "Connection: close" while the body is still being parsed
        # would let hypercorn find the bytes after it, call them a protocol
        # error and cut our answer short; read the body (as framed by h11)
        # first, up to the scoring limit.
        with contextlib.suppress(MuseError, _ClientGone):
            await _read_body(receive, limits.score_body, limits.score_body_timeout)
    return await _error(send, problem, reply_kind(headers), receive)


def _has_body(headers: dict[bytes, list[bytes]]) -> bool:
    if b"transfer-encoding" in headers:
        return True
    return headers.get(b"content-length", [b"0"])[0].strip() not in (b"0", b"")


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


def single_header(headers: dict[bytes, list[bytes]], name: bytes) -> str | None:
    values = headers.get(name)
    if not values:
        return None
    if len(values) > 1 and len(set(values)) > 1:
        raise BadRequest(f"conflicting {name.decode()} headers")
    return values[0].decode("latin-1")


def error_reply(exc: MuseError, kind: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """An error's encoded body and the headers it carries besides type and
    length; a server-side fault is logged."""
    extra: list[tuple[bytes, bytes]] = []
    if isinstance(exc, (Overloaded, TooManyRequests)):
        extra.append((b"retry-after", str(max(1, round(exc.retry_after))).encode()))
    elif isinstance(exc, (_Framing, BodyTimeout)):
        extra.extend(_CLOSE)
    if exc.status >= 500 and not isinstance(exc, Overloaded) and exc.status != 504:
        log.warning("answering %d: %s", exc.status, exc.detail)
    return encode_body(exc.to_body(), kind), extra


async def _error(
    send: Send, exc: MuseError, kind: str, drain: Receive | None = None
) -> int:
    """Answer ``exc``; ``drain`` is ``receive`` when the body is not all read."""
    payload, extra = error_reply(exc, kind)
    return await _send(send, exc.status, payload, kind, extra, drain)


async def _respond(
    send: Send,
    status: int,
    body: Any,
    kind: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    drain: Receive | None = None,
) -> int:
    return await _send(send, status, encode_body(body, kind), kind, extra, drain)


async def _send(
    send: Send,
    status: int,
    payload: bytes,
    kind: str,
    extra: list[tuple[bytes, bytes]] | None = None,
    drain: Receive | None = None,
) -> int:
    headers = [
        (b"content-type", kind.encode()),
        (b"content-length", str(len(payload)).encode()),
    ]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    message = {"type": "http.response.body", "body": payload}
    if drain is None:
        await send(message)
    else:
        await _send_draining(send, message, drain)
    return status


def _draining(send: Send, receive: Receive) -> Send:
    """``send`` for a handler that answers without reading the body."""

    async def draining_send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and not message.get("more_body"):
            await _send_draining(send, message, receive)
        else:
            await send(message)

    return draining_send


async def _send_draining(send: Send, message: dict[str, Any], receive: Receive) -> None:
    # By the time the last send returns, hypercorn has queued http.disconnect
    # for us, so nothing can block on the queue any more.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_discard_body, receive)
        await send(message)
        nursery.cancel_scope.cancel()


async def _discard_body(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body"):
            return


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


def reply_kind(headers: dict[bytes, list[bytes]]) -> str:
    # As the admin app chooses: JSON for JSON bodies or JSON-only clients.
    content_type = headers.get(b"content-type", [b""])[0].lower()
    accept = headers.get(b"accept", [b""])[0]
    if b"json" in content_type or (b"json" in accept and b"msgpack" not in accept):
        return JSON
    return MSGPACK


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
