"""The deadline watch: one timer for every waiting request.

A per-request cancel scope costs about 20 us in trio, more than the rest of
an in-process single-event score.  Instead each request registers its job
here and waits on the job alone; this actor fails the jobs whose deadline
has passed.

It sleeps until the earliest deadline of a job not yet done, and never less
than ``TICK``, so expirations that fall close together are handled in one
wake-up and each job fails at most ``TICK`` after its deadline.  A job
registered with a deadline earlier than the one being slept towards moves
the wake-up forward.  Done jobs are dropped unread from the front of the
queues at each wake-up, whatever their deadline: under load nearly every
job is done long before its deadline, so the watch wakes about once per
budget rather than once per tick.  (Waking at each next deadline meant a
wake-up per request or two, a tenth of an in-process score; waking each
tick to drop the done jobs whose deadlines had passed still cost 5%.)

The queues hold at most rate x deadline entries.  Requests on the engine's
default budget register in the order their deadlines fall, so they go in a
FIFO (O(1) each way); only requests that carry a deadline of their own go
in a heap.  With the heap alone, pushing and popping a few thousand pending
entries cost a tenth of an in-process single-event score.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from typing import Any

import trio

from muse._errors import DeadlineExceeded

__all__ = ["DeadlineWatch"]

# The precision of deadlines: a late job fails at most this long after its
# deadline.  2 ms against a 100 ms default budget.
TICK = 0.002


class DeadlineWatch:
    """Fails jobs past their deadline; ``run`` is the actor."""

    def __init__(self, tick: float = TICK) -> None:
        self._tick = tick
        self._heap: list[tuple[float, int, Any]] = []
        self._in_order: deque[tuple[float, Any]] = deque()
        self._count = 0
        self._wakeup = trio.Event()
        # The sleep in progress and what it sleeps towards (inf when none).
        self._sleep: trio.CancelScope | None = None
        self._target = math.inf
        self.expired = 0

    def watch(self, deadline: float, job: Any, *, in_order: bool = False) -> None:
        """Fail ``job`` at ``deadline`` (trio time) unless it is done by then.

        Args:
            deadline: when, in trio time.
            job: has ``done`` (true once answered) and ``expire() -> bool``.
            in_order: the caller promises this deadline is no earlier than
                any it registered before with ``in_order`` (one fixed budget
                added to a clock that never goes back).
        """
        idle = not self._heap and not self._in_order
        if in_order:
            self._in_order.append((deadline, job))
        else:
            heapq.heappush(self._heap, (deadline, self._count, job))
            self._count += 1
        if idle:
            self._wakeup.set()
        elif deadline < self._target and self._sleep is not None:
            self._target = deadline
            self._sleep.deadline = deadline

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire jobs until cancelled."""
        task_status.started()
        heap, in_order = self._heap, self._in_order
        while True:
            if not heap and not in_order:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            first = min(
                heap[0][0] if heap else math.inf,
                in_order[0][0] if in_order else math.inf,
            )
            self._target = max(first, trio.current_time() + self._tick)
            with trio.CancelScope(deadline=self._target) as self._sleep:
                await trio.sleep_forever()
            self._sleep, self._target = None, math.inf
            now = trio.current_time()
            while heap and (heap[0][2].done or heap[0][0] <= now):
                job = heapq.heappop(heap)[2]
                if not job.done:
                    self._expire(job)
            while in_order:
                deadline, job = in_order[0]
                if job.done:
                    in_order.popleft()
                elif deadline <= now:
                    in_order.popleft()
                    self._expire(job)
                else:
                    break

    def _expire(self, job: Any) -> None:
        if job.expire():
            self.expired += 1

    def statistics(self) -> dict[str, int]:
        return {
            "watched": len(self._heap) + len(self._in_order),
            "expired": self.expired,
        }


def deadline_error(budget_ms: float) -> DeadlineExceeded:
    """The error a job past its deadline fails with."""
    return DeadlineExceeded(f"no answer within the deadline of {budget_ms:g} ms")
