"""RaftNode: the trio runtime over real DiskStorage, several members in one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from consensus.kv import KVStateMachine, put
from consensus.node import Duplicate, NodeOptions, RaftNode, Timeout, bootstrap_storage
from consensus.storage import DiskStorage
from tests.consensus._localnet import LocalNet

OPTS = dict(tick_s=0.01, election_tick=10, propose_retry_s=0.5)


class Cluster:
    def __init__(self, tmp: Path, nursery: trio.Nursery, ids: list[int]) -> None:
        self.tmp, self.nursery, self.ids = tmp, nursery, ids
        self.net = LocalNet()
        self.scopes: dict[int, trio.CancelScope] = {}
        self.nodes: dict[int, RaftNode] = {}

    async def start(self, nid: int, voters: list[int] | None = None, **opts: object) -> RaftNode:
        d = str(self.tmp / f"n{nid}")
        storage = (
            bootstrap_storage(d, voters if voters is not None else self.ids)
            if voters != []
            else DiskStorage(d)
        )
        node = RaftNode(
            nid, storage, KVStateMachine(), options=NodeOptions(seed=nid, **(OPTS | opts))
        )  # type: ignore[arg-type]
        self.net.join(node)
        self.nodes[nid] = node
        scope = trio.CancelScope()
        self.scopes[nid] = scope

        async def runner(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await node.run(task_status=task_status)
            storage.close()

        await self.nursery.start(runner)
        return node

    def kill(self, nid: int) -> None:
        self.net.leave(nid)
        self.scopes[nid].cancel()

    async def leader(self, among: list[int] | None = None) -> RaftNode:
        ids = among or list(self.nodes)
        with trio.fail_after(10):
            while True:
                leaders = [
                    self.nodes[i]
                    for i in ids
                    if i in self.net.nodes and self.nodes[i].role.name == "LEADER"
                ]
                if len(leaders) == 1 and all(
                    self.nodes[i].leader == leaders[0].id for i in ids if i in self.net.nodes
                ):
                    return leaders[0]
                await trio.sleep(0.01)


@pytest.fixture
async def cluster(tmp_path: Path, nursery: trio.Nursery) -> Cluster:
    c = Cluster(tmp_path, nursery, [1, 2, 3])
    for i in c.ids:
        await c.start(i)
    return c


async def test_propose_through_every_member_and_reads(cluster: Cluster) -> None:
    leader = await cluster.leader()
    for nid, node in cluster.nodes.items():
        assert await node.propose(put(f"k{nid}", nid), timeout=5) is True
    for node in cluster.nodes.values():
        idx = await node.read_index(timeout=5)
        assert idx >= 4
        assert {k: node.fsm.get(k) for k in ("k1", "k2", "k3")} == {"k1": 1, "k2": 2, "k3": 3}
    assert leader.status()["role"] == "leader" and leader.status()["commit"] >= 4


async def test_request_id_applies_once_even_through_another_member(cluster: Cluster) -> None:
    await cluster.leader()
    rid = b"client-42-req-1"
    first = await cluster.nodes[1].propose(put("x", 1), request_id=rid, timeout=5)
    await cluster.nodes[2].propose(put("x", 2), timeout=5)
    # Once node 3 has applied the first (else its waiter is answered by that application).
    await cluster.nodes[3].read_index(timeout=5)
    again = await cluster.nodes[3].propose(put("x", 1), request_id=rid, timeout=5)
    assert first is True and isinstance(again, Duplicate)
    await cluster.nodes[1].read_index()
    assert cluster.nodes[1].fsm.get("x") == 2  # the retry did not overwrite the later write


async def test_a_duplicate_after_a_restart_says_its_result_is_unknown(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Results live in memory; a node that learned of a request only through a snapshot knows
    the request id was applied (the dedup window is in snapshots) but not what it returned: it
    must say so rather than answer None as if that were the result."""
    cluster = Cluster(tmp_path, nursery, [1, 2, 3])
    for i in cluster.ids:
        await cluster.start(i, snapshot_every=5)
    await cluster.leader()
    cluster.kill(3)
    rid = b"client-7-cas-1"
    assert await cluster.nodes[2].propose(put("y", 1), request_id=rid, timeout=5) is True
    again = await cluster.nodes[2].propose(put("y", 1), request_id=rid, timeout=5)
    assert isinstance(again, Duplicate) and again.known and again.result is True, again
    for i in range(30):  # snapshots and compaction: node 3 catches up from a snapshot
        await cluster.nodes[1].propose(put(f"z{i}", i), timeout=5)
    back = await cluster.start(3, snapshot_every=5)
    with trio.fail_after(10):
        while back.fsm.get("z29") != 29:
            await trio.sleep(0.01)
    late = await back.propose(put("y", 1), request_id=rid, timeout=5)
    assert isinstance(late, Duplicate) and not late.known and late.result is None, late


async def test_leader_killed_survivors_elect_and_it_restarts_from_disk(cluster: Cluster) -> None:
    old = await cluster.leader()
    for i in range(20):
        await old.propose(put(f"a{i}", i), timeout=5)
    cluster.kill(old.id)
    rest = [i for i in cluster.ids if i != old.id]
    new = await cluster.leader(rest)
    assert new.id != old.id
    assert await new.propose(put("after", 1), timeout=5) is True
    back = await cluster.start(old.id)
    with trio.fail_after(10):
        while back.fsm.get("after") != 1:
            await trio.sleep(0.01)
    assert all(back.fsm.get(f"a{i}") == i for i in range(20))


