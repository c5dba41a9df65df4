"""How the leader combines Raft and gossip liveness, what hosts put in their gossip metadata, and
where the cluster's gossip key lives. Pure: no sockets, no clock."""

from __future__ import annotations

import pytest

from meshgpu.gpu import FakeProvider
from meshgpu.mesh.gossip import Gossip, GossipConfig, MemberInfo, MemberState
from meshgpu.mesh.membership import host_status
from meshgpu.mesh.node_meta import build_meta, decisive, gpu_summary, parse_meta, variants
from meshgpu.state.cluster import ClusterState, InstallGossipKey

ELECTION, GRACE = 2.0, 30.0
NOW = 1000.0
A, D, L, S = MemberState.ALIVE, MemberState.DEAD, MemberState.LEFT, MemberState.SUSPECT


def member(state: MemberState, for_s: float = 0.0, **meta: object) -> MemberInfo:
    return MemberInfo("n1", ("10.0.0.1", 7481), 5, state, NOW - for_s, dict(meta))


@pytest.mark.parametrize(
    ("raft_silent", "gossip", "expected"),
    [
        # Both say alive; a short Raft silence is nothing.
        (0.5, member(A), "active"),
        (0.5, None, "active"),  # gossip cannot vouch: Raft alone, as before gossip
        # Either signal is enough to stop placing work there.
        (5.0, member(A), "unreachable"),
        (0.5, member(D), "unreachable"),
        (0.5, member(L), "unreachable"),
        # Dead only when Raft has been silent for the grace period and gossip agrees ...
        (31.0, member(D), "dead"),
        (31.0, member(L), "dead"),
        (31.0, None, "dead"),
        (10.0, member(D, for_s=60), "unreachable"),  # gossip alone does not shorten the grace
        # ... or when the host says it has fenced its jobs (cut off from the leader).
        (31.0, member(A, f=1), "dead"),
        # A host gossip still hears, that has not fenced, runs its jobs: never declared dead.
        (31.0, member(A), "unreachable"),
        (3600.0, member(S), "unreachable"),
        # No Raft signal (not in the configuration): gossip alone, with the same grace.
        (None, member(A), "active"),
        (None, member(S), "active"),
        (None, member(D, for_s=5), "unreachable"),
        (None, member(D, for_s=31), "dead"),
        (None, None, "keep"),
        (float("inf"), None, "dead"),  # never heard at all
    ],
)
def test_host_status_combines_raft_and_gossip(
    raft_silent: float | None, gossip: MemberInfo | None, expected: str
) -> None:
    got = host_status(raft_silent, gossip, NOW, election_s=ELECTION, grace_s=GRACE)
    assert got == expected


def test_a_new_leader_gives_every_host_a_full_grace_before_declaring_it_dead() -> None:
    def status(watched_s: float) -> str:
        return host_status(
            100.0, member(D), NOW, election_s=ELECTION, grace_s=GRACE, watched_s=watched_s
        )

    # Long silent (heard last by the old leader), but watched for less than the grace period:
    # unreachable at once (no new work), dead only after a full grace.
    assert status(5.0) == "unreachable"
    assert status(31.0) == "dead"


def test_metadata_round_trips_and_fits_a_datagram() -> None:
    fake = FakeProvider("8xH100:80GB", seed="x")
    fake.set_busy({0, 1})
    fake.set_state(3, xid=79)
    fake.set_state(5, ecc_uncorrected=1)
    meta = build_meta(
        raft_id=7,
        name="gpu-host-7",
        api_url="http://10.0.0.7:7480",
        labels={"zone": "a", "rack": "r12"},
        gpus=fake.inventory(),
        telemetry=fake.telemetry(),
        busy={0, 1},
        cut_off=False,
    )
    # It fits the core's limits with room to spare (the core raises MetaTooLarge otherwise).
    Gossip("a" * 12, ("10.0.0.7", 7481), meta, GossipConfig.lan())
    got = parse_meta(meta)
    assert (got.raft_id, got.name, got.labels, got.gpus) == (
        7,
        "gpu-host-7",
        {"zone": "a", "rack": "r12"},
        "8xH100:80GB",
    )
    assert got.unhealthy == {3: "XID 79", 5: "1 uncorrected ECC errors"}
    assert got.busy == (0, 1) and not got.cut_off
    rows = {r["index"]: r for r in got.telemetry}
    assert rows[0]["utilization_pct"] > 50 and not rows[3]["healthy"] and rows[2]["healthy"]
    # Telemetry alone is not decisive; health, load and fencing are.
    cooler = dict(meta) | {"t": [[0, 1, 1, 30]]}
    assert decisive(cooler) == decisive(meta)
    assert decisive(meta | {"f": 1}) != decisive(meta)
    # Trimming keeps what the leader acts on.
    smallest = list(variants(meta))[-1]
    assert "t" not in smallest and "l" not in smallest
    assert set(parse_meta(smallest).unhealthy or {}) == {3, 5}


