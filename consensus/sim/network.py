"""The simulated network: per-message delay with a long tail, loss, duplication, partitions.

Delay is a small base plus an exponential tail, and now and then a much longer delay, so that
messages between the same two nodes are reordered. Partitions block directed links: a symmetric
partition blocks both directions, an asymmetric one only some. All randomness comes from the
network's own stream, so adding a fault type elsewhere does not perturb message timing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(slots=True)
class NetworkProfile:
    loss: float = 0.0
    duplicate: float = 0.0
    long_tail: float = 0.0
    """Probability that a message takes a long detour (reordering)."""
    base_us: int = 200
    jitter_mean_us: float = 700.0
    long_min_us: int = 20_000
    long_max_us: int = 250_000


class Network:
    __slots__ = ("rng", "profile", "blocked", "clean")

    def __init__(self, rng: random.Random, profile: NetworkProfile) -> None:
        self.rng = rng
        self.profile = profile
        self.blocked: set[tuple[int, int]] = set()
        self.clean = False  # after healing: no loss, no duplicates, no long tail

    def link_up(self, frm: int, to: int) -> bool:
        return (frm, to) not in self.blocked

    def deliveries(self, frm: int, to: int) -> list[int]:
        """Delays (µs) of the copies of one message from ``frm`` to ``to``; empty if lost."""
        if (frm, to) in self.blocked:
            return []
        p = self.profile
        rng = self.rng
        if self.clean:
            return [p.base_us + int(rng.expovariate(1.0 / p.jitter_mean_us))]
        if p.loss and rng.random() < p.loss:
            return []
        copies = 2 if p.duplicate and rng.random() < p.duplicate else 1
        out = []
        for _ in range(copies):
            d = p.base_us + int(rng.expovariate(1.0 / p.jitter_mean_us))
            if p.long_tail and rng.random() < p.long_tail:
                d += rng.randrange(p.long_min_us, p.long_max_us)
            out.append(d)
        return out

    # -- partitions -------------------------------------------------------------------------
    def heal(self) -> None:
        self.blocked.clear()

    def split(self, side_a: list[int], side_b: list[int]) -> None:
        for a in side_a:
            for b in side_b:
                self.blocked.add((a, b))
                self.blocked.add((b, a))

    def isolate(self, node: int, others: list[int]) -> None:
        self.split([node], [o for o in others if o != node])

    def block(self, frm: int, to: int) -> None:
        self.blocked.add((frm, to))
