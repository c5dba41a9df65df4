"""The leader's verdicts on a silent host under a fake clock (trio's MockClock, autojump): with
the production grace period (30 s), a host heard over Raft until t=0 (and no gossip to vouch) is
marked unreachable after two election timeouts and dead -- its jobs fail over -- a grace period
after the leader began watching it, not before; the test takes milliseconds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from consensus.core import Role
from meshgpu.clock import FakeClock
from meshgpu.mesh.membership import MembershipManager, MembershipPolicy
from meshgpu.state.cluster import (
    CLUSTER_TAG,
    ClusterState,
    Member,
    NodeUnreachable,
    SetNodeStatus,
    decode_cluster,
)


async def test_a_silent_host_is_unreachable_then_dead_after_the_grace_period(
    autojump_clock: trio.abc.Clock,
) -> None:
    policy = MembershipPolicy()
    cluster = ClusterState()
    for rid, name in ((1, "a"), (2, "b")):
        cluster.members[rid] = Member(
            raft_id=rid, node_id=name, name=name, peer_address="", api_url="", joined_at=0.0
        )
    jobs = SimpleNamespace(
        nodes={n: SimpleNamespace(status="active", gpus=[], name=n) for n in ("a", "b")}
    )
    node = SimpleNamespace(
        id=1,
        role=Role.LEADER,
        leader_since=0.0,
        last_heard={2: 0.0},
        watch_since={},
        options=SimpleNamespace(tick_s=0.1, election_tick=10),
        status=lambda: {
            "voters": [1],
            "learners": [2],
            "progress": {2: {"match": 0}},
            "commit": 100,
        },
    )
    decided: list[tuple[float, Any]] = []
    clock = FakeClock()

    async def propose(data: bytes) -> None:
        cmd = decode_cluster(data[len(CLUSTER_TAG) :])
        decided.append((trio.current_time(), cmd))
        status = "dead" if isinstance(cmd, NodeUnreachable) else cmd.status
        jobs.nodes[cmd.node_id].status = status

    manager = MembershipManager(
        node, cluster, None, lambda: {}, propose, policy, jobs=jobs, clock=clock
    )  # type: ignore[arg-type]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(manager.run)
        # This leader starts watching the host once it has led for an election timeout (2 s)
        # and gives it a full grace period from then.
        await trio.sleep(policy.dead_grace_s + 1.5)
        assert [type(c) for _, c in decided] == [SetNodeStatus]
        at, cmd = decided[0]
        assert cmd.status == "unreachable" and 2.0 < at <= 3.0  # two election timeouts
        assert cmd.at == clock.epoch + at  # stamped with the (fake) wall clock
        await trio.sleep(1.5)
        assert [type(c) for _, c in decided] == [SetNodeStatus, NodeUnreachable]
        at, cmd = decided[1]
        assert cmd.node_id == "b" and policy.dead_grace_s + 2.0 <= at <= policy.dead_grace_s + 3.0
        assert jobs.nodes["b"].status == "dead" and jobs.nodes["a"].status == "active"
        nursery.cancel_scope.cancel()
