"""Run the engine behind hypercorn's HTTP/1.1 protocol, in one trio run.

``serve`` opens the engine, binds the listening socket itself (so it can
report the real port when asked for port 0), accepts connections itself and
hands each one to hypercorn's per-connection server.  SIGTERM and SIGINT
start a graceful stop: the listening socket closes, idle connections close,
in-flight requests are answered, then the engine drains its queues and
persists its calibration samples.

Why we accept connections ourselves rather than calling
``hypercorn.trio.serve``: hypercorn 0.18 has no connection limit, a
``read_timeout`` that restarts with every byte (so a client sending one byte
every few seconds never times out) yet also fires while a request is being
computed, and it sends ``100 Continue`` before the application has seen the
request.  Each connection's stream is therefore wrapped in a
``_GuardedStream`` that

- enforces the header timeout: from accept, and from the first byte of each
  later request, the request head must be complete within
  ``header_timeout`` seconds (idle keep-alive time before that first byte is
  hypercorn's ``keep_alive_timeout``);
- holds hypercorn's ``100 Continue`` until the application first asks for
  the body, and drops it when the application answers first (413, 401 ...);
- cancels the request in progress when the client goes away (EOF or reset),
  so its remaining work is not done for nobody.

The connection count is capped with a semaphore around ``accept``: past the
cap, connections wait in the kernel's backlog instead of costing a file
descriptor each.  This leans on hypercorn's per-connection ``TCPServer`` and
``WorkerContext``, which are not public API; hypercorn is pinned in
pyproject.toml for that reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import resource
import select
import signal
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState

from muse._atomic import write_bytes_atomic
from muse._direct import DirectLane, HangupWatch, Handover
from muse._engine import open_engine
from muse._http import HttpApp, HttpLimits, build_app

__all__ = ["ServerOptions", "serve", "bind_socket"]

log = logging.getLogger("muse.server")

# File descriptors kept free for everything that is not a client connection
# (registry files, compiled model libraries, worker threads, logs) when the
# connection cap is derived from RLIMIT_NOFILE.
RESERVED_FDS = 256
# accept() errors that mean "out of descriptors or memory right now": wait and
# retry, as trio.serve_listeners does, rather than stop serving.
_ACCEPT_CAPACITY_ERRNOS = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
_ACCEPT_RETRY_PAUSE = 0.1
# hypercorn writes an interim response as one chunk starting with this.
_CONTINUE = b"HTTP/1.1 100 "

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(frozen=True)
class ServerOptions:
    """HTTP-level settings, resolved once at start-up.

    Attributes:
        bind: ``host:port``; port 0 picks a free one.
        keep_alive_timeout: idle seconds a connection may wait, after accept
            or after its previous response, for its next request to arrive.
        header_timeout: seconds a request head may take, counted from accept
            and from the first byte of each later request.
        graceful_timeout: seconds in-flight requests get at shutdown.
        max_requests_per_connection: hypercorn's keep-alive cap; high, because
            reconnecting costs more than the request it interrupts.
        backlog: listen backlog.
        max_connections: connections served at once; None derives it from
            the process's file-descriptor limit.
        max_score_requests: scoring requests admitted at once; more are
            answered 503 with Retry-After (see ``build_app``).
        limits: body limits by route.
        direct_lane: serve plain scoring requests without hypercorn's
            protocol stack (``_direct``); off, every request goes through
            hypercorn, which the bench uses as a baseline.
    """

    bind: str = "127.0.0.1:8000"
    keep_alive_timeout: float = 30.0
    header_timeout: float = 10.0
    graceful_timeout: float = 10.0
    max_requests_per_connection: int = 1_000_000
    backlog: int = 1024
    max_connections: int | None = None
    max_score_requests: int = 256
    limits: HttpLimits = field(default_factory=HttpLimits)
    direct_lane: bool = True


def bind_socket(bind: str, backlog: int) -> socket.socket:
    """A listening TCP socket for ``host:port``."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def connection_cap(options: ServerOptions) -> int:
    """How many connections to serve at once.

    Returns:
        ``options.max_connections``, or the soft RLIMIT_NOFILE minus
        ``RESERVED_FDS`` (at least 16) when that is None.
    """
    if options.max_connections is not None:
        return options.max_connections
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, soft - RESERVED_FDS)


def _hypercorn_config(options: ServerOptions) -> Config:
    config = Config()
    # hypercorn's idle timer runs from accept, and from each response, until
    # a request head is complete; the guard's header deadline starts at the
    # first byte, so the two together bound a slow head.
    config.keep_alive_timeout = options.keep_alive_timeout
    # hypercorn's read_timeout also fires while a request is being computed
    # (a slow model upload would lose its connection); the guard replaces it.
    config.read_timeout = None
    config.graceful_timeout = options.graceful_timeout
    config.keep_alive_max_requests = options.max_requests_per_connection
    config.backlog = options.backlog
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


