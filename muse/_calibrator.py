"""The calibrator actor: the second half of every prediction.

It owns what turns model outputs into served scores and what remembers them:

- applies each predictor's transformation (the DAG's combiners, posterior
  correction per model, then the quantile mapping the job was resolved with);
- keeps a bounded, uniform sample (a reservoir) of pre-mapping scores per
  (predictor version, tenant, source), where source is ``live`` or
  ``shadow``, plus one per (predictor version, ``*``, source) for
  predictor-wide fits;
- counts, per (predictor version, tenant), how many served scores reached
  each edge of the reference curve, so operators can watch the share a
  fixed threshold sees against its target;
- persists the samples to the registry periodically and when it stops.

Work is done per group of jobs, not per job: a scorer batch of a thousand
single-event requests is transformed with one call per step.  Scores are
first appended to a pending buffer and folded into the reservoirs and edge
counters in bulk, because a reservoir update costs the same for one score
as for thousands.

Inbox: ``ScoredBatch`` from the scorers.  The scorers own the send sides and
close them when they stop; the calibrator then flushes its samples and
returns.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import trio

from muse._routes import ANY_TENANT
from muse._transform import DEFAULT_CURVE

__all__ = [
    "Calibrator",
    "CalibratorStatistics",
    "EdgeShares",
    "Reservoir",
    "ScoredBatch",
    "ScoredGroup",
]

log = logging.getLogger("muse.calibration")

# 50,000 scores per (predictor, tenant, source) pin every quantile of the
# default curve to within about 0.2 percentage points, at 400 kB each.
SAMPLE_CAPACITY = 50_000
# Samples are the only state not written before it is acknowledged; this
# bounds what a crash can lose.
PERSIST_INTERVAL = 60.0
# Pending scores are folded into reservoirs past this many rows: large
# enough to amortise the numpy calls, small enough to stay in cache.
FOLD_ROWS = 16_384


class Job(Protocol):
    """What the calibrator needs of a live scoring job (defined by the
    scorer).  Shadow jobs (``ShadowJob``) gather the rows of many requests and
    tenants; of those it needs ``shadow`` and ``tenant_codes``."""

    predictor: Any
    tenant: str
    mapping: Any
    shadow: bool
    cancelled: bool

    def finish(self, scores: list[float]) -> None: ...

    def fail(self, error: BaseException) -> None: ...


@dataclass(frozen=True, slots=True)
class ScoredGroup:
    """Model outputs for jobs of one predictor, stacked in job order.

    Attributes:
        predictor: the loaded predictor all jobs use.
        jobs: the jobs: live ``Job``s, or the scorer's ``ShadowJob``s.
        bounds: job i owns rows ``bounds[i]:bounds[i+1]``.
        outputs: model ref -> positive-class probabilities of all rows.
        matrix: the model input, the jobs' rows stacked.
    """

    predictor: Any
    jobs: Sequence[Any]
    bounds: np.ndarray
    outputs: Mapping[str, np.ndarray]
    matrix: np.ndarray


@dataclass(frozen=True, slots=True)
class ScoredBatch:
    """One scorer batch: a group per predictor."""

    groups: Sequence[ScoredGroup]


class Reservoir:
    """A uniform random sample of at most ``capacity`` scores (Algorithm R)."""

    def __init__(self, capacity: int, rng: np.random.Generator) -> None:
        self._values = np.empty(capacity, dtype=np.float64)
        self._size = 0
        self.seen = 0
        self._rng = rng

    def add(self, scores: np.ndarray) -> None:
        """Offer scores; each is kept with probability capacity / seen."""
        capacity = len(self._values)
        free = capacity - self._size
        if free > 0:
            head = scores[:free]
            self._values[self._size : self._size + len(head)] = head
            self._size += len(head)
            self.seen += len(head)
            scores = scores[free:]
        if len(scores):
            # The t-th score (0-based) replaces a random slot with
            # probability capacity/(t+1): draw r in [0, t], keep if r < cap.
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
    def __init__(self, curve: Sequence[tuple[float, float]], code: int) -> None:
        self.code = code  # the calibrator's number for ``curve``
        self.edges = np.array([e for e, _ in curve])
        self.targets = tuple(t for _, t in curve)
        self.counts = np.zeros(len(curve), dtype=np.int64)
        self.events = 0

    def add(self, scores: np.ndarray) -> None:
        self.counts += (scores[:, None] >= self.edges).sum(axis=0)
        self.events += len(scores)


@dataclass
class _Pending:
    """Scores of one (predictor, source) not yet folded into reservoirs."""

    tenants: list[np.ndarray] = field(default_factory=list)
    premapped: list[np.ndarray] = field(default_factory=list)
    served: list[np.ndarray] = field(default_factory=list)
    # Per served row, the number of the curve its mapping maps onto.
    curves: list[np.ndarray] = field(default_factory=list)
    rows: int = 0


class Calibrator:
    """Applies transformations, samples scores, persists samples.

    Args:
        batch_receive: the inbox of ``ScoredBatch`` messages.
        save_samples: ``(predictor, tenant, source, values) -> None``, called
            in a worker thread; None keeps samples in memory only.
        persist_interval: seconds between sample flushes.
        capacity: reservoir size per (predictor, tenant, source).
        seed: seeds the reservoirs' draws.
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
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._tenant_codes: dict[str, int] = {}
        self._tenant_names: list[str] = []
        # Reference curves by number; 0 is the default, which unmapped
        # scores are watched against.
        default = tuple(sorted(DEFAULT_CURVE.items()))
        self._curves: list[Any] = [default]
        self._curve_codes: dict[Any, int] = {default: 0}
        self._dirty: set[tuple[str, str, str]] = set()
        self._batches = self._jobs = self._events = 0

    # -- samples -------------------------------------------------------------

    def restore(
        self, predictor: str, tenant: str, source: str, values: np.ndarray
    ) -> None:
        """Seed a reservoir with samples persisted by an earlier run.

        How many scores were seen before is not kept, so after a restart
        new scores replace old ones faster than in one long run.
        """
        self._reservoir(predictor, tenant, source).add(np.asarray(values, float))

    def sample(self, predictor: str, tenant: str, source: str) -> np.ndarray:
        """The current sample for (predictor, tenant or ``*``, source)."""
        self._fold(predictor, source)
        found = self._reservoirs.get((predictor, tenant, source))
        return found.values() if found is not None else np.empty(0)

    def _reservoir(self, predictor: str, tenant: str, source: str) -> Reservoir:
        key = (predictor, tenant, source)
        found = self._reservoirs.get(key)
        if found is None:
            found = self._reservoirs[key] = Reservoir(self._capacity, self._rng)
        return found

    def _curve_code(self, mapping: Any) -> int:
        if mapping is None:
            return 0
        code = self._curve_codes.get(mapping.curve)
        if code is None:
            code = self._curve_codes[mapping.curve] = len(self._curves)
            self._curves.append(mapping.curve)
        return code

    def _code(self, tenant: str) -> int:
        code = self._tenant_codes.get(tenant)
        if code is None:
            code = self._tenant_codes[tenant] = len(self._tenant_names)
            self._tenant_names.append(tenant)
        return code

    # -- the actor -------------------------------------------------------------

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
        for group in batch.groups:
            try:
                self._finish_group(group)
            except Exception as exc:
                # A failing transformation fails its own requests, not the
                # actor that serves everyone else.
                log.exception("transformation failed for %s", group.predictor.ref)
                for job in group.jobs:
                    job.fail(exc)

    def _finish_group(self, group: ScoredGroup) -> None:
        jobs, bounds = group.jobs, group.bounds
        premapped = group.predictor.combine(dict(group.outputs), None)
        self._jobs += len(jobs)
        self._events += len(premapped)
        source = "shadow" if jobs[0].shadow else "live"
        key = (group.predictor.ref, source)
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = _Pending()
        if source == "shadow":
            # Only sampled: a shadow's scores are never served, so they are
            # neither mapped nor handed back.
            codes = [job.tenant_codes(self._code) for job in jobs]
            pending.tenants.append(
                codes[0] if len(codes) == 1 else np.concatenate(codes)
            )
            for job in jobs:
                job.finish([])
        else:
            served, curves = self._map(jobs, bounds, premapped)
            # Requests answer with Python floats: convert once per group,
            # not once per job.
            scores, edges = served.tolist(), bounds.tolist()
            for index, job in enumerate(jobs):
                if not job.cancelled:
                    job.finish(scores[edges[index] : edges[index + 1]])
            tenants = np.fromiter(
                (self._code(j.tenant) for j in jobs), np.int64, len(jobs)
            )
            if len(jobs) != len(premapped):
                tenants = np.repeat(tenants, np.diff(bounds))
            pending.tenants.append(tenants)
            pending.served.append(served)
            pending.curves.append(curves)
        pending.premapped.append(premapped)
        pending.rows += len(premapped)
        if pending.rows >= FOLD_ROWS:
            self._fold(*key)

    def _map(
        self, jobs: Sequence[Job], bounds: np.ndarray, premapped: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Served scores, and per row the number of its mapping's curve."""
        first = jobs[0].mapping
        if all(job.mapping is first for job in jobs):
            served = premapped if first is None else first.apply(premapped)
            code = self._curve_code(first)
            return served, np.full(len(premapped), code, dtype=np.int64)
        # Tenants with mappings of their own: map each job's slice.
        served = np.empty_like(premapped)
        curves = np.empty(len(premapped), dtype=np.int64)
        for index, job in enumerate(jobs):
            rows = slice(bounds[index], bounds[index + 1])
            part = premapped[rows]
            served[rows] = part if job.mapping is None else job.mapping.apply(part)
            curves[rows] = self._curve_code(job.mapping)
        return served, curves

    def _fold(self, predictor: str, source: str) -> None:
        pending = self._pending.pop((predictor, source), None)
        if pending is None or not pending.rows:
            return
        codes = np.concatenate(pending.tenants)
        premapped = np.concatenate(pending.premapped)
        served = np.concatenate(pending.served) if pending.served else None
        curves = np.concatenate(pending.curves) if pending.curves else None
        self._add(predictor, ANY_TENANT, source, premapped)
        # A stable sort keeps each tenant's rows in the order they were served.
        order = np.argsort(codes, kind="stable")
        cut = np.flatnonzero(np.diff(codes[order])) + 1
        for part in np.split(order, cut):
            tenant = self._tenant_names[codes[part[0]]]
            self._add(predictor, tenant, source, premapped[part])
            if served is not None and curves is not None:
                self._count(predictor, tenant, curves[part], served[part])

    def _add(
        self, predictor: str, tenant: str, source: str, scores: np.ndarray
    ) -> None:
        self._reservoir(predictor, tenant, source).add(scores)
        self._dirty.add((predictor, tenant, source))

    def _count(
        self, predictor: str, tenant: str, curves: np.ndarray, served: np.ndarray
    ) -> None:
        """Count served scores at the edges of the curve each was mapped onto.

        A tenant's counter follows its current curve: when a new mapping
        brings another curve, counting starts afresh against its edges and
        targets, since shares at the old edges say nothing about the new.
        """
        change = np.flatnonzero(np.diff(curves)) + 1
        for start, stop in zip([0, *change], [*change, len(curves)], strict=True):
            code = int(curves[start])
            counter = self._edges.get((predictor, tenant))
            if counter is None or counter.code != code:
                counter = _EdgeCounter(self._curves[code], code)
                self._edges[(predictor, tenant)] = counter
            counter.add(served[start:stop])

    def _fold_all(self) -> None:
        for predictor, source in list(self._pending):
            self._fold(predictor, source)

    # -- persistence -------------------------------------------------------------

    async def _persist_periodically(self) -> None:
        while True:
            await trio.sleep(self._interval)
            await self.persist()

    async def persist(self) -> None:
        """Write every changed sample to the registry (in a worker thread)."""
        self._fold_all()
        if self._save is None or not self._dirty:
            return
        dirty, self._dirty = self._dirty, set()
        snapshot = [(key, self._reservoirs[key].values()) for key in sorted(dirty)]
        save = self._save

        def write() -> None:
            for (predictor, tenant, source), values in snapshot:
                save(predictor, tenant, source, values)

        try:
            await trio.to_thread.run_sync(write)
        except Exception as exc:  # noqa: BLE001 - kept dirty, retried next time
            # Degraded but serving: the samples stay in memory.
            self._dirty |= dirty
            log.warning("could not persist calibration samples (%s); will retry", exc)
        else:
            log.debug("persisted %d calibration samples", len(snapshot))

    def statistics(self) -> CalibratorStatistics:
        self._fold_all()
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
