"""Auto-stop, the pure part: when a job on this host must end by dstack's rules (reference
§6), decided from what the host knows -- its SSH sessions (``SessionTracker``) and its GPU
telemetry samples -- at a given time. No I/O, no clock of its own: ``monitor.py`` runs it.

- ``inactivity_duration`` (dev environments): no SSH session open for that long ends the job
  with ``inactivity_duration_exceeded``. Idle time counts from when the last session closed, or
  from the job's start when it never had one.
- ``utilization_policy``: look at the samples of the job's GPUs in ``[now - time_window, now]``
  (and since the job started here); with too little data (the oldest sample more than a minute
  after the window's start) nothing is decided; if *any one* GPU has every sample below
  ``min_gpu_utilization``, the job ends with ``terminated_due_to_utilization_policy``.
"""

from __future__ import annotations

import bisect
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshgpu.config.spec import RunSpec

INACTIVITY = "inactivity_duration_exceeded"
UTILIZATION = "terminated_due_to_utilization_policy"
# dstack skips the utilization check when the oldest sample in the window is more than this
# after the window's start (not enough data yet: the job just started, or telemetry stalled).
ENOUGH_DATA_SLACK_S = 60.0


@dataclass(frozen=True, slots=True)
class JobActivityView:
    """What the monitor knows of one local job's SSH activity."""

    sessions: int  # open now (this agent's tracker)
    idle_since: float | None  # when it became idle (None: a session is open)


def idle_since(
    *,
    started_at: float,
    tracked_sessions: int,
    tracked_last_closed: float | None,
    tracked_ever: bool,
    replicated_inactive_since: float | None,
    replicated_sessions: int,
    monitor_started: float,
) -> float | None:
    """Since when a job has had no SSH session (None: one is open now).

    This agent's tracker is the truth for what it saw. A job it has seen no session of since
    it started may have had some before (this agent restarted: its SSH server, and so every
    session, went with it): then the replicated activity says when the last one closed, and a
    job that had sessions open when the agent went down counts as idle from the agent's start.
    """
    if tracked_sessions > 0:
        return None
    if tracked_ever and tracked_last_closed is not None:
        return max(tracked_last_closed, started_at)
    candidates = [started_at]
    if replicated_sessions > 0:
        candidates.append(monitor_started)
    elif replicated_inactive_since is not None:
        candidates.append(replicated_inactive_since)
    return max(candidates)


def inactivity_deadline(spec: RunSpec, idle_from: float | None) -> float | None:
    """When the job must end for inactivity (None: never, as things stand)."""
    if spec.inactivity_duration_s is None or idle_from is None:
        return None
    return idle_from + spec.inactivity_duration_s


class GPUSamples:
    """This host's GPU utilization samples (time, {gpu index: percent}), oldest first, kept
    for ``keep_s`` (the longest window any local job needs, plus slack). Fed by the telemetry
    the agent already takes for gossip (``MeshGossip``, every couple of seconds)."""

    def __init__(self, keep_s: float = 3600.0, max_samples: int = 100_000) -> None:
        self.keep_s = keep_s
        self._times: deque[float] = deque(maxlen=max_samples)
        self._values: deque[Mapping[int, float]] = deque(maxlen=max_samples)

    def add(self, at: float, utilization: Mapping[int, float]) -> None:
        if self._times and at < self._times[-1]:
            return  # the clock stepped back: keep the series ordered
        self._times.append(at)
        self._values.append(dict(utilization))
        horizon = at - self.keep_s
        while self._times and self._times[0] < horizon:
            self._times.popleft()
            self._values.popleft()

    def between(self, start: float, end: float) -> list[tuple[float, Mapping[int, float]]]:
        """Samples taken in ``[start, end]``, oldest first."""
        times = list(self._times)
        lo = bisect.bisect_left(times, start)
        hi = bisect.bisect_right(times, end)
        values = list(self._values)
        return list(zip(times[lo:hi], values[lo:hi], strict=True))

    def __len__(self) -> int:
        return len(self._times)


def below_utilization(
    samples: Iterable[tuple[float, Mapping[int, float]]],
    gpus: Iterable[int],
    *,
    window_start: float,
    min_utilization: float,
    slack_s: float = ENOUGH_DATA_SLACK_S,
) -> int | None:
    """dstack's ``_should_terminate_due_to_low_gpu_util``: the index of a GPU whose every
    sample in the window is below ``min_utilization`` (None: none, or too little data to say).

    ``samples`` are the window's (``GPUSamples.between``); a GPU missing from a sample (the
    driver did not report it) does not count for that sample."""
    rows = list(samples)
    if not rows or rows[0][0] > window_start + slack_s:
        return None
    for index in sorted(set(gpus)):
        values = [row[index] for _, row in rows if row.get(index) is not None]
        if values and all(v < min_utilization for v in values):
            return index
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    reason: str
    message: str


def decide(
    *,
    spec: RunSpec,
    now: float,
    started_at: float,
    idle_from: float | None,
    gpus: Iterable[int],
    samples: GPUSamples | None,
    window_scale: float = 1.0,
) -> Verdict | None:
    """Whether a running job must end now, and why (None: it goes on).

    ``window_scale`` shrinks the utilization window and its slack (a hidden agent option for
    tests: dstack's minimum window is five minutes)."""
    deadline = inactivity_deadline(spec, idle_from)
    if deadline is not None and now >= deadline:
        return Verdict(
            INACTIVITY,
            f"no SSH session for {now - (idle_from or now):.0f}s "
            f"(inactivity_duration {spec.inactivity_duration_s}s)",
        )
    rule = spec.utilization
    indices = list(gpus)
    if rule is not None and indices and samples is not None:
        window = rule.time_window_s * window_scale
        start = now - window
        if started_at > start + ENOUGH_DATA_SLACK_S * window_scale:
            return None  # not running long enough here for a full window
        gpu = below_utilization(
            samples.between(max(start, started_at), now),
            indices,
            window_start=start,
            min_utilization=rule.min_gpu_utilization,
            slack_s=ENOUGH_DATA_SLACK_S * window_scale,
        )
        if gpu is not None:
            return Verdict(
                UTILIZATION,
                f"GPU {gpu} below {rule.min_gpu_utilization}% utilization for "
                f"{rule.time_window_s}s (utilization_policy)",
            )
    return None
