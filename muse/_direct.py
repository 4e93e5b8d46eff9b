"""Plain scoring requests, answered straight off the connection.

hypercorn's HTTP/1.1 stack (h11, its protocol and stream objects, a task and
a dozen ASGI messages per request) was about half of a single-event
request's CPU.  Nearly all scoring traffic has one shape: ``POST /v1/score``
over HTTP/1.1 keep-alive, framed by one Content-Length, nothing unusual.
``DirectLane`` serves that shape itself, and hands the connection to
hypercorn, with every byte it has not consumed, at the first request of any
other shape: another method, path or version; chunked, doubled or malformed
framing; ``Expect``; a ``Connection`` header other than keep-alive; a head
that is not plain (folded lines, bytes outside a header's grammar) or longer
than ``MAX_HEAD``; a body over the route's limit.  Whatever the lane does
not fully understand is judged by hypercorn and the ASGI app, with all their
checks, as if the lane were not there.

What the lane keeps of the server's behaviour:

- timeouts: the first request head must be complete ``header_timeout``
  seconds after accept; later, a connection may idle ``keep_alive_timeout``
  seconds after its response, and a head must be complete
  ``header_timeout`` seconds after its first byte; a body must arrive within
  the route's body timeout (else 408 and the connection closes);
- a client that goes away while its request is scored has the request
  cancelled (the engine counts it as aborted), as hypercorn's reader would;
  ``HangupWatch`` notices with one epoll set for every connection, so that
  a request costs two system calls rather than a task of its own;
- a graceful stop closes idle connections at once and busy ones after their
  answer.

``parse_head`` is sans-io: bytes in, a decision out.
"""

from __future__ import annotations

import email.utils
import http
import logging
import math
import re
import select
import time
from dataclasses import dataclass

import trio

from muse._errors import BadRequest, InternalError, MuseError
from muse._http import (
    BodyTimeout,
    ScoreRoute,
    error_reply,
    single_header,
)
from muse._keys import Principal
from muse._wire import MSGPACK, media_type

__all__ = [
    "FALLBACK",
    "MAX_HEAD",
    "DirectLane",
    "Handover",
    "Hangup",
    "HangupWatch",
    "PlainHead",
    "parse_head",
]

log = logging.getLogger("muse.http")

# Longest head the lane reads.  A scoring request's head is a few hundred
# bytes; a longer one goes to hypercorn, which allows 64 KiB and answers 431
# past that.
MAX_HEAD = 8192
# Bytes asked of the socket per read; a 64-event body is about 20 kB.
_READ_SIZE = 65536

_REQUEST_LINE = b"POST /v1/score HTTP/1.1\r\n"
_END_OF_HEAD = b"\r\n\r\n"
# RFC 9110 token characters, and a field value without control characters
# (tab allowed); anything else in a head is for hypercorn to judge.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_DIGITS = re.compile(rb"[0-9]{1,18}")
# Headers that change how a request is framed or answered: the lane leaves
# requests carrying them to hypercorn.
_NOT_PLAIN = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te"})
_CLOSE = (b"connection", b"close")


class _Fallback:
    def __repr__(self) -> str:
        return "FALLBACK"


#: ``parse_head``'s answer for a request the lane leaves to hypercorn.
FALLBACK = _Fallback()


@dataclass(frozen=True, slots=True)
class PlainHead:
    """A plain scoring request's head.

    Attributes:
        length: bytes of the head, up to and including its blank line.
        body_length: the Content-Length.
        headers: lower-case name -> values, in order.
    """

    length: int
    body_length: int
    headers: dict[bytes, list[bytes]]


