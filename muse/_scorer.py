"""The scorer actor: runs compiled models over batches of jobs.

A job is one request's events for one predictor (the live one, or a shadow).
The scorer takes the first job from its inbox, then everything else already
waiting (up to a row cap), groups the rows by compiled model and calls each
model once for the whole batch.  There is no waiting delay: a lone request is
scored at once, and under load the batch grows by itself with whatever
arrived while the previous call ran.

Small batches run inline on the trio thread, where a call costs a few
microseconds; large ones go to a worker thread (the compiled kernel releases
the GIL) so the event loop keeps accepting requests meanwhile.

Model outputs go on to the calibrator, which finishes the jobs.  A shadow
scorer is the same class with a ``linger``: nobody waits for a shadow's
scores, so after the first job arrives it lets rows gather for a while and
then scores them all in one call on a worker thread.  The shadow model then
runs on another core, in batches large enough to amortise everything per
call, and never holds up the event loop that answers live requests.

Inbox: ``Job`` (live) or ``ShadowJob`` (shadow).  The engine owns the send side and closes it at shutdown; the
scorer then closes its calibrator channel and returns.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from muse._calibrator import ScoredBatch, ScoredGroup
from muse._deadlines import deadline_error

__all__ = ["SHADOW_JOB_ROWS", "Job", "Scorer", "ScorerStatistics", "ShadowJob"]

log = logging.getLogger("muse.scorer")

# One batch holds at most this many rows; past it, waiting jobs go to the next
# batch so one huge request cannot starve a queue of single events.
MAX_BATCH_ROWS = 8192
# At this many rows a model call moves to a worker thread: below it the
# thread hand-off (about 50-100 us) costs more than the call itself.
THREAD_ROWS = 1024
# Rows one shadow job gathers from many requests before the engine opens the
# next; with the shadow queue's length this bounds memory held for shadows.
SHADOW_JOB_ROWS = 4096
# How long the shadow scorer lets rows gather before scoring them: at 50,000
# events/s a batch of about 1,000 rows, and a shadow score is sampled at most
# this long (plus the call) after its request was answered.
SHADOW_LINGER = 0.02


class Job:
    """One request's events for one predictor, and where its answer goes.

    The request's task waits on the job itself: ``finish`` or ``fail``
    reschedules it directly.  A ``trio.Event`` per job did the same through
    a parking lot, at several times the cost, on a path where the model call
    itself takes microseconds.
    """

    __slots__ = (
        "_waiter",
        "budget_ms",
        "cancelled",
        "done",
        "error",
        "mapping",
        "matrix",
        "predictor",
        "rows",
        "scores",
        "shadows",
        "tenant",
    )

    def __init__(
        self,
        predictor: Any,
        tenant: str,
        mapping: Any,
        matrix: np.ndarray,
        shadows: tuple[Any, ...] = (),
    ) -> None:
        self.predictor = predictor
        self.tenant = tenant
        self.mapping = mapping
        self.matrix = matrix
        self.rows = len(matrix)
        # Shadow predictors the live scorer hands this job's rows to.
        self.shadows = shadows
        self.cancelled = False
        self.scores: list[float] | None = None
        self.error: BaseException | None = None
        self.budget_ms = 0.0
        self.done = False
        self._waiter: Any = None

    # The live scorer's jobs; shadow work travels in ``ShadowJob``.
    shadow = False

    def finish(self, scores: list[float]) -> None:
        self.scores = scores
        self._set_done()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._set_done()

    def _set_done(self) -> None:
        if self.done:
            return
        self.done = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def expire(self) -> bool:
        """Fail the job for its deadline; False when it was already done."""
        if self.done:
            return False
        self.cancelled = True
        self.fail(deadline_error(self.budget_ms))
        return True

    async def wait_done(self) -> None:
        """Wait until the job is finished or failed (one waiter at most)."""
        if self.done:
            await trio.lowlevel.checkpoint()
            return
        assert self._waiter is None, "a job has one waiting request"
        self._waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


class ShadowJob:
    """Events of many requests for one shadow predictor, scored as one job.

    Nobody waits for a shadow's scores, so no request queues a job of its
    own for a shadow.  The live scorer hands each batch's stacked rows to
    the shadow predictor's open job (``add``), as do requests whose shadow
    reads other features, and the engine queues a new job only once the
    scorer has taken the last (``taken``) or it holds ``SHADOW_JOB_ROWS``.
    A job per request cost a third of an in-process single-event score with
    one shadow on the route, and a part per request still cost a tenth.

    The scorer closes the job with ``take`` on the event loop; the parts are
    stacked when ``matrix`` is first read, which may be on a worker thread
    because nothing adds to a taken job.  ``settled`` waits until the
    calibrator has sampled the job's scores (or the model call failed).
    """

    __slots__ = (
        "_done",
        "_matrix",
        "_parts",
        "_tenants",
        "predictor",
        "rows",
        "taken",
    )

    shadow = True
    cancelled = False
    mapping = None

    def __init__(self, predictor: Any) -> None:
        self.predictor = predictor
        self.rows = 0
        self.taken = False
        # Per part: its tenants, and how many rows each owns (None: one each).
        self._tenants: list[tuple[list[str], Any]] = []
        self._parts: list[np.ndarray] = []
        self._matrix: np.ndarray | None = None
        self._done = trio.Event()

    def add(self, tenants: list[str], counts: Any, matrix: np.ndarray) -> None:
        """Add rows: ``tenants[i]`` owns ``counts[i]`` consecutive rows, or
        one row when ``counts`` is None."""
        assert not self.taken, "a taken shadow job is closed"
        self._tenants.append((tenants, counts))
        self._parts.append(matrix)
        self.rows += len(matrix)

    def take(self) -> None:
        """Close the job to new rows: the scorer has it."""
        self.taken = True

    @property
    def matrix(self) -> np.ndarray:
        assert self.taken, "stack a shadow job's rows only once it is taken"
        if self._matrix is None:
            parts = self._parts
            self._matrix = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return self._matrix

    def tenant_codes(self, code: Callable[[str], int]) -> np.ndarray:
        """Each row's tenant, as ``code(tenant)`` gives it."""
        parts = []
        for tenants, counts in self._tenants:
            codes = np.fromiter(map(code, tenants), np.int64, len(tenants))
            parts.append(codes if counts is None else np.repeat(codes, counts))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def finish(self, scores: list[float]) -> None:
        """Sampled: nobody waits for the scores, only for ``settled``."""
        self._done.set()

    def fail(self, error: BaseException) -> None:
        """The scorer logged the error; the rows are lost to the sample."""
        self._done.set()

    async def settled(self) -> None:
        await self._done.wait()


