"""The RPS autoscaler's rule, pure (no clock, no I/O): dstack's ``RPSAutoscaler``.

    desired = ceil(requests completed in the last ``window`` / window / target), clipped to
    the group's [min, max]

A change up waits ``scale_up_delay`` since the group's last change, down ``scale_down_delay``;
from zero, up is immediate (dstack), and a request held for a service with no replica wanted
(scale-to-zero activation) brings a group at zero to ``max(1, min)`` at once. Without request
statistics the count is kept.

The request rate comes from the ingresses' cumulative per-node counters, sampled by the leader
(``RateHistory``): per node, the increase since the previous sample counts; a counter that went
down is a restarted agent (its counter starts over), whose new value is the increase; a node
seen for the first time only sets its baseline. The history is the leader's own memory -- a new
leader starts with none, and keeps the counts until it has seen requests: a window it has not
observed in full can justify scaling up (the requests seen are a lower bound) but not down.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from meshgpu.config.spec import Scaling


@dataclass(frozen=True, slots=True)
class Rate:
    """Requests per second over a window, and whether the history covered the whole window."""

    rps: float
    full_window: bool


class RateHistory:
    """One service's completed requests over time, from per-node cumulative counters."""

    def __init__(self, keep_s: float) -> None:
        self.keep_s = keep_s  # samples older than this are dropped (the longest window)
        self.total = 0  # requests counted since this history began
        self.samples: deque[tuple[float, int]] = deque()  # (time, total)
        self._last: dict[str, int] = {}  # node -> its counter at the previous sample

    def observe(self, now: float, counters: Mapping[str, int]) -> None:
        """A sample at ``now``: node -> cumulative completed requests (nodes missing from it --
        not heard from now -- add nothing and keep their last value)."""
        for node, value in counters.items():
            last = self._last.get(node)
            if last is not None:
                self.total += value - last if value >= last else value  # went down: a restart
            self._last[node] = value
        self.samples.append((now, self.total))
        while len(self.samples) > 2 and self.samples[1][0] <= now - self.keep_s:
            self.samples.popleft()

    def rate(self, now: float, window_s: float) -> Rate | None:
        """The rate over ``[now - window_s, now]``; None without two samples (no statistics)."""
        if len(self.samples) < 2 or window_s <= 0:
            return None
        start = now - window_s
        # The newest sample at or before the window's start (the oldest one if none is).
        base_t, base = self.samples[0]
        for t, total in self.samples:
            if t > start:
                break
            base_t, base = t, total
        return Rate((self.total - base) / window_s, full_window=base_t <= start)


def desired_replicas(
    *,
    scaling: Scaling | None,
    low: int,
    high: int,
    current: int,
    since_scaled_s: float,
    rate: Rate | None,
    waiting: bool = False,
) -> int:
    """The replica count a group should have now. ``current``: its count in the state;
    ``since_scaled_s``: seconds since it last changed; ``rate``: the service's requests per
    second (None: no statistics); ``waiting``: requests are held for a replica."""
    if scaling is None:
        return current
    if current == 0 and waiting and high > 0:
        return max(1, low)
    if rate is None:
        return current
    wanted = math.ceil(rate.rps / scaling.target) if scaling.target > 0 else current
    wanted = max(low, min(high, wanted))
    if wanted > current:
        if current == 0 or since_scaled_s >= scaling.scale_up_delay_s:
            return wanted
    elif wanted < current and rate.full_window and since_scaled_s >= scaling.scale_down_delay_s:
        return wanted
    return current
