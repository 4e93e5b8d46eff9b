"""The engine: actors wired together, and the operations clients call.

``open_engine`` starts, in one trio nursery, the router, a live scorer, a
shadow scorer and the calibrator, connected by bounded memory channels::

    score() --Job--> live scorer ----------ScoredBatch----------> calibrator
                        \\--rows--> ShadowJob --> shadow scorer --/   |
    admin ops --Change--> router   (swaps the snapshot)        answers, samples

A scoring request resolves its route once against the router's snapshot,
queues a job without waiting (a full queue is an immediate ``Overloaded``),
then waits for its own job until its deadline.  The live scorer hands each
batch's rows on to the route's shadows, gathered into one open
``ShadowJob`` per shadow predictor (a full shadow queue drops them,
counted); a shadow that reads other features gets its rows from the request
itself.  The HTTP app is a thin layer over this object; a trio application
can use it directly.

Admin operations are methods too.  Each writes to the registry before it
takes effect, so a restarted engine comes back with the same state.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from muse._admin import Admin
from muse._calibrator import Calibrator, ScoredBatch, ScoredGroup
from muse._deadlines import DeadlineWatch
from muse._errors import (
    DeadlineExceeded,
    Forbidden,
    InternalError,
    MuseError,
    Overloaded,
)
from muse._events import DecodedEvents, EventBatch
from muse._keys import ADMIN, Principal
from muse._quota import QuotaPolicy, Quotas
from muse._registry import Registry
from muse._router import CHANGE_BUFFER, Change, Router
from muse._routes import ANY_TENANT
from muse._scorer import SHADOW_JOB_ROWS, SHADOW_LINGER, Job, Scorer, ShadowJob
from muse._serving import Serving
from muse._wire import check_deadline

__all__ = ["Engine", "EngineOptions", "open_engine"]

log = logging.getLogger("muse.engine")


@dataclass(frozen=True)
class EngineOptions:
    """Engine settings, resolved once at start-up.

    Attributes:
        deadline_ms: default per-request deadline.
        max_events: most events in one request.
        live_queue: jobs waiting for the live scorer before requests are shed.
            At ~64 events a job this is a few milliseconds of work, so a full
            queue means the engine is saturated, not momentarily busy.
        shadow_queue: shadow jobs waiting before new ones are dropped.
        calibrator_queue: scored batches waiting for the calibrator.
        persist_interval: seconds between calibration sample flushes.
        sample_capacity: reservoir size per (predictor, tenant, source).
        quotas: tenant (or ``*``) -> events per second and burst.
        seed: seeds the reservoirs' random draws (tests).
    """

    deadline_ms: float = 100.0
    max_events: int = 4096
    live_queue: int = 2048
    shadow_queue: int = 1024
    calibrator_queue: int = 256
    persist_interval: float = 60.0
    sample_capacity: int = 50_000
    quotas: Mapping[str, QuotaPolicy] | None = None
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class EngineStatistics:
    requests: int
    events: int
    overloaded: int
    deadline_exceeded: int
    aborted: int
    shadow_jobs: int
    shadow_dropped: int
    live_queue: int
    shadow_queue: int


class Engine:
    """Scores events and changes what is served.  Made by ``open_engine``."""

    def __init__(self, registry: Registry, options: EngineOptions) -> None:
        self.registry = registry
        self.options = options
        self._quotas = Quotas(options.quotas or {})
        live_send, live_receive = trio.open_memory_channel[Job](options.live_queue)
        shadow_send, shadow_receive = trio.open_memory_channel[ShadowJob](
            options.shadow_queue
        )
        batch_send, batch_receive = trio.open_memory_channel[ScoredBatch](
            options.calibrator_queue
        )
        change_send, change_receive = trio.open_memory_channel[Change](CHANGE_BUFFER)
        self._live_send, self._shadow_send = live_send, shadow_send
        self._change_send = change_send
        self.live_scorer = Scorer(
            live_receive,
            batch_send,
            observe_batch=self._observe,
            forward=self._forward_shadows,
        )
        self.shadow_scorer = Scorer(
            shadow_receive,
            batch_send.clone(),
            linger=SHADOW_LINGER,
            # Nobody waits for shadow scores: always off the event loop.
            thread_rows=1,
        )
        self.calibrator = Calibrator(
            batch_receive,
            save_samples=_sample_saver(registry),
            persist_interval=options.persist_interval,
            capacity=options.sample_capacity,
            seed=options.seed,
        )
        self.router = Router(Serving(), change_receive, self._publish_routes)
        self.deadlines = DeadlineWatch()
        self.admin = Admin(
            registry,
            self.router,
            self.calibrator,
            self._apply,
            settle_shadows=self.settle_shadows,
        )
        self._requests = self._events = self._overloaded = 0
        self._deadlines = self._aborted = self._shadow_jobs = self._shadow_dropped = 0
        self._open_shadows: dict[str, ShadowJob] = {}
        self.on_batch: Any = None

    # -- scoring -------------------------------------------------------------

    async def score(
        self,
        tenant: str,
        intent: str,
        events: Sequence[Mapping[str, Any]],
        *,
        deadline_ms: float | None = None,
    ) -> list[dict[str, Any]]:
        """Score events for a tenant's intent.

        Args:
            tenant: whose thresholds the scores feed.
            intent: what to score, e.g. ``card-fraud``.
            events: ``{"id": ..., "features": {name: number or None}}`` each.
            deadline_ms: overrides the engine's default deadline.

        Returns:
            ``{"id", "score", "predictor", "mapping"}`` per event, in order.

        Raises:
            NotFound: no route for the intent.
            InvalidEvent: an event is unusable (names the event and feature).
            TooManyRequests: the tenant is over its quota.
            Overloaded: the live queue is full.
            DeadlineExceeded: the deadline passed; the work was cancelled.
        """
        return await self.score_events(
            tenant, intent, DecodedEvents(events), deadline_ms=deadline_ms
        )

    async def score_events(
        self,
        tenant: str,
        intent: str,
        events: EventBatch,
        *,
        deadline_ms: float | None = None,
    ) -> list[dict[str, Any]]:
        """``score`` for events already in an ``EventBatch`` (the HTTP path)."""
        if tenant == ADMIN:
            # The admin key administers; it has no routes, thresholds or
            # samples of its own.
            raise Forbidden("the admin key cannot score; use a tenant key")
        if deadline_ms is not None:
            check_deadline(deadline_ms)  # HTTP checked it; an application may not
        plan = self.router.serving.plan(tenant, intent)
        live = plan.live
        matrix = events.matrix(
            live.feature_names,
            allow_missing=live.allow_missing,
            allow_infinity=live.allow_infinity,
        )
        count = len(events)
        if self._quotas:
            self._quotas.take(tenant, count, trio.current_time())
        job = Job(live, tenant, plan.mapping, matrix, plan.forwarded)
        try:
            self._live_send.send_nowait(job)
        except trio.WouldBlock:
            self._overloaded += 1
            raise Overloaded("the live scoring queue is full; retry shortly") from None
        self._requests += 1
        self._events += count
        if plan.own_input:
            self._queue_shadows(plan.own_input, tenant, events)
        self._watch(job, deadline_ms)
        # Awaited here rather than in a helper coroutine: one frame less to
        # suspend and resume, on a path that does it for every request.
        try:
            await job.wait_done()
        finally:
            # Cancelled from outside (the client went away): the scorer
            # skips the job if it has not started it yet.
            if job.scores is None and job.error is None:
                job.cancelled = True
                self._aborted += 1
        if job.error is not None:
            raise self._failed(job)
        assert job.scores is not None
        ref, mapping_id = live.ref, plan.mapping_id
        return [
            {"id": i, "score": s, "predictor": ref, "mapping": mapping_id}
            for i, s in zip(events.labels(), job.scores)
        ]

    def _watch(self, job: Job, deadline_ms: float | None) -> None:
        job.budget_ms = deadline_ms or self.options.deadline_ms
        # The default budget's deadlines fall in call order: the cheap queue.
        self.deadlines.watch(
            trio.current_time() + job.budget_ms / 1000.0,
            job,
            in_order=deadline_ms is None,
        )

    def _failed(self, job: Job) -> MuseError:
        """What a failed job raises in its request."""
        error = job.error
        if isinstance(error, DeadlineExceeded):
            self._deadlines += 1
        if isinstance(error, MuseError):
            return error
        failure = InternalError(f"scoring failed: {error!r}")
        failure.__cause__ = error
        return failure

    def _queue_shadows(
        self, shadows: tuple[Any, ...], tenant: str, events: EventBatch
    ) -> None:
        """Rows for shadows that read other features than the live predictor."""
        for shadow in shadows:
            if shadow is None:  # routed but not loaded
                self._shadow_dropped += len(events)
                continue
            try:
                rows = events.matrix(
                    shadow.feature_names,
                    allow_missing=shadow.allow_missing,
                    allow_infinity=shadow.allow_infinity,
                )
            except MuseError:
                # The live answer stands; a shadow that cannot take these
                # events just does not see them.
                self._shadow_dropped += len(events)
                continue
            self._add_shadow_rows(shadow, [tenant], [len(rows)], rows)

    def _forward_shadows(self, group: ScoredGroup) -> None:
        """Hand a live batch's rows to the shadows that take them as they are.

        Called by the live scorer once per scored group, so the cost is per
        batch, not per request, when the group's jobs share their shadows
        (one route, the usual case).
        """
        jobs = group.jobs
        shadows = jobs[0].shadows
        if any(job.shadows != shadows for job in jobs):
            # Routes with other shadows in one batch: job by job.
            for job in jobs:
                for shadow in job.shadows:
                    self._add_shadow_rows(shadow, [job.tenant], [job.rows], job.matrix)
            return
        if not shadows:
            return
        tenants = [job.tenant for job in jobs]
        matrix = group.matrix
        counts = None if len(matrix) == len(jobs) else np.diff(group.bounds)
        for shadow in shadows:
            self._add_shadow_rows(shadow, tenants, counts, matrix)

    def _add_shadow_rows(
        self, shadow: Any, tenants: list[str], counts: Any, matrix: Any
    ) -> None:
        job = self._shadow_job(shadow)
        if job is None:
            self._shadow_dropped += len(matrix)
        else:
            job.add(tenants, counts, matrix)

    def _shadow_job(self, shadow: Any) -> ShadowJob | None:
        """The shadow predictor's open job, or None when the queue is full.

        A job stays open for more rows until the shadow scorer takes it or
        it holds ``SHADOW_JOB_ROWS``; then the next request queues a new one.
        """
        job = self._open_shadows.get(shadow.ref)
        if job is None or job.taken or job.rows >= SHADOW_JOB_ROWS:
            job = ShadowJob(shadow)
            try:
                self._shadow_send.send_nowait(job)
            except trio.WouldBlock:
                return None
            # One entry per shadow ref ever routed; a retired shadow's last
            # job stays referenced here, which is a few rows at most.
            self._open_shadows[shadow.ref] = job
            self._shadow_jobs += 1
        return job

    async def settle_shadows(self) -> None:
        """Wait until the shadow scores of every request answered so far are
        sampled: what a shadow-fitted mapping then sees includes them all."""
        for job in list(self._open_shadows.values()):
            await job.settled()

    def _observe(self, rows: int) -> None:
        if self.on_batch is not None:
            self.on_batch(rows)

    # -- wiring ----------------------------------------------------------------

    async def _apply(self, change: Change) -> Serving:
        """Send a change to the router and wait for it to take effect."""
        await self._change_send.send(change)
        await change.done.wait()
        if change.error is not None:
            raise change.error
        assert change.result is not None
        return change.result

    def _publish_routes(self, table: Any) -> None:
        document = table.to_dict()
        del document["version"]  # the registry numbers its documents itself
        self.registry.put_routes(document, table.version - 1)

    async def _close(self) -> None:
        # Closing the inboxes lets each actor drain what it holds and return;
        # the calibrator persists its samples on the way out.
        await self._live_send.aclose()
        await self._shadow_send.aclose()
        await self._change_send.aclose()

    def authenticate(self, authorization: str | None) -> Principal:
        """The caller behind an Authorization header value."""
        return self.admin.keys.authenticate(authorization)

    def ready(self) -> list[str]:
        """Routed predictors not loaded; empty when every route can serve."""
        return self.router.serving.missing()

    def statistics(self) -> EngineStatistics:
        return EngineStatistics(
            self._requests,
            self._events,
            self._overloaded,
            self._deadlines,
            self._aborted,
            self._shadow_jobs,
            self._shadow_dropped,
            self._live_send.statistics().current_buffer_used,
            self._shadow_send.statistics().current_buffer_used,
        )


def _sample_saver(registry: Registry) -> Any:
    def save(predictor: str, tenant: str, source: str, values: Any) -> None:
        registry.save_samples(
            predictor, None if tenant == ANY_TENANT else tenant, source, values
        )

    return save


@asynccontextmanager
async def open_engine(
    registry: str | Path | Registry, **options: Any
) -> AsyncIterator[Engine]:
    """Start an engine on a registry and stop it cleanly on exit.

    Args:
        registry: a registry directory (created if absent) or a Registry.
        **options: any field of ``EngineOptions``.

    Yields:
        The running engine; every routed predictor is loaded before it is
        yielded.
    """
    if not isinstance(registry, Registry):
        registry = Registry(Path(registry))
    engine = Engine(registry, EngineOptions(**options))
    await engine.admin.load()
    # Everything alive now (imported libraries, loaded models, the registry
    # state) lives as long as the process.  Left to the cyclic collector, a
    # full pass over it took 60-80 ms every few seconds under load, which was
    # the whole p99.9 of a request; frozen, a full pass sees only what
    # requests leave behind.  Frozen objects are still freed by reference
    # counting; only cycles among them wait for the process to end.
    gc.freeze()
    async with trio.open_nursery() as outer:
        # The deadline watch outlives the actors: jobs still queued at
        # shutdown can expire while the scorers drain.
        outer.start_soon(engine.deadlines.run)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.calibrator.run)
            await nursery.start(engine.live_scorer.run)
            await nursery.start(engine.shadow_scorer.run)
            await nursery.start(engine.router.run)
            log.info(
                "engine started on %s: %d predictors loaded, %d routes",
                registry.path,
                len(engine.router.serving.predictors),
                len(engine.router.serving.table.routes),
            )
            try:
                yield engine
            finally:
                with trio.CancelScope(shield=True):
                    await engine._close()
        outer.cancel_scope.cancel()
    log.info("engine stopped")
