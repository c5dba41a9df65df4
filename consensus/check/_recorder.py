"""Record a history from live clients (trio tasks or threads) for a later `check()`.

A client calls `invoke` just before it sends a request and `ok`/`fail`/`info` just after it learns
the outcome; the recorder stamps both with its clock. The interval it records must contain the
moment the operation really took effect, so stamp the invocation *before* the request leaves and
the completion *after* the reply arrives. Anything that leaves the outcome unknown (a timeout, a
dropped connection, a cancelled task) is `info`, never `fail`: `fail` claims the operation
certainly had no effect, and a wrong claim makes the checker report violations that are not there.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

from ._history import History, Op, Outcome

__all__ = ["Call", "Recorder"]


class Recorder:
    """Collects invocations and completions; safe to share between threads and trio tasks.

    `clock` gives the timestamps (any monotonic clock shared by all clients: `time.monotonic`
    across threads, `trio.current_time` within one trio run, a simulator's virtual clock). Every
    method also accepts an explicit `at=` time, for callers that stamp events themselves.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        # handle -> [client, input, call, ret, outcome, output]; ret/outcome None while open
        self._calls: list[list[Any]] = []

    def invoke(self, client: Hashable, input: Any, *, at: float | None = None) -> int:
        """Record that `client` is about to issue `input`; returns the handle to complete."""
        with self._lock:
            stamp = self._clock() if at is None else at
            self._calls.append([client, input, stamp, None, None, None])
            return len(self._calls) - 1

    def complete(
        self, handle: int, outcome: Outcome, output: Any = None, *, at: float | None = None
    ) -> None:
        """Record how the operation `handle` ended."""
        with self._lock:
            stamp = self._clock() if at is None else at
            entry = self._calls[handle]
            if entry[4] is not None:
                raise ValueError(f"operation {handle} was already completed ({entry[4].value})")
            if stamp < entry[2]:
                raise ValueError(f"operation {handle} completes at {stamp} before its invocation")
            entry[3], entry[4], entry[5] = stamp, outcome, output

    def ok(self, handle: int, output: Any = None, *, at: float | None = None) -> None:
        """The operation took effect and returned `output`."""
        self.complete(handle, Outcome.OK, output, at=at)

    def fail(self, handle: int, *, at: float | None = None) -> None:
        """The operation certainly did not take effect."""
        self.complete(handle, Outcome.FAIL, at=at)

    def info(self, handle: int, *, at: float | None = None) -> None:
        """The outcome is unknown: it may take effect at any time from now on, or never."""
        self.complete(handle, Outcome.INFO, at=at)

    @contextmanager
    def operation(self, client: Hashable, input: Any) -> Iterator[Call]:
        """Invoke on entry; on exit, an operation not completed through the yielded `Call`
        (for example because an exception or a trio cancellation escaped) is recorded as
        `info`, its outcome unknown. Exceptions propagate."""
        call = Call(self, self.invoke(client, input))
        try:
            yield call
        finally:
            if not call.done:
                call.info()

    def history(self) -> History:
        """The operations so far; those still open are `info` (they may yet take effect)."""
        with self._lock:
            calls = [list(entry) for entry in self._calls]
        ops = []
        for client, input, call, ret, outcome, output in calls:
            if outcome is None:
                ops.append(Op(client, input, None, call, None, Outcome.INFO))
            else:
                ops.append(Op(client, input, output, call, ret, outcome))
        return History(ops)

    def __len__(self) -> int:
        with self._lock:
            return len(self._calls)


class Call:
    """One recorded operation in progress, from `Recorder.operation`."""

    __slots__ = ("_recorder", "done", "handle")

    def __init__(self, recorder: Recorder, handle: int) -> None:
        self._recorder = recorder
        self.handle = handle
        self.done = False

    def ok(self, output: Any = None) -> None:
        """The operation took effect and returned `output`."""
        self._recorder.ok(self.handle, output)
        self.done = True

    def fail(self) -> None:
        """The operation certainly did not take effect."""
        self._recorder.fail(self.handle)
        self.done = True

    def info(self) -> None:
        """The outcome is unknown."""
        self._recorder.info(self.handle)
        self.done = True