async def serve(
    registry: str | Path,
    options: ServerOptions,
    engine_options: dict[str, Any] | None = None,
    *,
    on_ready: Callable[[str, Any], None] | None = None,
    shutdown: trio.Event | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT or ``shutdown`` is set.

    Args:
        registry: the registry directory.
        options: HTTP settings.
        engine_options: passed to ``open_engine``.
        on_ready: called with the base URL and the engine once listening.
        shutdown: an event that stops the server when set (tests, embedding).
    """
    if shutdown is None:  # trio events refuse to be tested for truth
        shutdown = trio.Event()
    sock = bind_socket(options.bind, options.backlog)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    try:
        async with open_engine(registry, **(engine_options or {})) as engine:
            admin_key = await engine.admin.ensure_admin_key()
            if admin_key is not None:
                key_file = _write_admin_key(engine.registry.path, admin_key)
                log.warning(
                    "new registry: admin key written to %s (shown once)", key_file
                )
            app = build_app(
                engine, options.limits, max_score_requests=options.max_score_requests
            )
            server = _Server(app, options)
            serving = engine.router.serving
            log.info(
                "listening on %s; registry %s; %d predictors, %d routes loaded; "
                "at most %d connections",
                url,
                registry,
                len(serving.predictors),
                len(serving.table.routes),
                server.cap,
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_signals, shutdown)
                if on_ready is not None:
                    on_ready(url, engine)
                await server.run(listener, shutdown)
                nursery.cancel_scope.cancel()
    finally:
        await listener.aclose()
    log.info("stopped")


class _Server:
    """Accepts connections up to the cap; serves plain scoring requests on
    the direct lane and everything else with hypercorn."""

    def __init__(self, app: HttpApp, options: ServerOptions) -> None:
        self._app = app
        self._options = options
        self._config = _hypercorn_config(options)
        self._context = WorkerContext(None)
        self.cap = connection_cap(options)
        self._slots = trio.Semaphore(self.cap)
        self._watch: HangupWatch | None = None
        self._lane: DirectLane | None = None
        # The lane watches for clients leaving with epoll, which only Linux
        # has; elsewhere every request takes hypercorn's path.
        if options.direct_lane and hasattr(select, "epoll"):
            self._watch = HangupWatch()
            self._lane = DirectLane(
                app.score_route,
                self._watch,
                options.keep_alive_timeout,
                options.header_timeout,
            )

    async def run(self, listener: trio.SocketListener, shutdown: trio.Event) -> None:
        """Serve until ``shutdown``, then stop gracefully."""
        async with trio.open_nursery() as watching:
            if self._watch is not None:
                watching.start_soon(self._watch.run)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    accepting.start_soon(self._accept, listener, connections)
                    await shutdown.wait()
                    accepting.cancel_scope.cancel()
                # Refuse new connections at once rather than leave them in the
                # backlog until the process exits.
                await listener.aclose()
                # Idle connections close now; busy ones after their response.
                if self._lane is not None:
                    self._lane.stop()
                await self._context.terminated.set()
                connections.cancel_scope.deadline = (
                    trio.current_time() + self._options.graceful_timeout
                )
            watching.cancel_scope.cancel()

    async def _accept(
        self, listener: trio.SocketListener, connections: trio.Nursery
    ) -> None:
        while True:
            await self._slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                self._slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning(
                    "accept failed (%s); retrying in %g s",
                    errno.errorcode[exc.errno],
                    _ACCEPT_RETRY_PAUSE,
                )
                await trio.sleep(_ACCEPT_RETRY_PAUSE)
                continue
            except BaseException:
                self._slots.release()
                raise
            connections.start_soon(self._connection, stream)

    async def _connection(self, stream: trio.SocketStream) -> None:
        try:
            with trio.CancelScope() as connection:
                handover = Handover(b"", trio.current_time())
                if self._lane is not None:
                    handed = await self._lane.serve(stream)
                    if handed is None:
                        return
                    handover = handed
                guard = _GuardedStream(
                    stream, self._options.header_timeout, connection, handover
                )
                # Both ignores: hypercorn types its messages as TypedDicts and
                # names SSLStream where any trio stream with .socket will do.
                server = TCPServer(
                    ASGIWrapper(guard.wrap(self._app)),  # type: ignore[arg-type]
                    self._config,
                    self._context,
                    ConnectionState({}),
                    guard,  # type: ignore[arg-type]
                )
                # Ignore: hypercorn types the attribute as its own class.
                server.idle_task = _IdleTimer(  # type: ignore[assignment]
                    server, self._options.keep_alive_timeout, self._context
                )
                await server.run()
        except Exception:
            # One connection's failure must not stop the others being served.
            log.exception("connection handler failed")
        finally:
            self._slots.release()
            with trio.CancelScope(shield=True):
                await stream.aclose()


class _IdleTimer:
    """hypercorn's keep-alive timer, without a new task for every request.

    hypercorn restarts its idle timer by cancelling a task and starting
    another, twice per request (stop when a request arrives, restart when it
    is answered), each time under a lock: about a tenth of a single-event
    request's CPU.  This timer has one task per connection, started on the
    first ``restart``, that sleeps in a cancel scope whose deadline the two
    methods move.  It closes the connection as hypercorn's would: when the
    connection has idled ``timeout`` seconds, or when the server is stopping
    and the connection is idle (at once, or as soon as its request is
    answered).

    Args:
        server: the connection's hypercorn server.
        timeout: idle seconds before the connection closes.
        context: hypercorn's worker context (its ``terminated`` event).
    """

    def __init__(self, server: TCPServer, timeout: float, context: Any) -> None:
        self._server = server
        self._timeout = timeout
        self._context = context
        self._idle = False
        self._stopping = False
        self._deadline = math.inf
        self._scope: trio.CancelScope | None = None
        self._watching = False

    async def restart(self, task_group: Any, action: Any) -> None:
        """The connection is idle from now (``action`` is hypercorn's own)."""
        self._idle = True
        now = trio.current_time()
        self._set_deadline(now if self._stopping else now + self._timeout)
        if not self._watching:
            self._watching = True
            task_group._nursery.start_soon(self._watch)

    async def stop(self) -> None:
        """A request is being served: no idle timeout until it is answered."""
        self._idle = False
        self._set_deadline(math.inf)

    def _set_deadline(self, deadline: float) -> None:
        self._deadline = deadline
        if self._scope is not None:
            self._scope.deadline = deadline

    async def _watch(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._deadline) as scope:
                self._scope = scope
                if self._stopping:
                    await trio.sleep_forever()
                await self._context.terminated.wait()
                self._stopping = True
            self._scope = None
            if self._idle and (self._stopping or trio.current_time() >= self._deadline):
                with trio.CancelScope(shield=True):
                    await self._server._initiate_server_close()
                return


class _GuardedStream(trio.abc.HalfCloseableStream):
    """A client connection as hypercorn sees it, with our timeouts and gates.

    Three sets of state, each read and written on the trio thread only:

    - the head deadline: ``_head_started`` is when the current request head
      began (accept, or its first byte), None while a request is served or
      the connection idles; reads get a deadline only while it is set;
    - requests: ``_active`` holds the cancel scope of each request not yet
      answered (several under HTTP/2), ``_running`` counts application calls
      still running, answered or not;
    - ``100 Continue``: ``_held_continue`` is hypercorn's interim response,
      held until ``_body_wanted`` says the application asked for the body;
    - the response head: hypercorn writes head, body and an empty end of
      message separately; ``_held_head`` keeps the application's head until
      its body comes, so a response is one write (and one system call).

    The connection ends (its task is cancelled) once it is over, meaning
    closed by hypercorn, left by the client or timed out, and no application
    call is still running: hypercorn itself would wait for its keep-alive
    timer as well, holding the connection's slot for nothing.

    Args:
        stream: the accepted connection.
        header_timeout: seconds a request head may take (see the module).
        connection: the scope of the task serving the connection.
        handover: bytes the direct lane read and left for hypercorn, and
            when the pending request head began.
    """

    def __init__(
        self,
        stream: trio.SocketStream,
        header_timeout: float,
        connection: trio.CancelScope,
        handover: Handover,
    ) -> None:
        self._stream = stream
        self._header_timeout = header_timeout
        self._connection = connection
        self._unread = handover.data
        self._head_started: float | None = handover.head_started
        self._active: set[trio.CancelScope] = set()
        self._running = 0
        self._over = False
        self._read_scope: trio.CancelScope | None = None
        self._send_lock = trio.Lock()
        self._held_continue: bytes | None = None
        self._body_wanted = False
        # A response head waiting to go out with its body, in one write.
        self._hold_head = False
        self._held_head: bytes | None = None

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connection's socket (hypercorn reads the peer address)."""
        return self._stream.socket

    def wrap(self, app: App) -> App:
        """The ASGI app, tracking this connection's requests."""

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            self._running += 1
            try:
                with trio.CancelScope() as request:
                    self._begin(request)
                    try:
                        await app(
                            scope, self._gate(receive), self._track(send, request)
                        )
                    finally:
                        self._active.discard(request)
            finally:
                self._running -= 1
                if self._over and not self._running:
                    self._connection.cancel()
            if request.cancelled_caught:
                log.debug("client %s went away; request cancelled", scope["client"])

        return guarded

    def _begin(self, request: trio.CancelScope) -> None:
        self._active.add(request)
        self._head_started = None
        if self._read_scope is not None:
            self._read_scope.deadline = math.inf

    def _track(self, send: Send, request: trio.CancelScope) -> Send:
        async def tracked(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                # hypercorn writes the head at once; hold it for the body.
                self._hold_head = True
                await send(message)
                return
            if kind == "http.response.body" and not message.get("more_body", False):
                # Answered: a client that leaves from now on loses nothing.
                self._active.discard(request)
                try:
                    await send(message)
                finally:
                    await self._flush_head()
                return
            await send(message)

        return tracked

    async def _flush_head(self) -> None:
        """Write a held response head that no body followed (an empty body)."""
        self._hold_head = False
        held, self._held_head = self._held_head, None
        if held is not None:
            # hypercorn may have closed the connection meanwhile (a request
            # that said "Connection: close" with another pipelined behind
            # it): the head has nowhere to go, and that is no error.
            with (
                trio.CancelScope(shield=True),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await self._send(held)

    def _gate(self, receive: Receive) -> Receive:
        first = True

        async def gated() -> dict[str, Any]:
            nonlocal first
            if first:
                first = False
                self._body_wanted = True
                await self._release_continue()
            return await receive()

        return gated

    async def _release_continue(self) -> None:
        held, self._held_continue = self._held_continue, None
        if held is not None:
            async with self._send_lock:
                # A final response may have gone out while we waited.
                if self._body_wanted:
                    with trio.CancelScope(shield=True):
                        await self._stream.send_all(held)

    def _end(self) -> None:
        """The connection is over; stop its task once no request runs."""
        self._over = True
        if not self._running:
            self._connection.cancel()

    # -- trio stream interface ------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._unread:
            # What the direct lane read first; the head's clock runs on.
            size = len(self._unread) if max_bytes is None else max_bytes
            handed, self._unread = self._unread[:size], self._unread[size:]
            if not self._active and self._head_started is None:
                self._head_started = trio.current_time()
            return handed
        if not self._active and self._head_started is not None:
            data = await self._receive_head(max_bytes)
        else:
            # No head is being timed (a request is in progress, or the
            # connection idles under hypercorn's keep-alive timer): a plain
            # read, without the cost of a cancel scope.
            try:
                data = await self._stream.receive_some(max_bytes)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._client_gone()
                raise
        if not data:
            self._client_gone()
        elif not self._active and self._head_started is None:
            self._head_started = trio.current_time()
        return data

    async def _receive_head(self, max_bytes: int | None) -> bytes | bytearray:
        """A read while a request head is due, under the header deadline."""
        assert self._head_started is not None
        deadline = self._head_started + self._header_timeout
        try:
            with trio.CancelScope(deadline=deadline) as reading:
                self._read_scope = reading
                data = await self._stream.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._client_gone()
            raise
        finally:
            self._read_scope = None
        if reading.cancelled_caught:
            log.debug("request head not complete in %g s", self._header_timeout)
            self._end()
            raise trio.TooSlowError()  # hypercorn closes the connection
        return data

    def _client_gone(self) -> None:
        for request in self._active:
            request.cancel()
        self._end()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if bytes(data[: len(_CONTINUE)]) == _CONTINUE:
            if not self._body_wanted:
                self._held_continue = bytes(data)
                return
        else:
            # A final response is on its way: a held 100 is moot, and the next
            # request must ask for its body again.
            self._held_continue = None
            self._body_wanted = False
            if self._hold_head:
                # The head of the application's response: it goes out with
                # the first body bytes, one write instead of two.
                self._hold_head = False
                self._held_head = bytes(data)
                return
            if self._held_head is not None:
                data = self._held_head + data
                self._held_head = None
            elif not data:
                # h11 ends a Content-Length body with no bytes at all.
                return
        await self._send(data)

    async def _send(self, data: bytes | bytearray | memoryview) -> None:
        if self._send_lock.locked():
            async with self._send_lock:
                await self._stream.send_all(data)
            return
        # Uncontended (nearly always): take the lock without the two
        # scheduler checkpoints ``async with`` adds; send_all is one itself.
        self._send_lock.acquire_nowait()
        try:
            await self._stream.send_all(data)
        finally:
            self._send_lock.release()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # hypercorn sends EOF without its send lock; a response still being
        # written by another task would make trio refuse one or the other.
        async with self._send_lock:
            await self._stream.send_eof()

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self._stream.aclose()
        self._end()


def _write_admin_key(registry: Path, key: str) -> Path:
    # The only copy of the key: the registry keeps just its hash.
    path = Path(registry) / "admin.key"
    write_bytes_atomic(path, key.encode() + b"\n")
    path.chmod(0o600)
    return path


async def _watch_signals(shutdown: trio.Event) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal %d received: stopping gracefully", signum)
            shutdown.set()
            return