def test_metadata_from_a_stranger_reads_as_absent_not_as_an_error() -> None:
    got = parse_meta({"r": "seven", "h": "all good", "b": [1, "x"], "t": [[1, 2]], "f": True})
    assert got.raft_id is None and got.unhealthy is None and got.busy == (1,)
    assert got.telemetry == () and not got.cut_off
    assert parse_meta({"h": [[0, "XID 79"], ["x", "y"]]}).unhealthy == {0: "XID 79"}
    assert parse_meta({}).unhealthy is None  # reports no health: the leader leaves it alone
    assert gpu_summary([]) == ""


def test_the_gossip_key_lives_in_the_replicated_cluster_state() -> None:
    cluster = ClusterState()
    first, second, third = (f"{i:064x}" for i in (1, 2, 3))
    for key in (first, second, third):
        assert cluster.apply_cmd(InstallGossipKey(at=1.0, key_hex=key)).ok
    # The newest seals; the one before still opens packets in flight; older ones are gone.
    assert cluster.gossip_keys == [third, second]
    copy = ClusterState()
    copy.restore_doc(cluster.snapshot_doc())
    assert copy.gossip_keys == [third, second]
    with pytest.raises(ValueError):
        InstallGossipKey(at=1.0, key_hex="not-a-key")


def test_removing_a_member_rotates_the_gossip_key_then_retires_the_old_one() -> None:
    """A removed host still holds the gossip key: the leader installs a new one, and once every
    member has had time to apply it, drops the old one, after which the removed host's packets
    no longer open."""
    from meshgpu.state.cluster import Member, RemoveMember

    cluster = ClusterState()
    for rid in (1, 2, 3):
        cluster.members[rid] = Member(
            raft_id=rid,
            node_id=f"n{rid}",
            name=f"n{rid}",
            peer_address=f"10.0.0.{rid}:7481",
            api_url=f"http://10.0.0.{rid}:7480",
            joined_at=0.0,
        )
    old, new = f"{1:064x}", f"{2:064x}"
    assert cluster.apply_cmd(InstallGossipKey(at=10.0, key_hex=old)).ok
    assert cluster.gossip_key_action(now=1000.0) is None  # nothing to do
    assert cluster.apply_cmd(RemoveMember(at=20.0, raft_id=3)).ok
    assert cluster.gossip_key_action(now=21.0) == "rotate"
    assert cluster.apply_cmd(InstallGossipKey(at=22.0, key_hex=new)).ok
    assert cluster.gossip_keys == [new, old]  # both open packets while the rotation spreads
    assert cluster.gossip_key_action(now=30.0) is None
    assert cluster.gossip_key_action(now=52.0) == "retire"
    # Only the primary may be kept alone (a stale retire changes nothing).
    assert not cluster.apply_cmd(InstallGossipKey(at=52.0, key_hex=old, retire=True)).ok
    assert cluster.apply_cmd(InstallGossipKey(at=52.0, key_hex=new, retire=True)).ok
    assert cluster.gossip_keys == [new] and cluster.gossip_key_action(now=99.0) is None
    copy = ClusterState()
    copy.restore_doc(cluster.snapshot_doc())
    assert (copy.gossip_keys, copy.gossip_key_removed, copy.gossip_key_at) == ([new], 1, 22.0)
