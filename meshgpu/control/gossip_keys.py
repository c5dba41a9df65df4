"""The cluster's gossip keys as a leader controller: install one where there is none (a new
cluster, or one created before gossip existed); a new key once a member is removed (it still
holds the old one), and the old one dropped once the new one has had time to reach everyone.
Every member follows the keys in the replicated state (``meshgpu/mesh/node_gossip.py``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from consensus.core import ProposalDropped
from consensus.node import NotLeader, Timeout
from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.mesh.gossip import new_key
from meshgpu.state.cluster import InstallGossipKey, encode_cluster

if TYPE_CHECKING:
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)


class GossipKeys:
    def __init__(
        self,
        cluster: ClusterState,
        proposer: Proposer,
        install_interval_s: float = 0.2,
        rotate_interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.clock = clock
        self.cluster, self.proposer = cluster, proposer
        self.install_interval_s = install_interval_s  # while the cluster has no key
        self.rotate_interval_s = rotate_interval_s  # how often rotation is considered

    async def run(self) -> None:
        while not self.cluster.gossip_keys:
            try:
                await self.proposer.propose(
                    encode_cluster(InstallGossipKey(at=self.clock.wall(), key_hex=new_key().hex()))
                )
                log.info("installed a cluster gossip key")
            except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
                log.info("gossip key deferred: %s", e)
            await self.clock.sleep(self.install_interval_s)
        while True:
            await self.clock.sleep(self.rotate_interval_s)
            await self.rotate()

    async def rotate(self) -> None:
        cluster = self.cluster
        action = cluster.gossip_key_action(self.clock.wall())
        if action is None:
            return
        if action == "rotate":
            cmd = InstallGossipKey(at=self.clock.wall(), key_hex=new_key().hex())
        else:
            cmd = InstallGossipKey(
                at=self.clock.wall(), key_hex=cluster.gossip_keys[0], retire=True
            )
        try:
            await self.proposer.propose(encode_cluster(cmd))
            log.info(
                "gossip key %s",
                "rotated: a member was removed"
                if action == "rotate"
                else "ring trimmed to the new key",
            )
        except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
            log.info("gossip key change deferred: %s", e)
