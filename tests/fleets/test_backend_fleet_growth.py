"""The backend-fleet controller's sizing, with an in-process backend (its Raft commands applied to
a local state): ``nodes.target`` (bought at first, idle ones then go down to ``nodes.min``, not
bought again), and ``placement: cluster`` (every instance labelled ``cluster=<fleet>``, created
into one placement group and pinned to the first instance's zone; only from backends that can
place instances together; a waiting multi-node gang gets one instance per job in one fleet,
never spread over fleets, and none where the fleet has no room for all of it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import trio

from meshgpu.control.backend_fleets import BackendFleetController
from meshgpu.fleets.backends import (
    Bootstrap,
    CapacityError,
    InstanceRef,
    Offer,
    Requirements,
    filter_offers,
)
from meshgpu.security import JoinToken
from meshgpu.state.cluster import InitCluster, Replicated, encode_cluster
from meshgpu.state.fleets import AddBackend, ApplyFleet, UpdateFleetInstance
from tests.scheduler._world import resources, submit, task


class FakeBackend:
    """Offers of one 1-GPU type in two zones; records every create."""

    def __init__(self, name: str, cluster_placement: bool = True) -> None:
        self.name, self.cluster_placement = name, cluster_placement
        self.created: list[tuple[Offer, Bootstrap]] = []
        self.refs: list[InstanceRef] = []
        self.full = False  # every create is a capacity error

    def check(self) -> None:
        pass

    def offers(self, req: Requirements) -> list[Offer]:
        out = [
            Offer(self.name, "gpu1", "r1", 1.0, gpu_name="A10", gpu_count=1, cpus=4, memory_gb=16)
        ]
        return filter_offers(out, req)

    def create(self, offer: Offer, bootstrap: Bootstrap) -> InstanceRef:
        if self.full:
            raise CapacityError("no capacity")
        self.created.append((offer, bootstrap))
        # the cloud picks a zone for the first instance; later ones go where they are told
        ref = InstanceRef(
            self.name,
            f"vm-{len(self.created)}",
            offer.region,
            state="running",
            tags=dict(bootstrap.tags),
            zone=offer.zone or "r1-b",
        )
        self.refs.append(ref)
        return ref

    def terminate(self, ref: InstanceRef) -> None:
        self.refs = [r for r in self.refs if r.instance_id != ref.instance_id]

    def list(self, tags: dict[str, str]) -> list[InstanceRef]:
        return [r for r in self.refs if all(r.tags.get(k) == v for k, v in tags.items())]


class LocalProposer:
    def __init__(self, rep: Replicated) -> None:
        self.rep, self.index = rep, 0

    async def propose(self, data: bytes) -> Any:
        self.index += 1
        return self.rep.apply([(self.index, data)])[0]


def _world(
    fleets: dict[str, dict[str, Any]], backends: dict[str, FakeBackend]
) -> tuple[Replicated, BackendFleetController, LocalProposer]:
    rep = Replicated()
    p = LocalProposer(rep)
    init = InitCluster(
        at=1,
        cluster_id="c-test",
        ca_cert_pem="",
        api_token_hash="",
        founder_raft_id=1,
        founder_node_id="n1",
        founder_name="m1",
        founder_peer_address="10.0.0.1:7481",
        founder_api_url="",
    )
    assert rep.apply([(0, encode_cluster(init))])[0].ok
    cmds: list[Any] = [AddBackend(at=1, name=n, type=n, config={}) for n in backends]
    cmds += [ApplyFleet(at=1, name=n, spec=s, hostnames=[]) for n, s in fleets.items()]
    for cmd in cmds:
        assert rep.apply([(0, encode_cluster(cmd))])[0].ok

    async def token(ttl: float) -> str:
        return str(JoinToken.create("c-test", "f" * 16))

    ctl = BackendFleetController(
        None,
        rep.cluster,
        rep.jobs,
        p,  # type: ignore[arg-type]
        token,
        Path("/nonexistent"),
        lambda: Path("/nonexistent/meshgpu.pyz"),
        loader=lambda t, n, c, s: backends[n],
    )
    ctl.agent_file = lambda: Path("/dev/null")  # no agent file to build: a fake backend
    ctl.reconciled |= set(backends)
    return rep, ctl, p


async def _grow_all(ctl: BackendFleetController, fleet: str) -> None:
    f = ctl.cluster.fleets.fleets[fleet]
    await ctl.grow(fleet, ctl._wants(f))
    for iid in list(f.instances):
        await ctl.create(fleet, iid)


async def _account(ctl: BackendFleetController, fleet: str) -> None:
    f = ctl.cluster.fleets.fleets[fleet]
    async with trio.open_nursery() as n:
        ctl._account(f, time.time(), n)
    for inst in list(f.instances.values()):
        if inst.state == "terminating":
            await ctl.terminate(fleet, inst.instance_id)


def _joined(rep: Replicated, fleet: str, idle_since: float) -> None:
    f = rep.cluster.fleets.fleets[fleet]
    for k, inst in enumerate(f.instances.values()):
        upd = UpdateFleetInstance(
            at=2, name=fleet, instance_id=inst.instance_id, state="idle", idle_since=idle_since
        )
        assert rep.apply([(100 + k, encode_cluster(upd))])[0].ok


# --- nodes.target ------------------------------------------------------------------------------


async def test_target_at_first_then_down_to_min_and_not_bought_again() -> None:
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 1, "target": 3, "max": 4}, "idle_duration": 20}
    rep, ctl, _ = _world({"cloud": spec}, {"fake": b})
    f = rep.cluster.fleets.fleets["cloud"]
    assert f.target_left == 3
    assert ctl._wants(f) == [("", None, None)] * 3
    await _grow_all(ctl, "cloud")
    assert len(b.created) == 3 and f.target_left == 0
    assert all(i.for_target for i in f.instances.values())
    assert ctl._wants(f) == []
    # idle past idle_duration: down to nodes.min, never below
    _joined(rep, "cloud", idle_since=time.time() - 60)
    await _account(ctl, "cloud")
    assert len(f.instances) == 1 and len(b.refs) == 1
    assert ctl._wants(f) == []  # the target was the first provisioning only
    # the snapshot keeps what is left of the target (nothing: left out)
    doc = rep.cluster.snapshot_doc()
    assert "target_left" not in next(x for x in doc["fleets"] if x["name"] == "cloud")
    # applied again with a new target: bought up to it
    spec2 = {**spec, "nodes": {"min": 1, "target": 2, "max": 4}}
    assert rep.apply(
        [(200, encode_cluster(ApplyFleet(at=3, name="cloud", spec=spec2, hostnames=[])))]
    )[0].ok
    assert f.target_left == 1 and len(ctl._wants(f)) == 1
    # the same file applied again changes nothing
    assert rep.apply(
        [(201, encode_cluster(ApplyFleet(at=4, name="cloud", spec=spec2, hostnames=[])))]
    )[0].ok
    assert f.target_left == 1


async def test_a_target_instance_with_no_capacity_is_still_to_buy() -> None:
    b = FakeBackend("fake")
    b.full = True
    rep, ctl, _ = _world({"cloud": {"nodes": {"min": 0, "target": 1, "max": 2}}}, {"fake": b})
    f = rep.cluster.fleets.fleets["cloud"]
    await _grow_all(ctl, "cloud")
    assert not f.instances and f.target_left == 1  # forgotten, counted back
    b.full = False
    await _grow_all(ctl, "cloud")
    assert len(b.created) == 1 and f.target_left == 0


# --- placement: cluster ------------------------------------------------------------------------


def _gang(rep: Replicated, name: str, nodes: int, **config: Any) -> list[str]:
    cfg = task(nodes=nodes, resources=resources("A10:1"), **config)
    rep.jobs.apply_command(submit(name, cfg))
    return [j.job_id for j in rep.jobs.run_jobs(rep.jobs.runs[name])]


async def test_a_cluster_fleet_places_its_instances_together() -> None:
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 2, "max": 4}, "placement": "cluster"}
    rep, ctl, _ = _world({"ring": spec}, {"fake": b})
    f = rep.cluster.fleets.fleets["ring"]
    await ctl.grow("ring", ctl._wants(f))
    first, second = sorted(f.instances.values(), key=lambda i: i.num)
    await ctl.create("ring", first.instance_id)
    await ctl.create("ring", second.instance_id)
    (o1, boot1), (o2, boot2) = b.created
    assert boot1.placement_group == boot2.placement_group == "meshgpu-c-test-ring"
    assert o1.zone == "" and first.ref["zone"] == "r1-b"  # the first: where the cloud put it
    assert o2.zone == "r1-b" and second.offer["zone"] == "r1-b"  # the rest: kept there
    for _, boot in b.created:
        assert ",cluster=ring " in boot.user_data or ",cluster=ring'" in boot.user_data


async def test_a_fleet_of_one_makes_no_placement_group() -> None:
    b = FakeBackend("fake")
    rep, ctl, _ = _world(
        {"one": {"nodes": {"min": 1, "target": 1, "max": 1}, "placement": "cluster"}}, {"fake": b}
    )
    await _grow_all(ctl, "one")
    ((_, boot),) = b.created
    assert boot.placement_group == "" and "cluster=one" in boot.user_data


async def test_backends_that_cannot_place_together_are_not_used() -> None:
    can, cannot = FakeBackend("can"), FakeBackend("cannot", cluster_placement=False)
    spec = {"nodes": {"min": 1, "max": 3}, "placement": "cluster"}
    rep, ctl, _ = _world({"ring": spec}, {"can": can, "cannot": cannot})
    f = rep.cluster.fleets.fleets["ring"]
    offers, failed = await ctl.offers_for(f, Requirements())
    assert {o.backend for o in offers} == {"can"}
    assert failed == ["cannot: cannot place instances together (placement: cluster)"]
    rep2, ctl2, _ = _world({"ring": {**spec, "backends": ["cannot"]}}, {"cannot": cannot})
    await ctl2.grow("ring", ctl2._wants(rep2.cluster.fleets.fleets["ring"]))
    assert not rep2.cluster.fleets.fleets["ring"].instances and cannot.created == []


async def test_a_gang_grows_one_cluster_fleet_by_its_size() -> None:
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 0, "max": 4}, "placement": "cluster"}
    rep, ctl, _ = _world({"ring-a": spec, "ring-b": spec}, {"fake": b})
    jobs = _gang(rep, "train", nodes=3)
    a, bb = (rep.cluster.fleets.fleets[n] for n in ("ring-a", "ring-b"))
    wants = ctl._wants(a)
    assert sorted(w[0] for w in wants) == sorted(jobs)  # one instance per job of the gang
    ctl.claimed.update({w[0]: "ring-a" for w in wants})  # what tick does
    assert ctl._wants(bb) == []  # never spread over fleets
    await ctl._guard_grow("ring-a", wants)
    assert not ctl.claimed and len(a.instances) == 3
    assert ctl._wants(bb) == [] and ctl._wants(a) == []  # served by ring-a's instances
    for iid in list(a.instances):
        await ctl.create("ring-a", iid)
    assert {boot.placement_group for _, boot in b.created} == {"meshgpu-c-test-ring-a"}
    # joined (idle, no job yet): they count for the gang, nothing more is bought
    _joined(rep, "ring-a", idle_since=time.time())
    assert ctl._wants(a) == [] and ctl._wants(bb) == []


async def test_a_gang_waits_for_a_fleet_with_room_for_all_of_it() -> None:
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 0, "max": 2}, "placement": "cluster"}
    rep, ctl, p = _world({"small": spec}, {"fake": b})
    jobs = _gang(rep, "train", nodes=3)
    f = rep.cluster.fleets.fleets["small"]
    assert ctl._wants(f) == []
    why = ctl.gang_notes[jobs[0]]
    assert "the 3-node gang needs 3 more instance(s) in one cluster" in why
    assert "nodes.max leaves room for 2" in why
    async with trio.open_nursery() as n:
        ctl.tick(n)
    assert rep.jobs.jobs[jobs[0]].why_pending == why and not f.instances


async def test_a_gang_with_placement_any_is_bought_job_by_job() -> None:
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 0, "max": 2}}
    rep, ctl, _ = _world({"plain": spec}, {"fake": b})
    jobs = _gang(rep, "spread", nodes=2, placement="any")
    f = rep.cluster.fleets.fleets["plain"]
    assert sorted(w[0] for w in ctl._wants(f)) == sorted(jobs)


async def test_a_cluster_gang_does_not_grow_a_fleet_that_is_not_a_cluster() -> None:
    b = FakeBackend("fake")
    rep, ctl, _ = _world({"plain": {"nodes": {"min": 0, "max": 4}}}, {"fake": b})
    _gang(rep, "train", nodes=2)
    assert ctl._wants(rep.cluster.fleets.fleets["plain"]) == []


async def test_the_controllers_own_loop_buys_and_creates_the_target() -> None:
    """``tick`` (what the leader runs every interval), not the steps one by one: a fleet with
    a target gets its instances decided *and* created at the cloud (a loop that decided but
    never created left them pending forever)."""
    b = FakeBackend("fake")
    spec = {"nodes": {"min": 0, "target": 2, "max": 2}}
    rep, ctl, _ = _world({"cloud": spec}, {"fake": b})
    f = rep.cluster.fleets.fleets["cloud"]
    with trio.fail_after(10):
        async with trio.open_nursery() as n:
            while len(b.created) < 2:
                ctl.tick(n)
                await trio.sleep(0.01)
            n.cancel_scope.cancel()
    assert len(b.created) == 2
    assert {i.state for i in f.instances.values()} == {"provisioning"}
