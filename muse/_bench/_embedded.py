"""The engine without HTTP: many trio tasks calling ``engine.score`` at once.

Measures what the scoring path sustains in-process, the upper bound the
HTTP server can approach: ``tasks`` tasks each score one event (or
``batch`` events) per call, back to back, for ``duration_s``.  Runs as its
own process (``python -m muse._bench._embedded``) on a registry no server
holds, so it has the machine to itself and a fresh engine.

Protocol: the parent writes a pickled ``EmbeddedSpec`` to stdin; the child
writes a pickled dict of figures to stdout.
"""

from __future__ import annotations

import pickle
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from muse._bench._loadgen import new_histogram
from muse._bench._peers import own_python_env

__all__ = ["EmbeddedSpec", "run_embedded"]

# Calls made before measuring, so model loading and first-call costs stay out.
WARMUP_CALLS = 200
# A run longer than this plus its duration is stuck; the parent gives up.
TIMEOUT_MARGIN_S = 120.0


@dataclass(frozen=True)
class EmbeddedSpec:
    """One embedded run.

    Attributes:
        registry: registry directory with a route for ``intent``.
        tenant: tenant to score for.
        intent: intent to score.
        events: MUSE events (``{"id", "features"}``), cycled.
        tasks: concurrent tasks.
        batch: events per ``score`` call.
        duration_s: measured time.
    """

    registry: Path
    tenant: str
    intent: str
    events: tuple[dict[str, Any], ...]
    tasks: int = 64
    batch: int = 1
    duration_s: float = 5.0


class _Tally:
    """Counts of one embedded run, shared by its tasks (one trio thread).

    Latencies go into a plain list during the run and into the histogram
    after it: recording in HdrHistogram's pure-Python code took about 4% of
    the process's CPU at 40,000 calls/s, a cost that is the harness's, not
    the engine's.
    """

    def __init__(self) -> None:
        self.errors = 0
        self.micros: list[int] = []  # one per answered call

    @property
    def calls(self) -> int:
        return len(self.micros)

    def histogram(self) -> Any:
        histogram = new_histogram()
        for micros in self.micros:
            histogram.record_value(max(1, micros))
        return histogram


async def _measure(spec: EmbeddedSpec) -> dict[str, Any]:
    from muse import open_engine

    tally = _Tally()
    async with open_engine(spec.registry) as engine:
        for i in range(WARMUP_CALLS):
            await engine.score(
                spec.tenant, spec.intent, [spec.events[i % len(spec.events)]]
            )
        # Each call's event list is made before the clock starts: what the
        # application does to assemble its events is not the engine's time.
        events, batch = spec.events, spec.batch
        calls = [
            [events[(j * batch + k) % len(events)] for k in range(batch)]
            for j in range(len(events))
        ]
        cpu0 = _cpu_seconds()
        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for index in range(spec.tasks):
                nursery.start_soon(_worker, engine, spec, calls, index, t0, tally)
        elapsed = time.perf_counter() - t0
        cpu = _cpu_seconds() - cpu0
    return {
        "calls": tally.calls,
        "errors": tally.errors,
        "events": tally.calls * spec.batch,
        "elapsed_s": elapsed,
        "events_per_s": tally.calls * spec.batch / elapsed,
        "cpu_cores": cpu / elapsed,
        "histogram": tally.histogram().encode(),
    }


async def _worker(
    engine: Any,
    spec: EmbeddedSpec,
    calls: list[list[dict[str, Any]]],
    index: int,
    t0: float,
    tally: _Tally,
) -> None:
    """Score back to back until the run's end; shed or late calls count as errors."""
    from muse._errors import ServerError

    n = len(calls)
    deadline = t0 + spec.duration_s
    position = index
    clock = time.perf_counter
    score = engine.score
    tenant, intent = spec.tenant, spec.intent
    micros = tally.micros
    while clock() < deadline:
        chunk = calls[position % n]
        position += spec.tasks
        start = clock()
        try:
            await score(tenant, intent, chunk)
        except ServerError:
            # Overloaded or past its deadline: the engine is up but did not
            # score; a client error would be the bench's bug and propagates.
            tally.errors += 1
            continue
        micros.append(int((clock() - start) * 1e6))


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run_embedded(spec: EmbeddedSpec) -> dict[str, Any]:
    """Run the embedded measurement in a separate process.

    Args:
        spec: what to run.

    Returns:
        ``calls`` (answered), ``errors`` (shed or past the deadline),
        ``events``, ``elapsed_s``, ``events_per_s``, ``cpu_cores`` and
        ``histogram`` (encoded HdrHistogram of per-call latency, us).

    Raises:
        RuntimeError: the child failed (its stderr is in the message).
    """
    child = subprocess.run(
        [sys.executable, "-m", "muse._bench._embedded"],
        check=False,  # the exit code is checked below, with stderr
        input=pickle.dumps(spec),
        capture_output=True,
        env=own_python_env(),
        timeout=spec.duration_s + TIMEOUT_MARGIN_S,
    )
    if child.returncode != 0:
        tail = child.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"embedded engine run failed:\n{tail}")
    result: dict[str, Any] = pickle.loads(child.stdout)
    return result


def _main() -> int:
    spec: EmbeddedSpec = pickle.load(sys.stdin.buffer)
    figures = trio.run(_measure, spec)
    pickle.dump(figures, sys.stdout.buffer)
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
