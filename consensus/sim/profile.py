"""Per-seed choices: how hostile the world is and how the cores are tuned.

Drawn from the seed's own "profile" stream, so every seed explores a different mix (a lossy
network with tiny messages, a clean one with many crashes, ...) and a failing seed brings its mix
back on replay.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from consensus.core import Config

from .network import NetworkProfile

TICK_US = 10_000
"""Nominal tick: 10 ms of virtual time, so an election timeout of 10 ticks is 100 ms."""


@dataclass(slots=True)
class Profile:
    network: NetworkProfile = field(default_factory=NetworkProfile)
    core: Config = field(default_factory=lambda: Config(id=1))
    tick_skew: float = 0.1
    """Each node's tick interval is the nominal one times a factor in [1 - skew, 1 + skew]."""
    crash_weight: float = 1.0
    partition_weight: float = 1.0
    pause_weight: float = 1.0
    nemesis_mean_us: int = 120_000
    fault_max_us: int = 1_000_000
    """Partitions and pauses last up to this long before they heal by themselves."""
    crash_in_ready: float = 0.0
    """Probability that a leader crashes part-way through a Ready that carries new entries or a
    commit: after persisting, after sending some of its messages, or before applying."""
    crash_new_leader: float = 0.0
    """The same, for the first Ready of a new leader (its empty entry and first appends)."""
    kill_new_leader: float = 0.0
    """Probability that a newly elected leader crashes within a few milliseconds: the shape of
    the Figure 8 scenario, where a leader dies while replicating entries of older terms."""
    tear_probability: float = 0.5
    slow_disk: float = 0.01
    """Probability that one fsync takes 5-60 ms."""
    workload_mean_us: int = 6_000
    payload_max: int = 64
    conf_change_weight: float = 3.0
    transfer_weight: float = 2.0
    compact_weight: float = 6.0
    read_weight: float = 12.0


def draw_profile(rng: random.Random) -> Profile:
    p = Profile()
    p.network = NetworkProfile(
        loss=rng.choice([0.0, 0.0, 0.01, 0.05, 0.15]),
        duplicate=rng.choice([0.0, 0.01, 0.05]),
        long_tail=rng.choice([0.0, 0.01, 0.05, 0.15]),
    )
    p.core = Config(
        id=1,
        election_tick=rng.choice([5, 10]),
        heartbeat_tick=rng.choice([1, 1, 2]),
        pre_vote=rng.random() < 0.85,
        check_quorum=rng.random() < 0.85,
        max_size_per_msg=rng.choice([0, 100, 1024, 1 << 20]),
        max_inflight_msgs=rng.choice([1, 2, 16, 256]),
        max_inflight_bytes=rng.choice([0, 2048, 8 << 20]),
        max_uncommitted_entries_size=rng.choice([0, 800, 1 << 24]),
        max_committed_size_per_ready=rng.choice([64, 1 << 20]),
    )
    if 0 < p.core.max_inflight_bytes < p.core.max_size_per_msg:
        p.core.max_inflight_bytes = p.core.max_size_per_msg
    p.tick_skew = rng.choice([0.0, 0.05, 0.2])
    p.crash_weight = rng.choice([0.0, 0.5, 1.5])
    p.partition_weight = rng.choice([0.5, 1.0, 3.0])
    p.pause_weight = rng.choice([0.0, 0.5, 1.5])
    p.nemesis_mean_us = rng.choice([60_000, 150_000, 400_000])
    p.fault_max_us = rng.choice([200_000, 1_000_000, 3_000_000])
    p.kill_new_leader = rng.choice([0.0, 0.2, 0.5])
    p.crash_in_ready = rng.choice([0.0, 0.002, 0.01, 0.03])
    p.crash_new_leader = rng.choice([0.05, 0.2]) if p.crash_in_ready else 0.0
    p.tear_probability = rng.choice([0.0, 0.5, 0.9])
    p.slow_disk = rng.choice([0.0, 0.01, 0.05])
    if rng.random() < 0.2:
        # Flapping: partitions change every election timeout or so, so leaders come and go
        # while their entries are half replicated (the raw material of Figure 8).
        p.nemesis_mean_us = rng.choice([50_000, 150_000])
        p.fault_max_us = rng.choice([100_000, 300_000])
        p.partition_weight = 4.0
    p.workload_mean_us = rng.choice([2_000, 6_000, 20_000])
    p.payload_max = rng.choice([16, 64, 400])
    return p