def parse_head(
    buffer: bytes | bytearray, body_limit: int
) -> PlainHead | _Fallback | None:
    """Read a request head at the start of ``buffer``.

    Returns:
        A ``PlainHead`` for a plain scoring request, ``None`` when more
        bytes are needed to tell, ``FALLBACK`` for anything else.
    """
    start = bytes(buffer[: len(_REQUEST_LINE)])
    if not _REQUEST_LINE.startswith(start):
        return FALLBACK
    end = buffer.find(_END_OF_HEAD, len(_REQUEST_LINE) - 2, MAX_HEAD)
    if end < 0:
        return FALLBACK if len(buffer) >= MAX_HEAD else None
    if end < len(_REQUEST_LINE):  # no header lines at all: no Host
        return FALLBACK
    headers: dict[bytes, list[bytes]] = {}
    for line in bytes(buffer[len(_REQUEST_LINE) : end]).split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            return FALLBACK  # folded lines, spaces before the colon, ...
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            return FALLBACK
        headers.setdefault(name.lower(), []).append(value)
    return _plain(headers, end + len(_END_OF_HEAD), body_limit)


def _plain(
    headers: dict[bytes, list[bytes]], length: int, body_limit: int
) -> PlainHead | _Fallback:
    if not _NOT_PLAIN.isdisjoint(headers):
        return FALLBACK
    if len(headers.get(b"host", ())) != 1:
        return FALLBACK  # h11 refuses HTTP/1.1 without exactly one Host
    connection = headers.get(b"connection")
    if connection is not None and (
        len(connection) != 1 or connection[0].lower() != b"keep-alive"
    ):
        return FALLBACK
    declared = headers.get(b"content-length")
    if declared is None or len(declared) != 1 or not _DIGITS.fullmatch(declared[0]):
        return FALLBACK
    body_length = int(declared[0])
    if body_length > body_limit:
        return FALLBACK  # the ASGI path answers 413 and drains
    return PlainHead(length, body_length, headers)


@dataclass(frozen=True, slots=True)
class Handover:
    """What hypercorn needs to go on with a connection the lane leaves.

    Attributes:
        data: bytes read and not consumed, to be parsed first.
        head_started: when the pending request head began (accept, or its
            first byte), or None when nothing of it has arrived.
    """

    data: bytes
    head_started: float | None


class Hangup:
    """One connection's state as the watch sees it.

    Attributes:
        request: the scope of the request in progress, if any.
        seen: the client has closed its side (or the connection failed).
    """

    __slots__ = ("request", "seen")

    def __init__(self) -> None:
        self.request: trio.CancelScope | None = None
        self.seen = False


