"""Capped exponential reconnect backoff with jitter."""

from __future__ import annotations

import random


class Backoff:
    """Delays ``initial, 2*initial, 4*initial, ...`` capped at ``maximum``, each drawn uniformly
    from its upper half ("equal jitter"): never shorter than half the nominal delay, so a dead
    peer is not hammered, and spread out so that every node of a cluster does not redial a
    restarted peer in the same millisecond."""

    __slots__ = ("_attempt", "_initial", "_maximum", "_rng")

    def __init__(self, initial: float, maximum: float, rng: random.Random) -> None:
        self._initial = initial
        self._maximum = maximum
        self._rng = rng
        self._attempt = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; each call counts as one more failure."""
        # min() on the exponent keeps 2**attempt from growing without bound on a long outage.
        nominal = min(self._maximum, self._initial * 2 ** min(self._attempt, 62))
        self._attempt += 1
        return self._rng.uniform(nominal / 2, nominal)

    def reset(self) -> None:
        """Back to ``initial`` (after a connection proved healthy)."""
        self._attempt = 0
