"""Who is attached to which job on this host: the SSH server opens and closes sessions, the
inactivity monitor reads how long a job has had none (dstack's ``inactivity_duration``)."""

from __future__ import annotations

from collections.abc import Callable

from meshgpu.clock import SYSTEM_CLOCK, Clock


class SessionTracker:
    """Open SSH sessions (shell, exec, SFTP, port forwards) per job. Event loop only."""

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self.clock = clock
        self._open: dict[str, int] = {}
        self._last: dict[str, float] = {}  # job -> when its last session closed
        self._listeners: list[Callable[[str], None]] = []

    def on_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener(job_id)`` whenever a job's session count changes."""
        self._listeners.append(listener)

    def opened(self, job_id: str) -> None:
        self._open[job_id] = self._open.get(job_id, 0) + 1
        self._notify(job_id)

    def closed(self, job_id: str) -> None:
        left = self._open.get(job_id, 0) - 1
        if left > 0:
            self._open[job_id] = left
        else:
            self._open.pop(job_id, None)
            self._last[job_id] = self.clock.wall()
        self._notify(job_id)

    def sessions(self, job_id: str) -> int:
        return self._open.get(job_id, 0)

    def last_closed(self, job_id: str) -> float | None:
        """When the job's last session closed (None: never had one, or one is open now)."""
        return None if self._open.get(job_id) else self._last.get(job_id)

    def forget(self, job_id: str) -> None:
        self._open.pop(job_id, None)
        self._last.pop(job_id, None)

    def _notify(self, job_id: str) -> None:
        for listener in self._listeners:
            listener(job_id)