class HangupWatch:
    """Cancels requests whose client has closed its connection.

    One epoll set holds the socket of every connection on the lane, added
    when the lane takes the connection and removed when it lets it go (two
    system calls a connection; a pair per request cost a tenth of a
    single-event request).  Sockets are registered edge-triggered for peer
    hang-up only (EPOLLRDHUP; errors and hang-ups are always reported), so
    bytes of a next, pipelined request do not count and a hang-up is
    reported once.  One task waits for the set itself to become readable.
    """

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._connections: dict[int, Hangup] = {}

    def open(self, fd: int) -> Hangup:
        """Watch a connection's socket from now on."""
        self._epoll.register(fd, select.EPOLLRDHUP | select.EPOLLET)
        hangup = self._connections[fd] = Hangup()
        return hangup

    def close(self, fd: int) -> None:
        """Stop watching (before the socket closes: its number is reused)."""
        if self._connections.pop(fd, None) is not None:
            self._epoll.unregister(fd)

    async def run(self) -> None:
        """Watch until cancelled, then release the epoll set."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self._epoll.fileno())
                for fd, _ in self._epoll.poll(0):
                    hangup = self._connections.get(fd)
                    if hangup is not None:
                        hangup.seen = True
                        if hangup.request is not None:
                            hangup.request.cancel()
        finally:
            self._epoll.close()


class _Closed(Exception):
    """The connection is over: closed, timed out or the server stopping."""


class DirectLane:
    """Serves plain scoring requests; hands everything else to hypercorn.

    Args:
        route: the scoring route (shared with the ASGI app).
        watch: the hang-up watch.
        keep_alive_timeout: idle seconds between requests.
        header_timeout: seconds for a request head (see the module).
    """

    def __init__(
        self,
        route: ScoreRoute,
        watch: HangupWatch,
        keep_alive_timeout: float,
        header_timeout: float,
    ) -> None:
        self._route = route
        self._watch = watch
        self._keep_alive_timeout = keep_alive_timeout
        self._header_timeout = header_timeout
        self._stopping = False
        # Reads waiting for a next request, cancelled when the server stops.
        self._idle: set[trio.CancelScope] = set()
        self._date = (0, b"")
        self._served = route.metrics.direct_lane.labels("requests")
        self._handed = route.metrics.direct_lane.labels("handovers")

    def stop(self) -> None:
        """Close idle connections now and busy ones after their answer."""
        self._stopping = True
        for scope in self._idle:
            scope.cancel()

    async def serve(self, stream: trio.SocketStream) -> Handover | None:
        """Serve plain requests on ``stream``.

        Returns:
            None when the connection is over (the caller closes it), or the
            ``Handover`` for hypercorn at the first request of another shape.
        """
        fd = stream.socket.fileno()
        hangup = self._watch.open(fd)
        try:
            return await self._serve(stream, hangup)
        finally:
            self._watch.close(fd)

    async def _serve(
        self, stream: trio.SocketStream, hangup: Hangup
    ) -> Handover | None:
        buffer = bytearray()
        now = trio.current_time()
        head_started: float | None = now
        idle_until = now + self._keep_alive_timeout
        limits = self._route.limits
        try:
            while not self._stopping:
                head = parse_head(buffer, limits.score_body)
                while head is None:
                    if head_started is None:
                        data = await self._read(stream, idle_until, idle=True)
                        head_started = trio.current_time()
                    else:
                        deadline = min(head_started + self._header_timeout, idle_until)
                        data = await self._read(stream, deadline, idle=not buffer)
                    buffer += data
                    head = parse_head(buffer, limits.score_body)
                if head is FALLBACK:
                    self._handed.inc()
                    return Handover(bytes(buffer), head_started)
                assert isinstance(head, PlainHead)
                end = head.length + head.body_length
                self._served.inc()
                kind, caller = self._caller(head.headers)
                if isinstance(caller, MuseError):
                    # Refused on its head: a caller without a valid key never
                    # makes the server wait for, or hold, its body.
                    whole = len(buffer) >= end
                    del buffer[: end if whole else len(buffer)]
                    if not await self._answer_error(
                        stream, caller, kind, close=not whole
                    ):
                        return None
                else:
                    if len(buffer) < end and not await self._read_body(
                        stream, buffer, end, kind
                    ):
                        return None
                    body = bytes(buffer[head.length : end])
                    del buffer[:end]
                    if not await self._answer(stream, hangup, caller, kind, body):
                        return None
                now = trio.current_time()
                idle_until = now + self._keep_alive_timeout
                head_started = now if buffer else None
        except _Closed:
            pass
        return None

    async def _read(
        self, stream: trio.SocketStream, deadline: float, *, idle: bool
    ) -> bytes:
        """Some bytes before ``deadline``; ``_Closed`` on EOF or time-out."""
        with trio.CancelScope(deadline=deadline) as scope:
            if idle:
                self._idle.add(scope)
                if self._stopping:
                    scope.cancel()
            try:
                data = await stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise _Closed() from None
            finally:
                self._idle.discard(scope)
            if not data:
                raise _Closed()
            return data
        if not math.isinf(deadline):
            log.debug("connection idle or request head incomplete: closing")
        raise _Closed()

    async def _read_body(
        self, stream: trio.SocketStream, buffer: bytearray, end: int, kind: str
    ) -> bool:
        """Read until ``buffer`` holds ``end`` bytes.

        Returns:
            False when the body did not come (the client stopped sending,
            or ended the connection early): it has been answered 408 or 400
            and the connection must close.
        """
        timeout = self._route.limits.score_body_timeout
        deadline = trio.current_time() + timeout
        while len(buffer) < end:
            try:
                buffer += await self._read(stream, deadline, idle=False)
            except _Closed:
                if trio.current_time() >= deadline:
                    problem: MuseError = BodyTimeout(
                        f"body did not arrive within {timeout:g} s"
                    )
                else:
                    problem = BadRequest(
                        "the connection ended before the body's Content-Length"
                    )
                await self._answer_error(stream, problem, kind, close=True)
                return False
        return True

    def _caller(
        self, headers: dict[bytes, list[bytes]]
    ) -> tuple[str, Principal | MuseError]:
        """The body's media type and the caller, or why it is refused."""
        kind = MSGPACK
        try:
            kind = media_type(single_header(headers, b"content-type"))
            authorization = single_header(headers, b"authorization")
            return kind, self._route.engine.authenticate(authorization)
        except MuseError as exc:
            return kind, exc

    async def _answer_error(
        self, stream: trio.SocketStream, exc: MuseError, kind: str, *, close: bool
    ) -> bool:
        """Answer a request with ``exc``; False when the connection must
        close (``close``: its body was not read whole, or the answer says
        so)."""
        started = time.perf_counter()
        status, payload, kind, extra = _error_outcome(exc, kind)
        if close and _CLOSE not in extra:
            extra.append(_CLOSE)
        try:
            await stream.send_all(self._response(status, kind, payload, extra))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            self._route.metrics.observe(
                "/v1/score", status, time.perf_counter() - started
            )
        return _CLOSE not in extra

    async def _answer(
        self,
        stream: trio.SocketStream,
        hangup: Hangup,
        principal: Principal,
        kind: str,
        body: bytes,
    ) -> bool:
        """Score one request and send its answer; False when the connection
        must close (the client left, or the answer says so)."""
        route = self._route
        started = time.perf_counter()
        status = 499  # unless answered: the client went away
        try:
            with trio.CancelScope() as request:
                if hangup.seen:  # the client left before we got here
                    request.cancel()
                hangup.request = request
                try:
                    status, payload, kind, extra = await self._outcome(
                        principal, kind, body
                    )
                finally:
                    hangup.request = None
                await stream.send_all(self._response(status, kind, payload, extra))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        finally:
            route.metrics.observe("/v1/score", status, time.perf_counter() - started)
        if request.cancelled_caught:
            log.debug("client went away; request cancelled")
            return False
        return _CLOSE not in extra

    async def _outcome(
        self, principal: Principal, kind: str, body: bytes
    ) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
        route = self._route
        admission = route.admission
        if not admission.enter():
            return _error_outcome(route.overloaded(), kind)
        try:
            return 200, await route.answer(principal, kind, body), kind, []
        except MuseError as exc:
            return _error_outcome(exc, kind)
        except Exception:
            log.exception("unexpected error scoring a request")
            return _error_outcome(
                InternalError("internal error; see the server log"), kind
            )
        finally:
            admission.leave()

    def _response(
        self,
        status: int,
        kind: str,
        payload: bytes,
        extra: list[tuple[bytes, bytes]],
    ) -> bytes:
        head = [
            b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"")),
            b"content-type: %s\r\ncontent-length: %d\r\ndate: %s\r\n"
            % (kind.encode(), len(payload), self._http_date()),
        ]
        for name, value in extra:
            head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        head.append(payload)
        return b"".join(head)

    def _http_date(self) -> bytes:
        second = int(time.time())
        if second != self._date[0]:
            text = email.utils.formatdate(second, usegmt=True).encode()
            self._date = (second, text)
        return self._date[1]


def _error_outcome(
    exc: MuseError, kind: str
) -> tuple[int, bytes, str, list[tuple[bytes, bytes]]]:
    payload, extra = error_reply(exc, kind)
    return exc.status, payload, kind, extra


_REASONS: dict[int, bytes] = {
    status.value: status.phrase.encode() for status in http.HTTPStatus
}
