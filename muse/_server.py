"""Run the engine behind hypercorn's trio worker, in one trio run.

``serve`` opens the engine, binds the listening socket itself (so it can
report the real port when asked for port 0), and hands both to hypercorn.
SIGTERM and SIGINT start a graceful stop: hypercorn stops accepting and
finishes in-flight requests, then the engine drains its queues and persists
its calibration samples.
"""

from __future__ import annotations

import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from muse._atomic import write_bytes_atomic
from muse._engine import open_engine
from muse._http import HttpLimits, build_app

__all__ = ["ServerOptions", "serve", "bind_socket"]

log = logging.getLogger("muse.server")


@dataclass(frozen=True)
class ServerOptions:
    """HTTP-level settings, resolved once at start-up.

    Attributes:
        bind: ``host:port``; port 0 picks a free one.
        keep_alive_timeout: idle seconds before a kept-alive connection closes.
        header_timeout: seconds a client may take to send a request's headers.
        graceful_timeout: seconds in-flight requests get at shutdown.
        max_requests_per_connection: hypercorn's keep-alive cap; high, because
            reconnecting costs more than the request it interrupts.
        backlog: listen backlog.
        limits: body limits by route.
    """

    bind: str = "127.0.0.1:8000"
    keep_alive_timeout: float = 30.0
    header_timeout: float = 10.0
    graceful_timeout: float = 10.0
    max_requests_per_connection: int = 1_000_000
    backlog: int = 1024
    limits: HttpLimits = field(default_factory=HttpLimits)


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


def _hypercorn_config(options: ServerOptions, sock: socket.socket) -> Config:
    config = Config()
    config.bind = [f"fd://{sock.fileno()}"]
    config.keep_alive_timeout = options.keep_alive_timeout
    config.read_timeout = options.header_timeout
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
    shutdown = shutdown or trio.Event()
    sock = bind_socket(options.bind, options.backlog)
    host, port = sock.getsockname()[:2]
    url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    async with open_engine(registry, **(engine_options or {})) as engine:
        admin_key = await engine.admin.ensure_admin_key()
        if admin_key is not None:
            key_file = _write_admin_key(engine.registry.path, admin_key)
            log.warning("new registry: admin key written to %s (shown once)", key_file)
        app = build_app(engine, options.limits)
        serving = engine.router.serving
        log.info(
            "listening on %s; registry %s; %d predictors, %d routes loaded",
            url,
            registry,
            len(serving.predictors),
            len(serving.table.routes),
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_signals, shutdown)
            if on_ready is not None:
                on_ready(url, engine)
            await hypercorn_serve(
                app, _hypercorn_config(options, sock), shutdown_trigger=shutdown.wait
            )
            nursery.cancel_scope.cancel()
    log.info("stopped")


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
