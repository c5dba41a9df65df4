"""Lifeguard's dynamic suspicion timeout (LHA-Suspicion): the more members independently
suspect a member, the sooner it is declared dead.

memberlist ``suspicion.go``: a suspicion starts with the *maximum* timeout and shrinks toward the
minimum as independent confirmations arrive::

    timeout(n) = max(min, max - log(n + 1) / log(k + 1) * (max - min))

where ``n`` counts distinct confirmers other than the original accuser and ``k`` is how many
confirmations drive it to the minimum (``suspicion_mult - 2``; 0 when the cluster is too small
to provide them, which starts the timer at the minimum). The deadline is measured from when the
suspicion started, so a late confirmation can make it due at once. A single slow member's
accusation, which nobody confirms, thus takes ``suspicion_max_timeout_mult`` times longer to
become a death: time enough for the accused to hear of it and refute.

With Lifeguard off the timeout is fixed at the minimum, as in SWIM.
"""

from __future__ import annotations

import math


def suspicion_timeout(n: int, k: int, min_timeout: float, max_timeout: float) -> float:
    """Total timeout after ``n`` confirmations out of ``k`` wanted (memberlist
    ``remainingSuspicionTime`` without the elapsed part; truncated to milliseconds like Go)."""
    if k < 1:
        return min_timeout
    frac = math.log(n + 1.0) / math.log(k + 1.0)
    raw = max_timeout - frac * (max_timeout - min_timeout)
    return max(min_timeout, math.floor(1000.0 * raw) / 1000.0)


class Suspicion:
    """One member's suspicion of another: who confirmed it and when it expires."""

    __slots__ = ("_confirmers", "_k", "_max", "_min", "n", "start", "deadline", "incarnation")

    def __init__(
        self,
        accuser: str,
        incarnation: int,
        start: float,
        k: int,
        min_timeout: float,
        max_timeout: float,
    ) -> None:
        self._k = k
        self._min = min_timeout
        self._max = max_timeout
        # The accuser is excluded from confirmations: a member repeating its own accusation must
        # not shorten the timer.
        self._confirmers = {accuser}
        self.n = 0
        """Independent confirmations so far."""
        self.start = start
        self.incarnation = incarnation
        """The incarnation the suspicion is about (a refutation must beat it)."""
        self.deadline = start + (max_timeout if k >= 1 else min_timeout)
        """When the suspected member is declared dead unless it refutes first."""

    def confirm(self, sender: str) -> bool:
        """Count ``sender``'s accusation; ``True`` when it is new (then re-gossip it, so that
        confirmations reach everyone) and the deadline may have moved closer."""
        if self.n >= self._k or sender in self._confirmers:
            return False
        self._confirmers.add(sender)
        self.n += 1
        self.deadline = self.start + suspicion_timeout(self.n, self._k, self._min, self._max)
        return True
