"""Open- and closed-loop HTTP load generation in separate processes.

A run writes pre-encoded requests (see ``_http1``) over a fixed number of
keep-alive connections, one request in flight per connection, and records
the latency of every 2xx response in an HdrHistogram (microseconds).

- **Closed loop** (``rate_rps=None``): each connection sends its next request
  as soon as the previous answer arrives, for ``duration_s``.  This measures
  maximum throughput; latency is measured from the actual send.
- **Open loop**: request *i* is due at ``t0 + i / rate``, whatever the server
  does.  A due request goes to an idle connection or, when all are busy,
  waits in a backlog; its latency runs from the *scheduled* time, so the wait
  counts and a stalled server cannot hide its queueing (coordinated
  omission).

Errors are non-2xx answers, connection failures and requests unanswered when
the run's grace period ends.  The generator is written against asyncio
protocols rather than trio streams on purpose: callbacks that parse a
response and write the next request, with no task switch in between, cost a
few tens of microseconds per request, which keeps one client process well
ahead of the servers we measure on a two-core machine.  Its CPU time is
reported with every result, so a reader can see what it took from the server.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from muse._bench._http1 import Endpoint, ResponseFormatError, ResponseParser

__all__ = [
    "LoadResult",
    "LoadSpec",
    "new_histogram",
    "run_load_here",
    "schedule_offsets",
]

log = logging.getLogger("muse.bench")

# Histogram range in microseconds: 1 us to 60 s at 3 significant digits, so
# any percentile is within 0.1% of the true value.
HIST_LOWEST_US = 1
HIST_HIGHEST_US = 60_000_000
HIST_DIGITS = 3
# After the last scheduled send (open loop) or the deadline (closed loop),
# answers still in flight get this long before they count as errors.
GRACE_S = 5.0
# A refused or dropped connection is retried after this pause, so a dead
# server costs an error count per retry rather than a busy loop.
RECONNECT_PAUSE_S = 0.05


def new_histogram() -> HdrHistogram:
    """An empty latency histogram with the bench's fixed range (us)."""
    return HdrHistogram(HIST_LOWEST_US, HIST_HIGHEST_US, HIST_DIGITS)


@dataclass(frozen=True)
class LoadSpec:
    """What one load run sends, where, and how.

    Attributes:
        endpoint: server to connect to.
        requests: complete pre-encoded HTTP requests, sent in turn, cycled.
        events_per_request: events carried by each request (for events/s).
        connections: keep-alive connections (one request in flight each).
        duration_s: closed loop: how long to send; open loop: length of the
            schedule (``round(rate * duration)`` requests).
        rate_rps: open-loop offered rate in requests/s; None for closed loop.
        phase_index: this process's share of the schedule (see
            ``schedule_offsets``); 0 for a single process.
        phase_count: number of processes sharing the schedule.
    """

    endpoint: Endpoint
    requests: tuple[bytes, ...]
    events_per_request: int
    connections: int
    duration_s: float
    rate_rps: float | None = None
    phase_index: int = 0
    phase_count: int = 1

    @property
    def mode(self) -> str:
        """ "open" or "closed"."""
        return "closed" if self.rate_rps is None else "open"


