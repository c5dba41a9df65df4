"""An in-process network for RaftNode tests: delivers ``send`` to peers' ``deliver``, with
partitions. No sockets, so many nodes fit in one trio run."""

from __future__ import annotations

from collections.abc import Sequence

from consensus.core import Message
from consensus.node import RaftNode


class LocalNet:
    def __init__(self) -> None:
        self.nodes: dict[int, RaftNode] = {}
        self.cut: set[tuple[int, int]] = set()

    def join(self, node: RaftNode) -> None:
        self.nodes[node.id] = node
        node.attach(_Port(self, node.id))

    def leave(self, node_id: int) -> None:
        self.nodes.pop(node_id, None)

    def isolate(self, node_id: int) -> None:
        for other in range(1, 64):
            if other != node_id:
                self.cut.add((node_id, other))
                self.cut.add((other, node_id))

    def heal(self) -> None:
        self.cut.clear()


class _Port:
    def __init__(self, net: LocalNet, me: int) -> None:
        self.net, self.me = net, me

    def send(self, messages: Sequence[Message]) -> None:
        for m in messages:
            target = self.net.nodes.get(m.to)
            if target is None or (self.me, m.to) in self.net.cut:
                me = self.net.nodes.get(self.me)
                if me is not None and m.snapshot is not None:
                    me.report_snapshot(m.to, False)
                continue
            target.deliver(m)
            if m.snapshot is not None:
                self.net.nodes[self.me].report_snapshot(m.to, True)

    def set_peer_address(self, node_id: int, address: str) -> None:
        pass
