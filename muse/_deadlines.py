"""The deadline watch: one timer for every waiting request.

A per-request cancel scope costs about 20 us in trio, more than the rest of
an in-process single-event score.  Instead each request registers its job
here and waits on the job alone; this actor fails the jobs whose deadline
has passed.  It wakes at the earliest deadline, and at least every ``TICK``
while jobs are pending, so a request with a shorter deadline than those
already waiting is still failed within ``TICK`` of its own deadline.

Finished jobs stay in the heap until their deadline comes and are then
dropped unread; the heap holds at most rate x deadline entries.
"""

from __future__ import annotations

import heapq
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
        self._count = 0
        self._wakeup = trio.Event()
        self.expired = 0

    def watch(self, deadline: float, job: Any) -> None:
        """Fail ``job`` at ``deadline`` (trio time) unless it is done by then."""
        heapq.heappush(self._heap, (deadline, self._count, job))
        self._count += 1
        if len(self._heap) == 1:
            self._wakeup.set()

    async def run(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Expire jobs until cancelled."""
        task_status.started()
        heap = self._heap
        while True:
            if not heap:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                continue
            now = trio.current_time()
            await trio.sleep_until(min(heap[0][0], now + self._tick))
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                job = heapq.heappop(heap)[2]
                if job.expire():
                    self.expired += 1

    def statistics(self) -> dict[str, int]:
        return {"watched": len(self._heap), "expired": self.expired}


def deadline_error(budget_ms: float) -> DeadlineExceeded:
    """The error a job past its deadline fails with."""
    return DeadlineExceeded(f"no answer within the deadline of {budget_ms:g} ms")
