"""The clock of the trio shells above the pure cores (executor, fencing, retention, membership).

``now()`` is trio's clock (monotonic: intervals, deadlines, what ``trio.sleep`` counts);
``wall()`` is epoch seconds (what goes into the replicated state: ``at``, ``finished_at``).
Code that waits or reads the time takes a ``Clock`` rather than calling ``time.time`` or
``trio.sleep`` itself, so that a test runs it under trio's ``MockClock`` with a ``FakeClock``:
backoffs, grace periods and retention then pass in milliseconds, and wall time moves with
trio time (one autojump moves both).
"""

from __future__ import annotations

import time

import trio


class Clock:
    """The real clock."""

    def now(self) -> float:
        return trio.current_time()

    def wall(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    async def sleep_until(self, deadline: float) -> None:
        """Until ``deadline`` on ``now()``'s scale."""
        await trio.sleep_until(deadline)


class FakeClock(Clock):
    """For tests under ``trio.testing.MockClock``: wall time is ``epoch`` plus trio time, so it
    advances exactly as far as the mock clock jumps."""

    def __init__(self, epoch: float = 1_700_000_000.0) -> None:
        self.epoch = epoch

    def wall(self) -> float:
        return self.epoch + trio.current_time()


SYSTEM_CLOCK = Clock()
