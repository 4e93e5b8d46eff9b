"""The calibrator actor: the second half of every prediction.

It owns what turns model outputs into served scores and what remembers them:

- applies each predictor's transformation (the DAG's combiners, posterior
  correction per model, then the quantile mapping the job was resolved with);
- keeps a bounded, uniform sample (a reservoir) of pre-mapping scores per
  (predictor version, tenant, source), where source is ``live`` or ``shadow``,
  plus one per (predictor version, ``*``, source) for predictor-wide fits;
- counts, per (predictor version, tenant), how many served scores reached each
  edge of the reference curve, so operators can watch the share a fixed
  threshold sees against its target;
- persists the samples to the registry periodically and when it stops.

Inbox: ``ScoredBatch`` from the scorers.  The scorers own the send side and
close it when they stop; the calibrator then flushes its samples and returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import trio

from muse._routes import ANY_TENANT
from muse._transform import DEFAULT_CURVE

__all__ = ["Calibrator", "ScoredBatch", "Reservoir", "CalibratorStatistics"]

log = logging.getLogger("muse.calibration")

# 50,000 scores per (predictor, tenant, source) pins every quantile of the
# default curve to within about 0.2 percentage points, at 400 kB each.
SAMPLE_CAPACITY = 50_000
# Samples are the only state that is not written before it is acknowledged;
# this bounds what a crash can lose.
PERSIST_INTERVAL = 60.0


class Job(Protocol):
    """What the calibrator needs of a scoring job (defined by the engine)."""

    predictor: Any
    tenant: str
    mapping: Any
    shadow: bool
    cancelled: bool

    def finish(self, scores: np.ndarray) -> None: ...

    def fail(self, error: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """Model outputs for a batch of jobs, in the jobs' order.

    Attributes:
        jobs: the jobs, live or shadow.
        outputs: per job, model ref -> positive-class probabilities.
    """

    jobs: Sequence[Job]
    outputs: Sequence[dict[str, np.ndarray]]


class Reservoir:
    """A uniform random sample of at most ``capacity`` scores (Algorithm R)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self._values = np.empty(capacity, dtype=np.float64)
        self._size = 0
        self.seen = 0
        self._rng = rng

    def add(self, scores: np.ndarray) -> None:
        """Offer a batch; each score is kept with probability capacity/seen."""
        capacity = len(self._values)
        free = capacity - self._size
        if free > 0:
            head = scores[:free]
            self._values[self._size : self._size + len(head)] = head
            self._size += len(head)
            self.seen += len(head)
            scores = scores[free:]
        if len(scores):
            # Position t (0-based) replaces a random slot with probability
            # capacity/(t+1): draw r in [0, t] and keep it when r < capacity.
            seen = self.seen + np.arange(len(scores))
            draws = (self._rng.random(len(scores)) * (seen + 1)).astype(np.int64)
            keep = draws < capacity
            self._values[draws[keep]] = scores[keep]
            self.seen += len(scores)

    def values(self) -> np.ndarray:
        """A copy of the sample."""
        return self._values[: self._size].copy()

    def __len__(self) -> int:
        return self._size


@dataclass(frozen=True, slots=True)
class EdgeShares:
    """Live share of served scores at or above each reference edge."""

    predictor: str
    tenant: str
    edges: tuple[float, ...]
    targets: tuple[float, ...]
    observed: tuple[float, ...]
    events: int


@dataclass(frozen=True, slots=True)
class CalibratorStatistics:
    batches: int
    jobs: int
    events: int
    samples: dict[str, int]
    shares: tuple[EdgeShares, ...]


class _EdgeCounter:
    def __init__(self, curve: Sequence[tuple[float, float]]) -> None:
        self.edges = np.array([e for e, _ in curve])
        self.targets = tuple(t for _, t in curve)
        self.counts = np.zeros(len(curve), dtype=np.int64)
        self.events = 0

    def add(self, scores: np.ndarray) -> None:
        self.counts += (scores[:, None] >= self.edges).sum(axis=0)
        self.events += len(scores)


