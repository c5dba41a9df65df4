"""On every host: delete the files of jobs and code archives the state no longer names (the
leader's retention controller prunes the state; this follows it on disk)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from meshgpu.clock import SYSTEM_CLOCK, Clock

if TYPE_CHECKING:
    from meshgpu.runner.code import CodeStore
    from meshgpu.runner.executor import Executor
    from meshgpu.state import StateMachine


class Housekeeping:
    def __init__(
        self,
        state: StateMachine,
        executor: Executor,
        code: CodeStore,
        interval_s: float = 10.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.state, self.executor, self.code = state, executor, code
        self.interval_s = interval_s  # the retention controller's (--retention-interval-ms)
        self.clock = clock

    async def run(self) -> None:
        while True:
            await self.clock.sleep(self.interval_s)
            await trio.to_thread.run_sync(self.executor.collect, self.executor.known_jobs())
            referenced = {r.code.sha256 for r in self.state.runs.values() if r.code is not None}
            await trio.to_thread.run_sync(self.code.collect, referenced)