async def test_proposals_are_held_while_there_is_no_quorum(
    cluster: Cluster, nursery: trio.Nursery
) -> None:
    leader = await cluster.leader()
    others = [i for i in cluster.ids if i != leader.id]
    cluster.kill(others[0])
    cluster.kill(others[1])
    with pytest.raises(Timeout):
        await leader.propose(put("timed-out", 1), timeout=0.5)
    results: list[object] = []

    async def held() -> None:
        results.append(await leader.propose(put("held", 1), timeout=15))

    nursery.start_soon(held)
    await trio.sleep(0.3)
    assert results == []  # still held: no quorum
    back = await cluster.start(others[0])
    with trio.fail_after(15):
        while not results:
            await trio.sleep(0.01)
    assert results == [True]
    with trio.fail_after(10):
        while back.fsm.get("held") != 1:
            await trio.sleep(0.01)
    # The request that timed out was in the leader's log: it may take effect later, once.
    assert back.fsm.get("timed-out") in (None, 1)


async def test_partitioned_leader_steps_down_and_heals(cluster: Cluster) -> None:
    old = await cluster.leader()
    cluster.net.isolate(old.id)
    rest = [i for i in cluster.ids if i != old.id]
    new = await cluster.leader(rest)
    await new.propose(put("during", 1), timeout=5)
    with trio.fail_after(5):
        while old.role.name == "LEADER":  # CheckQuorum
            await trio.sleep(0.01)
    cluster.net.heal()
    with trio.fail_after(10):
        while old.fsm.get("during") != 1:
            await trio.sleep(0.01)


async def test_membership_learner_promote_remove_and_snapshot_catch_up(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    c = Cluster(tmp_path, nursery, [1, 2, 3])
    for i in c.ids:
        await c.start(i, snapshot_every=50)
    leader = await c.leader()
    for i in range(120):  # past two snapshots: the new member must be sent one
        await leader.propose(put(f"k{i}", i), timeout=5)
    new = await c.start(4, voters=[])
    await leader.add_learner(4, "local:4")
    with trio.fail_after(10):
        while new.fsm.get("k119") != 119:
            await trio.sleep(0.01)
    assert leader.status()["learners"] == [4]
    await leader.promote(4)
    assert leader.status()["voters"] == [1, 2, 3, 4]
    await leader.remove(4)
    assert leader.status()["voters"] == [1, 2, 3]


async def test_transfer_leadership(cluster: Cluster) -> None:
    leader = await cluster.leader()
    target = next(i for i in cluster.ids if i != leader.id)
    await leader.transfer_leadership(target)
    assert (await cluster.leader()).id == target


class _SlowSnapshots(KVStateMachine):
    """A KV state machine whose snapshot encoding waits on ``release`` (in the worker thread the
    node runs it in): while it waits, the owner task must go on applying."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.release = threading.Event()
        self.encoding = threading.Event()

    def snapshot_view(self):  # type: ignore[no-untyped-def]
        data = self.snapshot()  # the copy, taken in the owner task

        def encode() -> bytes:
            self.encoding.set()
            assert self.release.wait(10)
            return data

        return encode


async def test_a_snapshot_is_encoded_and_written_off_the_owner_task(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    d = str(tmp_path / "n1")
    fsm = _SlowSnapshots()
    opts = NodeOptions(seed=1, **(OPTS | {"snapshot_every": 5}))  # type: ignore[arg-type]
    node = RaftNode(1, bootstrap_storage(d, [1]), fsm, options=opts)
    LocalNet().join(node)
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with scope:
            await node.run(task_status=task_status)

    await nursery.start(run)
    node.campaign()
    with trio.fail_after(5):
        while node.role.name != "LEADER":
            await trio.sleep(0.01)
    for i in range(6):
        await node.propose(put(f"a{i}", i), timeout=5)
    await trio.to_thread.run_sync(fsm.encoding.wait, 5)
    # The encoding is stuck in its thread; the owner still commits and applies, and followers
    # of the applied index hear of it.
    applied = node.applied
    waiting = trio.Event()
    seen: list[int] = []

    async def follow() -> None:
        waiting.set()
        seen.append(await node.wait_applied(after=applied))

    nursery.start_soon(follow)
    await waiting.wait()
    with trio.fail_after(5):
        for i in range(6, 20):
            assert await node.propose(put(f"a{i}", i), timeout=5) is True
    assert seen and seen[0] > applied
    assert node.storage.snapshot().metadata.index == 0  # not adopted before it is durable
    fsm.release.set()
    with trio.fail_after(5):
        while node.storage.snapshot().metadata.index == 0:
            await trio.sleep(0.01)
    snap_index = node.storage.snapshot().metadata.index
    assert snap_index >= 5 and node.storage.first_index() == snap_index + 1
    scope.cancel()
    await trio.sleep(0.05)
    node.storage.close()
    # From disk: the snapshot, then the entries after it.
    back = DiskStorage(d)
    on_disk = back.snapshot().metadata.index  # a later snapshot may have followed
    assert on_disk >= snap_index and back.first_index() == on_disk + 1
    assert back.last_index() >= 20
    back.close()