class Calibrator:
    """Applies transformations, samples scores, persists samples.

    Args:
        batch_receive: the inbox of ``ScoredBatch`` messages.
        save_samples: ``(predictor, tenant, source, values) -> None``, called in
            a worker thread; None keeps samples in memory only.
        persist_interval: seconds between sample flushes.
        capacity: reservoir size per (predictor, tenant, source).
    """

    def __init__(
        self,
        batch_receive: trio.MemoryReceiveChannel[ScoredBatch],
        *,
        save_samples: Callable[[str, str, str, np.ndarray], None] | None = None,
        persist_interval: float = PERSIST_INTERVAL,
        capacity: int = SAMPLE_CAPACITY,
        seed: int | None = None,
    ) -> None:
        self._inbox = batch_receive
        self._save = save_samples
        self._interval = persist_interval
        self._capacity = capacity
        self._rng = np.random.default_rng(seed)
        self._reservoirs: dict[tuple[str, str, str], Reservoir] = {}
        self._edges: dict[tuple[str, str], _EdgeCounter] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._batches = self._jobs = self._events = 0

    # -- samples -------------------------------------------------------------

    def restore(
        self, predictor: str, tenant: str, source: str, values: np.ndarray
    ) -> None:
        """Seed a reservoir with samples persisted by an earlier run.

        The count of scores seen before is not kept, so after a restart new
        scores replace old ones faster than a single long run would.
        """
        self._reservoir(predictor, tenant, source).add(np.asarray(values, float))

    def sample(self, predictor: str, tenant: str, source: str) -> np.ndarray:
        """The current sample for (predictor, tenant or ``*``, source)."""
        found = self._reservoirs.get((predictor, tenant, source))
        return found.values() if found is not None else np.empty(0)

    def discard(self, predictor: str, source: str) -> None:
        """Forget the samples of a predictor and source (e.g. after a refit)."""
        for key in [
            k for k in self._reservoirs if k[0] == predictor and k[2] == source
        ]:
            del self._reservoirs[key]
            self._dirty.add(key)

    def _reservoir(self, predictor: str, tenant: str, source: str) -> Reservoir:
        key = (predictor, tenant, source)
        found = self._reservoirs.get(key)
        if found is None:
            found = self._reservoirs[key] = Reservoir(self._capacity, self._rng)
        return found

    def _record(
        self, predictor: str, tenant: str, source: str, scores: np.ndarray
    ) -> None:
        for scope in (tenant, ANY_TENANT):
            self._reservoir(predictor, scope, source).add(scores)
            self._dirty.add((predictor, scope, source))

    # -- the actor -----------------------------------------------------------

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the inbox until every scorer has closed its end."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._persist_periodically)
            task_status.started()
            async with self._inbox:
                async for batch in self._inbox:
                    self.handle(batch)
            nursery.cancel_scope.cancel()
        await self.persist()

    def handle(self, batch: ScoredBatch) -> None:
        """Finish every job of a batch (also callable directly, for tests)."""
        self._batches += 1
        for job, outputs in zip(batch.jobs, batch.outputs):
            if job.cancelled:
                continue
            try:
                self._finish(job, outputs)
            except Exception as exc:  # noqa: BLE001 - the job carries it back
                # A failing transformation fails its own request, not the actor.
                job.fail(exc)

    def _finish(self, job: Job, outputs: dict[str, np.ndarray]) -> None:
        premapped = job.predictor.combine(outputs, None)
        source = "shadow" if job.shadow else "live"
        ref = job.predictor.ref
        self._record(ref, job.tenant, source, premapped)
        served = premapped if job.mapping is None else job.mapping.apply(premapped)
        self._jobs += 1
        self._events += len(served)
        if not job.shadow:
            self._count_edges(ref, job.tenant, job.mapping, served)
        job.finish(served)

    def _count_edges(
        self, ref: str, tenant: str, mapping: Any, served: np.ndarray
    ) -> None:
        counter = self._edges.get((ref, tenant))
        if counter is None:
            curve = (
                mapping.curve if mapping is not None else sorted(DEFAULT_CURVE.items())
            )
            counter = self._edges[(ref, tenant)] = _EdgeCounter(curve)
        counter.add(served)

    async def _persist_periodically(self) -> None:
        while True:
            await trio.sleep(self._interval)
            await self.persist()

    async def persist(self) -> None:
        """Write every changed sample to the registry (in a worker thread)."""
        if self._save is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        snapshot = [
            (
                key,
                self._reservoirs[key].values()
                if key in self._reservoirs
                else np.empty(0),
            )
            for key in sorted(dirty)
        ]
        save = self._save

        def write() -> None:
            for (predictor, tenant, source), values in snapshot:
                save(predictor, tenant, source, values)

        try:
            await trio.to_thread.run_sync(write)
        except Exception:
            self._dirty |= dirty
            log.exception("could not persist calibration samples; will retry")
        else:
            log.debug("persisted %d calibration samples", len(snapshot))

    def statistics(self) -> CalibratorStatistics:
        shares = tuple(
            EdgeShares(
                ref,
                tenant,
                tuple(float(e) for e in c.edges),
                c.targets,
                tuple(float(n) / c.events if c.events else math.nan for n in c.counts),
                c.events,
            )
            for (ref, tenant), c in sorted(self._edges.items())
        )
        samples = {"/".join(k): len(r) for k, r in sorted(self._reservoirs.items())}
        return CalibratorStatistics(
            self._batches, self._jobs, self._events, samples, shares
        )