@dataclass
class LoadResult:
    """Outcome of one run (possibly merged over several processes).

    Attributes:
        spec: what was run (for a merged result: the whole run's spec).
        ok: 2xx answers.
        errors: non-2xx answers, connection failures and timeouts.
        statuses: count of answers per status code.
        elapsed_s: from start to the last answer.
        histogram: latencies of the 2xx answers, in microseconds.
        loadgen_cpu_s: CPU seconds the load generator process(es) used.
        max_release_lag_ms: open loop: how late the generator itself released
            a due request (its own health; large values mean it fell behind).
    """

    spec: LoadSpec
    ok: int = 0
    errors: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    histogram: HdrHistogram = field(default_factory=new_histogram)
    loadgen_cpu_s: float = 0.0
    max_release_lag_ms: float = 0.0

    @property
    def achieved_rps(self) -> float:
        """2xx answers per second of elapsed time."""
        return self.ok / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def events_per_s(self) -> float:
        """Events scored per second (2xx answers times events per request)."""
        return self.achieved_rps * self.spec.events_per_request

    @property
    def loadgen_cpu_share(self) -> float:
        """Cores the load generator kept busy on average."""
        return self.loadgen_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, percentile: float) -> float:
        """Latency at a percentile (0-100) in milliseconds; NaN when empty.

        Args:
            percentile: e.g. 50, 99 or 99.9.

        Returns:
            The latency in ms.
        """
        if self.histogram.get_total_count() == 0:
            return float("nan")
        return float(self.histogram.get_value_at_percentile(percentile)) / 1000.0

    def to_wire(self) -> dict[str, Any]:
        """Plain data to send between processes (histogram encoded)."""
        return {
            "ok": self.ok,
            "errors": self.errors,
            "statuses": dict(self.statuses),
            "elapsed_s": self.elapsed_s,
            "histogram": self.histogram.encode(),
            "loadgen_cpu_s": self.loadgen_cpu_s,
            "max_release_lag_ms": self.max_release_lag_ms,
        }

    def merge_wire(self, data: dict[str, Any]) -> None:
        """Add another process's share (from ``to_wire``) into this result.

        Args:
            data: the other share.
        """
        self.ok += data["ok"]
        self.errors += data["errors"]
        for status, count in data["statuses"].items():
            self.statuses[status] = self.statuses.get(status, 0) + count
        self.elapsed_s = max(self.elapsed_s, data["elapsed_s"])
        self.histogram.add(HdrHistogram.decode(data["histogram"]))
        self.loadgen_cpu_s += data["loadgen_cpu_s"]
        self.max_release_lag_ms = max(
            self.max_release_lag_ms, data["max_release_lag_ms"]
        )


def schedule_offsets(
    rate_rps: float, duration_s: float, index: int = 0, count: int = 1
) -> list[float]:
    """Send times, relative to the start, of one process's share of a schedule.

    The whole schedule is ``round(rate * duration)`` requests, request *i*
    due at ``i / rate``; process ``index`` of ``count`` takes every
    ``count``-th one starting at ``index``, so the shares interleave.

    Args:
        rate_rps: offered rate of the whole schedule, requests/s (> 0).
        duration_s: length of the schedule in seconds.
        index: this process's share, 0 <= index < count.
        count: number of shares.

    Returns:
        Offsets in seconds, increasing.
    """
    total = round(rate_rps * duration_s)
    return [i / rate_rps for i in range(index, total, count)]


class _Recorder:
    """Counts answers and records latencies for one process."""

    def __init__(self) -> None:
        self.histogram = new_histogram()
        self.ok = 0
        self.errors = 0
        self.statuses: collections.Counter[int] = collections.Counter()
        self.last_answer = 0.0

    def answer(self, status: int, start: float, now: float) -> None:
        self.statuses[status] += 1
        self.last_answer = now
        if 200 <= status < 300:
            self.ok += 1
            micros = int((now - start) * 1e6)
            self.histogram.record_value(min(max(micros, 1), HIST_HIGHEST_US))
        else:
            self.errors += 1


class _Connection(asyncio.Protocol):
    """One keep-alive connection; reports each answer to its driver."""

    def __init__(self, driver: _Driver) -> None:
        self.driver = driver
        self.parser = ResponseParser()
        self.transport: asyncio.Transport | None = None
        self.start = 0.0
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Small requests must leave at once, not wait for Nagle.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = transport

    def send(self, raw: bytes, start: float) -> None:
        assert self.transport is not None
        self.start, self.busy = start, True
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        try:
            statuses = self.parser.feed(data)
        except ResponseFormatError as exc:
            log.warning("dropping connection: %s", exc)
            assert self.transport is not None
            self.transport.abort()
            return
        # One request in flight per connection, so at most one status here
        # unless a server answers what it was not asked; each frees the
        # connection before the driver hands it the next request.
        for status in statuses:
            self.busy = False
            self.driver.on_answer(self, status)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.driver.on_lost(self)


