"""One simulated member: a real ``RawNode`` driven exactly as the Ready contract says.

The runtime model is the one ``consensus/node.py`` will implement: take a Ready, write it, wait for
the fsync (the node keeps stepping messages and ticks meanwhile), then send, apply, and
``advance``. The state machine is a running checksum of the applied payloads, which is all the
checker needs to compare nodes.
"""

from __future__ import annotations

import random

from consensus.core import Config, ConfState, MemoryStorage, RawNode

from .checker import decode_state
from .disk import Disk


class SimNode:
    __slots__ = (
        "id",
        "disk",
        "storage",
        "rn",
        "alive",
        "incarnation",
        "busy",
        "paused_until",
        "tick_us",
        "sm_index",
        "sm_chain",
        "last_commit",
        "led_term",
        "reads",
        "config_template",
        "tick_gen",
        "deferred",
    )

    def __init__(
        self, nid: int, bootstrap: ConfState | None, tick_us: int, template: Config
    ) -> None:
        self.id = nid
        self.disk = Disk(bootstrap)
        self.storage: MemoryStorage = self.disk.load()
        self.rn: RawNode | None = None
        self.alive = False
        self.incarnation = 0
        self.busy = None  # the Ready whose fsync is in flight
        self.paused_until = 0
        self.tick_us = tick_us
        self.sm_index = 0
        self.sm_chain = 0
        self.last_commit = 0
        self.led_term = -1
        self.reads: dict[bytes, int] = {}
        self.config_template = template
        self.tick_gen = 0  # identifies the live chain of tick events
        self.deferred: list[tuple[int, object, object]] = []  # events held during a pause

    def start(self, seed: int) -> None:
        """Boot (or reboot) from the durable state, with a fresh per-incarnation RNG stream."""
        self.incarnation += 1
        self.tick_gen += 1
        self.storage = self.disk.load()
        t = self.config_template
        cfg = Config(
            id=self.id,
            election_tick=t.election_tick,
            heartbeat_tick=t.heartbeat_tick,
            pre_vote=t.pre_vote,
            check_quorum=t.check_quorum,
            max_size_per_msg=t.max_size_per_msg,
            max_inflight_msgs=t.max_inflight_msgs,
            max_inflight_bytes=t.max_inflight_bytes,
            max_uncommitted_entries_size=t.max_uncommitted_entries_size,
            max_committed_size_per_ready=t.max_committed_size_per_ready,
            rng=random.Random(f"{seed}/core/{self.id}/{self.incarnation}"),
        )
        self.rn = RawNode(cfg, self.storage)
        self.alive = True
        self.busy = None
        # The state machine is volatile: it comes back from the snapshot and is replayed.
        snap = self.disk.snapshot
        if snap.data:
            self.sm_index, self.sm_chain = decode_state(snap.data)
        else:
            self.sm_index, self.sm_chain = snap.metadata.index, 0
        self.reads = {}

    def stop(self) -> None:
        self.deferred = []
        self.paused_until = 0
        self.rn = None
        self.alive = False
        self.busy = None
        self.reads = {}