AnyJob = Job | ShadowJob


@dataclass(frozen=True, slots=True)
class ScorerStatistics:
    batches: int
    jobs: int
    rows: int
    model_calls: int
    threaded_calls: int
    skipped_cancelled: int
    largest_batch: int


class Scorer:
    """Batches jobs and calls compiled models.

    Args:
        job_receive: the inbox.
        batch_send: where model outputs go (the calibrator's inbox).
        linger: seconds to let jobs gather after the first arrives (the
            shadow scorer); 0 scores at once (the live scorer).
        max_batch_rows: rows in one batch at most.
        thread_rows: batches of this many rows run on a worker thread.
        observe_batch: called with the row count of every batch (metrics).
        forward: called on the event loop with each scored ``ScoredGroup``
            before it goes to the calibrator (the live scorer hands rows to
            shadows this way).
    """

    def __init__(
        self,
        job_receive: trio.MemoryReceiveChannel[Job]
        | trio.MemoryReceiveChannel[ShadowJob],
        batch_send: trio.MemorySendChannel[ScoredBatch],
        *,
        linger: float = 0.0,
        max_batch_rows: int = MAX_BATCH_ROWS,
        thread_rows: int = THREAD_ROWS,
        observe_batch: Any = None,
        forward: Callable[[ScoredGroup], None] | None = None,
    ) -> None:
        self._inbox = job_receive
        self._outbox = batch_send
        self._linger = linger
        self._max_rows = max_batch_rows
        self._thread_rows = thread_rows
        self._observe = observe_batch
        self._forward = forward
        self._batches = self._jobs = self._rows = 0
        self._calls = self._threaded = self._skipped = self._largest = 0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the inbox until it is closed, then close the outbox."""
        task_status.started()
        async with self._inbox, self._outbox:
            async for first in self._inbox:
                if self._linger:
                    # Also at shutdown: the inbox is closed but still holds
                    # its jobs, and the pause only delays them.
                    await trio.sleep(self._linger)
                batch, rows = self._collect(first)
                if batch:
                    await self._score(batch, rows)

    def _collect(self, first: AnyJob) -> tuple[list[AnyJob], int]:
        batch: list[AnyJob] = []
        rows = 0
        job: AnyJob | None = first
        while job is not None:
            if job.cancelled:
                self._skipped += 1
            else:
                if job.shadow:
                    job.take()  # type: ignore[union-attr]
                batch.append(job)
                rows += job.rows
            if rows >= self._max_rows:
                break
            try:
                job = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                job = None
        return batch, rows

    async def _score(self, batch: list[AnyJob], rows: int) -> None:
        self._batches += 1
        self._jobs += len(batch)
        self._rows += rows
        self._largest = max(self._largest, rows)
        if self._observe is not None:
            self._observe(rows)
        try:
            if rows >= self._thread_rows:
                self._threaded += 1
                outputs = await trio.to_thread.run_sync(self._predict, batch)
            else:
                outputs = self._predict(batch)
        except Exception as exc:
            # A model failing is our bug or a broken library: fail the jobs of
            # this batch, keep the actor alive for the next one.
            log.exception("model call failed for a batch of %d jobs", len(batch))
            for job in batch:
                job.fail(exc)
            return
        if self._forward is not None:
            for group in outputs:
                self._forward(group)
        await self._outbox.send(ScoredBatch(outputs))

    def _predict(self, batch: list[AnyJob]) -> list[ScoredGroup]:
        # Jobs of one predictor are stacked into one matrix, so each of its
        # models runs once for the whole group, whatever the job sizes.
        by_predictor: dict[int, list[AnyJob]] = {}
        for job in batch:
            by_predictor.setdefault(id(job.predictor), []).append(job)
        groups = []
        for jobs in by_predictor.values():
            if len(jobs) == 1:
                stacked = jobs[0].matrix
            else:
                stacked = np.concatenate([job.matrix for job in jobs])
            if len(stacked) == len(jobs):  # one row each: single events
                bounds = np.arange(len(jobs) + 1)
            else:
                bounds = np.zeros(len(jobs) + 1, dtype=np.intp)
                np.cumsum([job.rows for job in jobs], out=bounds[1:])
            outputs = {}
            for ref, model, columns in jobs[0].predictor.plan:
                self._calls += 1
                rows = stacked if columns is None else stacked[:, columns]
                outputs[ref] = model.predict(np.ascontiguousarray(rows))
            groups.append(
                ScoredGroup(jobs[0].predictor, jobs, bounds, outputs, stacked)
            )
        return groups

    def statistics(self) -> ScorerStatistics:
        return ScorerStatistics(
            self._batches,
            self._jobs,
            self._rows,
            self._calls,
            self._threaded,
            self._skipped,
            self._largest,
        )