class _Driver(abc.ABC):
    """Feeds requests to connections; subclasses decide when."""

    def __init__(self, spec: LoadSpec, recorder: _Recorder) -> None:
        self.spec = spec
        self.recorder = recorder
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.connections: list[_Connection] = []
        self.closing = False
        self._next = spec.phase_index

    def next_request(self) -> bytes:
        """The next request to send, cycling through the spec's list."""
        raw = self.spec.requests[self._next % len(self.spec.requests)]
        self._next += self.spec.phase_count
        return raw

    async def connect_all(self) -> None:
        """Open every connection; raises OSError when the server is absent."""
        for _ in range(self.spec.connections):
            self.connections.append(await self._connect())

    async def _connect(self) -> _Connection:
        _, protocol = await self.loop.create_connection(
            lambda: _Connection(self), self.spec.endpoint.host, self.spec.endpoint.port
        )
        return protocol

    @abc.abstractmethod
    def on_answer(self, conn: _Connection, status: int) -> None:
        """A response arrived on ``conn`` with this status."""

    def on_lost(self, conn: _Connection) -> None:
        """A connection closed: count its request, reconnect unless closing."""
        # A request in flight on a closed connection will never be answered:
        # it is an error, and it is not retried (a retry would hide it).
        if conn.busy:
            conn.busy = False
            self.recorder.errors += 1
        if conn in self.connections:
            self.connections.remove(conn)
        if not self.closing:
            self.loop.create_task(self._replace())
        self.check_done()

    async def _replace(self) -> None:
        while not self.closing and self.wants_connections():
            try:
                conn = await self._connect()
            except OSError:
                self.recorder.errors += 1
                await asyncio.sleep(RECONNECT_PAUSE_S)
                continue
            self.connections.append(conn)
            self.on_idle(conn)
            return
        self.check_done()

    @abc.abstractmethod
    def wants_connections(self) -> bool:
        """Whether a lost connection should be replaced."""

    @abc.abstractmethod
    def on_idle(self, conn: _Connection) -> None:
        """``conn`` may send its next request."""

    @abc.abstractmethod
    def check_done(self) -> None:
        """Finish the run if everything has been sent and answered."""

    def close(self) -> int:
        """Close every connection; returns how many had a request in flight."""
        self.closing = True
        stranded = 0
        for conn in list(self.connections):
            stranded += conn.busy
            conn.busy = False
            if conn.transport is not None:
                conn.transport.close()
        return stranded


class _ClosedDriver(_Driver):
    """Each connection sends again as soon as it is answered, until the deadline."""

    deadline = 0.0

    def start(self, now: float) -> None:
        self.deadline = now + self.spec.duration_s
        for conn in self.connections:
            conn.send(self.next_request(), now)

    def on_answer(self, conn: _Connection, status: int) -> None:
        now = time.perf_counter()
        self.recorder.answer(status, conn.start, now)
        self.on_idle(conn, now)

    def on_idle(self, conn: _Connection, now: float | None = None) -> None:
        # The answer's timestamp doubles as the next send time: sending from
        # the callback leaves no gap for a scheduler to add.
        now = time.perf_counter() if now is None else now
        if now < self.deadline and not self.closing:
            conn.send(self.next_request(), now)
        else:
            self.check_done()

    def wants_connections(self) -> bool:
        return time.perf_counter() < self.deadline

    def check_done(self) -> None:
        busy = any(conn.busy for conn in self.connections)
        if not busy and time.perf_counter() >= self.deadline and not self.done.done():
            self.done.set_result(None)


