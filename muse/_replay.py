"""Replay transactions as live traffic against a MUSE server over HTTP.

Events are grouped into per-tenant requests in time order (a tenant's key
names its tenant, so one request holds one tenant's events), then sent by a
fixed number of concurrent msgpack clients.  Every answer is written back by
event index (score and predictor version), so the caller can measure what
clients actually saw.  Latency is measured per request, send to answer.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
import msgpack
import numpy as np
import trio
from hdrh.histogram import HdrHistogram

__all__ = ["Replayer", "ReplayLog", "plan_requests"]

# Microsecond resolution, up to a minute, three significant digits.
_HISTOGRAM_RANGE = (1, 60_000_000, 3)


def plan_requests(
    tenants: np.ndarray, indices: np.ndarray, batch: int
) -> list[tuple[str, np.ndarray]]:
    """Group events into per-tenant requests of at most ``batch`` events.

    A tenant's request is flushed when it is full; what is left at the end
    is flushed in order of each tenant's oldest waiting event, so requests
    stay close to time order.
    """
    buffers: dict[str, list[int]] = {}
    requests: list[tuple[str, np.ndarray]] = []
    for index in indices.tolist():
        tenant = tenants[index]
        buffer = buffers.setdefault(tenant, [])
        buffer.append(index)
        if len(buffer) == batch:
            requests.append((tenant, np.array(buffer, dtype=np.int64)))
            buffers[tenant] = []
    leftovers = sorted((b[0], t) for t, b in buffers.items() if b)
    requests.extend(
        (t, np.array(buffers[t], dtype=np.int64)) for _, t in leftovers
    )
    return requests


@dataclass
class ReplayLog:
    """What the clients saw.

    Attributes:
        scores: served score by event index (NaN where not answered).
        versions: predictor ref code by event index (-1 where not answered).
        refs: predictor refs by code.
        spans: per request (start, end, ok) in seconds since the replay began.
    """

    scores: np.ndarray
    versions: np.ndarray
    refs: list[str] = field(default_factory=list)
    spans: list[tuple[float, float, bool]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    latency: HdrHistogram = field(default_factory=lambda: HdrHistogram(*_HISTOGRAM_RANGE))
    sent: int = 0
    answered: int = 0
    events: int = 0
    origin: float = field(default_factory=time.perf_counter)

    def code(self, ref: str) -> int:
        if ref not in self.refs:
            self.refs.append(ref)
        return self.refs.index(ref)

    def percentile_ms(self, q: float) -> float:
        return float(self.latency.get_value_at_percentile(q)) / 1000.0


class Replayer:
    """Sends planned requests with ``concurrency`` clients.

    Args:
        url: the server's base URL.
        keys: tenant -> key.
        features: the feature matrix (rows = events, columns = ``names``).
        names: the feature names, in the matrix's column order.
        log: where answers and figures go.
        concurrency: requests in flight at once.
        deadline_ms: sent with every request.  A replay is a bulk client: it
            keeps its requests in flight and can wait longer than a payment
            check would, so a busy machine slows it down instead of failing.
    """

    def __init__(
        self,
        url: str,
        keys: dict[str, str],
        features: np.ndarray,
        names: Sequence[str],
        log: ReplayLog,
        *,
        concurrency: int = 8,
        intent: str = "card-fraud",
        deadline_ms: float = 2000.0,
    ) -> None:
        self._deadline_ms = deadline_ms
        self._url = url
        self._keys = keys
        self._features = features
        self._names = list(names)
        self._log = log
        self._concurrency = concurrency
        self._intent = intent
        self._sent_changed = trio.Event()

    async def run(
        self,
        requests: list[tuple[str, np.ndarray]],
        on_answer: Callable[[int], None] | None = None,
    ) -> None:
        """Send every request; returns when all are answered or failed."""
        send_channel, receive_channel = trio.open_memory_channel[tuple[str, np.ndarray]](
            self._concurrency
        )
        limits = httpx.Limits(max_connections=self._concurrency)
        async with httpx.AsyncClient(base_url=self._url, limits=limits, timeout=30) as http:
            async with trio.open_nursery() as nursery:
                for _ in range(self._concurrency):
                    nursery.start_soon(self._worker, http, receive_channel.clone(), on_answer)
                receive_channel.close()
                async with send_channel:
                    for request in requests:
                        await send_channel.send(request)

    async def wait_sent(self, count: int) -> None:
        """Return once ``count`` requests have been sent in total."""
        while self._log.sent < count:
            await self._sent_changed.wait()

    async def _worker(
        self,
        http: httpx.AsyncClient,
        receive_channel: trio.MemoryReceiveChannel[tuple[str, np.ndarray]],
        on_answer: Callable[[int], None] | None,
    ) -> None:
        log = self._log
        async with receive_channel:
            async for tenant, indices in receive_channel:
                body = self._body(indices)
                headers = {
                    "authorization": f"Bearer {self._keys[tenant]}",
                    "content-type": "application/msgpack",
                }
                log.sent += 1
                self._sent_changed.set()
                self._sent_changed = trio.Event()
                started = time.perf_counter()
                ok = await self._send(http, body, headers, indices)
                ended = time.perf_counter()
                log.latency.record_value(max(1, int((ended - started) * 1e6)))
                log.spans.append((started - log.origin, ended - log.origin, ok))
                if on_answer is not None:
                    on_answer(len(indices))

    async def _send(
        self, http: httpx.AsyncClient, body: bytes, headers: dict[str, str], indices: np.ndarray
    ) -> bool:
        log = self._log
        try:
            response = await http.post("/v1/score", content=body, headers=headers)
        except httpx.HTTPError as exc:
            log.errors[type(exc).__name__] += 1
            return False
        answer = msgpack.unpackb(response.content)
        if response.status_code != 200:
            log.errors[str(answer.get("error", response.status_code))] += 1
            return False
        results = answer["results"]
        log.scores[indices] = [r["score"] for r in results]
        log.versions[indices] = [log.code(r["predictor"]) for r in results]
        log.answered += 1
        log.events += len(indices)
        return True

    def _body(self, indices: np.ndarray) -> bytes:
        rows = self._features[indices].tolist()
        names = self._names
        events = [
            {"id": int(i), "features": dict(zip(names, row))}
            for i, row in zip(indices.tolist(), rows)
        ]
        body = {"intent": self._intent, "events": events, "deadline_ms": self._deadline_ms}
        return msgpack.packb(body)  # type: ignore[no-any-return]
