"""The deadline watch, on trio's virtual clock."""

from __future__ import annotations

import trio
import trio.testing

from muse._deadlines import TICK, DeadlineWatch


class _Job:
    def __init__(self) -> None:
        self.done = False
        self.expired_at: float | None = None

    def expire(self) -> bool:
        if self.done:
            return False
        self.expired_at = trio.current_time()
        return True


async def test_deadline_watch_expires_each_job_within_a_tick_of_its_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = DeadlineWatch()
    start = trio.current_time()
    in_order = [_Job() for _ in range(5)]
    own = {0.5: _Job(), 0.01: _Job(), 0.2: _Job()}
    finished = _Job()
    finished.done = True

    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        for k, job in enumerate(in_order):
            watch.watch(start + 0.1 * (k + 1), job, in_order=True)
        watch.watch(start + 0.3, finished, in_order=True)
        for budget, job in own.items():
            watch.watch(start + budget, job)
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()

    for k, job in enumerate(in_order):
        assert job.expired_at is not None
        assert 0 <= job.expired_at - (start + 0.1 * (k + 1)) <= TICK + 1e-9
    for budget, job in own.items():
        assert job.expired_at is not None
        assert 0 <= job.expired_at - (start + budget) <= TICK + 1e-9
    assert finished.expired_at is None
    assert watch.expired == len(in_order) + len(own)
    assert watch.statistics() == {"watched": 0, "expired": 8}


async def test_an_earlier_in_order_deadline_moves_the_wake_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The watch sleeping towards a far deadline of its own wakes for an
    in-order one that falls earlier."""
    watch = DeadlineWatch()
    start = trio.current_time()
    far, near = _Job(), _Job()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        watch.watch(start + 5.0, far)
        await trio.sleep(0.05)  # the watch now sleeps towards start + 5
        watch.watch(start + 0.1, near, in_order=True)
        await trio.sleep(0.5)
        assert near.expired_at is not None
        assert 0 <= near.expired_at - (start + 0.1) <= TICK + 1e-9
        assert far.expired_at is None
        nursery.cancel_scope.cancel()