class _OpenDriver(_Driver):
    """Requests fall due on a fixed schedule; busy connections leave a backlog."""

    def __init__(self, spec: LoadSpec, recorder: _Recorder) -> None:
        super().__init__(spec, recorder)
        self.idle: list[_Connection] = []
        self.backlog: collections.deque[float] = collections.deque()
        self.released_all = False
        self.max_lag = 0.0

    async def release(self, t0: float, offsets: list[float]) -> None:
        """Release each request at its due time (late ones at once, in order)."""
        self.idle = list(self.connections)
        position = 0
        while position < len(offsets):
            now = time.perf_counter()
            while position < len(offsets) and t0 + offsets[position] <= now:
                due = t0 + offsets[position]
                self.max_lag = max(self.max_lag, now - due)
                self._dispatch(due)
                position += 1
            if position < len(offsets):
                # The event loop may wake us a millisecond late; requests due
                # meanwhile go out together on the next pass, and their
                # latency still counts from their own due times.
                await asyncio.sleep(t0 + offsets[position] - time.perf_counter())
        self.released_all = True
        self.check_done()

    def _dispatch(self, due: float) -> None:
        # Last idle first: the connection used most recently is the one whose
        # server-side state (and the server's event loop's) is warmest.
        if self.idle:
            self.idle.pop().send(self.next_request(), due)
        else:
            self.backlog.append(due)

    def on_answer(self, conn: _Connection, status: int) -> None:
        self.recorder.answer(status, conn.start, time.perf_counter())
        self.on_idle(conn)

    def on_idle(self, conn: _Connection) -> None:
        if self.backlog and not self.closing:
            conn.send(self.next_request(), self.backlog.popleft())
        else:
            self.idle.append(conn)
            self.check_done()

    def on_lost(self, conn: _Connection) -> None:
        if conn in self.idle:
            self.idle.remove(conn)
        super().on_lost(conn)

    def wants_connections(self) -> bool:
        return not self.released_all or bool(self.backlog)

    def check_done(self) -> None:
        busy = any(conn.busy for conn in self.connections)
        quiet = self.released_all and not self.backlog and not busy
        if quiet and not self.done.done():
            self.done.set_result(None)


async def _run_async(
    spec: LoadSpec, meet: Callable[[], None] | None = None
) -> LoadResult:
    """Run one process's share of a spec on the current event loop."""
    recorder = _Recorder()
    driver: _Driver
    driver = (
        _ClosedDriver(spec, recorder)
        if spec.rate_rps is None
        else _OpenDriver(spec, recorder)
    )
    await driver.connect_all()
    if meet is not None:
        await asyncio.to_thread(meet)
    # CPU and time are counted from here: connecting, and waiting for the
    # other processes, are not load.
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    releaser = None
    if isinstance(driver, _OpenDriver):
        assert spec.rate_rps is not None
        offsets = schedule_offsets(
            spec.rate_rps, spec.duration_s, spec.phase_index, spec.phase_count
        )
        releaser = asyncio.ensure_future(driver.release(t0, offsets))
    else:
        assert isinstance(driver, _ClosedDriver)
        driver.start(t0)
    timed_out = await _wait_done(driver, spec.duration_s + GRACE_S)
    stranded = driver.close()
    if releaser is not None:
        releaser.cancel()
    lag = driver.max_lag if isinstance(driver, _OpenDriver) else 0.0
    backlog = len(driver.backlog) if isinstance(driver, _OpenDriver) else 0
    if timed_out:
        log.warning("run ended with %d requests unanswered", stranded + backlog)
    # Throughput is over the time to the last answer, not to the deadline:
    # answers still in flight at the deadline are counted, so is their time.
    end = recorder.last_answer if recorder.last_answer > t0 else time.perf_counter()
    if timed_out:
        end = time.perf_counter()
    return LoadResult(
        spec=spec,
        ok=recorder.ok,
        errors=recorder.errors + stranded + backlog,
        statuses=dict(recorder.statuses),
        elapsed_s=end - t0,
        histogram=recorder.histogram,
        loadgen_cpu_s=_cpu_seconds() - cpu0,
        max_release_lag_ms=lag * 1000.0,
    )


async def _wait_done(driver: _Driver, timeout_s: float) -> bool:
    """Wait for the driver to finish; True when it had to be cut short."""
    try:
        await asyncio.wait_for(asyncio.shield(driver.done), timeout_s)
    except TimeoutError:
        return True
    return False


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed (cheaper per request), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop


def run_load_here(spec: LoadSpec, meet: Callable[[], None] | None = None) -> LoadResult:
    """Run a spec in this process (tests; the child side of ``_workers.run_load``).

    Args:
        spec: what to run.
        meet: called (in a thread) after connecting and before starting, so
            that several processes start together; None to start at once.

    Returns:
        The result of this process's share.

    Raises:
        OSError: the server refused the initial connections.
    """
    loop = _new_loop()
    try:
        return loop.run_until_complete(_run_async(spec, meet))
    finally:
        loop.close()
