"""Lifeguard's local health awareness (LHA-Probe): a member that keeps missing acks and nacks
suspects itself before it suspects others.

memberlist ``awareness.go``: a score in ``[0, max_multiplier - 1]``; probe intervals (and the
wait for indirect acks, which ends with the interval) are multiplied by ``score + 1``. The prober
adds the number of nacks it expected but did not get after a failed probe (1 if no peer could
nack), adds 1 each time it must refute an accusation, and subtracts 1 after each successful
probe. A member whose event loop is slow misses the nacks of healthy peers, so its score rises
and it waits longer before accusing anyone: fewer false suspicions from the member least able to
judge.
"""

from __future__ import annotations


class Awareness:
    """A bounded health score; 0 is healthy. ``enabled=False`` pins it at 0 (classic SWIM)."""

    __slots__ = ("_enabled", "_max", "_score")

    def __init__(self, max_multiplier: int, *, enabled: bool = True) -> None:
        self._max = max_multiplier
        self._enabled = enabled
        self._score = 0

    @property
    def score(self) -> int:
        """The current score, ``0`` (healthy) to ``max_multiplier - 1``."""
        return self._score

    def apply_delta(self, delta: int) -> None:
        """Raise (positive) or lower (negative) the score, clamped to its bounds."""
        if self._enabled:
            self._score = min(max(self._score + delta, 0), self._max - 1)

    def scale(self, timeout: float) -> float:
        """``timeout`` stretched by the score: ``timeout * (score + 1)``."""
        return timeout * (self._score + 1)
