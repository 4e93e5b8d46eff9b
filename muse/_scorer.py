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
scorer is the same class with ``yield_to`` set to the live inbox: it steps
aside while live work is waiting, so shadows never delay an answer.

Inbox: ``Job``.  The engine owns the send side and closes it at shutdown; the
scorer then closes its calibrator channel and returns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from muse._deadlines import deadline_error
from muse._calibrator import ScoredBatch, ScoredGroup

__all__ = ["Job", "Scorer", "ScorerStatistics"]

log = logging.getLogger("muse.scorer")

# One batch holds at most this many rows; past it, waiting jobs go to the next
# batch so one huge request cannot starve a queue of single events.
MAX_BATCH_ROWS = 8192
# At this many rows a model call moves to a worker thread: below it the
# thread hand-off (about 50-100 us) costs more than the call itself.
THREAD_ROWS = 1024
# A shadow scorer that finds live work waiting checks again after this pause;
# shorter spins the CPU the live path needs.
_YIELD_PAUSE = 0.001


class Job:
    """One request's events for one predictor, and where its answer goes.

    The request's task waits on the job itself: ``finish`` or ``fail``
    reschedules it directly.  A ``trio.Event`` per job did the same through
    a parking lot, at several times the cost, twice per request (live and
    shadow) on a path where the model call itself takes microseconds.
    """

    __slots__ = (
        "predictor",
        "budget_ms",
        "tenant",
        "mapping",
        "matrix",
        "shadow",
        "cancelled",
        "scores",
        "error",
        "_done",
        "_waiter",
    )

    def __init__(
        self,
        predictor: Any,
        tenant: str,
        mapping: Any,
        matrix: np.ndarray,
        *,
        shadow: bool = False,
    ) -> None:
        self.predictor = predictor
        self.tenant = tenant
        self.mapping = mapping
        self.matrix = matrix
        self.shadow = shadow
        self.cancelled = False
        self.scores: np.ndarray | None = None
        self.error: BaseException | None = None
        self.budget_ms = 0.0
        self._done = False
        self._waiter: Any = None

    def finish(self, scores: np.ndarray) -> None:
        self.scores = scores
        self._set_done()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._set_done()

    def _set_done(self) -> None:
        if self._done:
            return
        self._done = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            trio.lowlevel.reschedule(waiter)

    def expire(self) -> bool:
        """Fail the job for its deadline; False when it was already done."""
        if self._done:
            return False
        self.cancelled = True
        self.fail(deadline_error(self.budget_ms))
        return True

    async def wait_done(self) -> None:
        """Wait until the job is finished or failed (one waiter at most)."""
        if self._done:
            await trio.lowlevel.checkpoint()
            return
        assert self._waiter is None, "a job has one waiting request"
        self._waiter = trio.lowlevel.current_task()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)


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
        yield_to: another inbox that has priority over this one (the shadow
            scorer yields to the live inbox).
        observe_batch: called with the row count of every batch (metrics).
    """

    def __init__(
        self,
        job_receive: trio.MemoryReceiveChannel[Job],
        batch_send: trio.MemorySendChannel[ScoredBatch],
        *,
        yield_to: trio.MemoryReceiveChannel[Job] | None = None,
        max_batch_rows: int = MAX_BATCH_ROWS,
        thread_rows: int = THREAD_ROWS,
        observe_batch: Any = None,
    ) -> None:
        self._inbox = job_receive
        self._outbox = batch_send
        self._yield_to = yield_to
        self._max_rows = max_batch_rows
        self._thread_rows = thread_rows
        self._observe = observe_batch
        self._batches = self._jobs = self._rows = 0
        self._calls = self._threaded = self._skipped = self._largest = 0

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve the inbox until it is closed, then close the outbox."""
        task_status.started()
        async with self._inbox, self._outbox:
            async for first in self._inbox:
                if self._yield_to is not None:
                    await self._wait_live_idle()
                batch = self._collect(first)
                if batch:
                    await self._score(batch)

    async def _wait_live_idle(self) -> None:
        assert self._yield_to is not None
        while self._yield_to.statistics().current_buffer_used:
            await trio.sleep(_YIELD_PAUSE)

    def _collect(self, first: Job) -> list[Job]:
        batch: list[Job] = []
        rows = 0
        job: Job | None = first
        while job is not None:
            if job.cancelled:
                self._skipped += 1
            else:
                batch.append(job)
                rows += len(job.matrix)
            if rows >= self._max_rows:
                break
            try:
                job = self._inbox.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                job = None
        return batch

    async def _score(self, batch: list[Job]) -> None:
        rows = sum(len(job.matrix) for job in batch)
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
        except Exception as exc:  # noqa: BLE001 - every job gets the error
            # A model failing is our bug or a broken library: fail the jobs of
            # this batch, keep the actor alive for the next one.
            log.exception("model call failed for a batch of %d jobs", len(batch))
            for job in batch:
                job.fail(exc)
            return
        await self._outbox.send(ScoredBatch(outputs))

    def _predict(self, batch: list[Job]) -> list[ScoredGroup]:
        # Jobs of one predictor are stacked into one matrix, so each of its
        # models runs once for the whole group, whatever the job sizes.
        by_predictor: dict[int, list[Job]] = {}
        for job in batch:
            by_predictor.setdefault(id(job.predictor), []).append(job)
        groups = []
        for jobs in by_predictor.values():
            if len(jobs) == 1:
                stacked = jobs[0].matrix
            else:
                stacked = np.concatenate([job.matrix for job in jobs])
            bounds = np.zeros(len(jobs) + 1, dtype=np.intp)
            np.cumsum([len(job.matrix) for job in jobs], out=bounds[1:])
            outputs = {}
            for ref, model, columns in jobs[0].predictor.plan:
                self._calls += 1
                rows = stacked if columns is None else stacked[:, columns]
                outputs[ref] = model.predict(np.ascontiguousarray(rows))
            groups.append(ScoredGroup(jobs[0].predictor, jobs, bounds, outputs))
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
