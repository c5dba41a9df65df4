"""What the simulated clients do (workload) and what the world does to the cluster (nemesis)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from consensus.core import ConfChange, ConfChangeType, ProposalDropped, Role

from . import events
from .checker import encode_state
from .node import SimNode

if TYPE_CHECKING:
    from .simulator import Simulator

MIN_VOTERS = 3
MAX_LEARNERS = 2


def alive(sim: Simulator) -> list[SimNode]:
    return [n for n in sim.nodes.values() if n.alive]


def current_leader(sim: Simulator) -> SimNode | None:
    """The live node that believes it leads at the highest term (stale leaders exist)."""
    best: SimNode | None = None
    best_term = -1
    for n in sim.nodes.values():
        r = n.rn.raft if n.rn is not None else None
        if r is not None and r.role is Role.LEADER and r.term > best_term:
            best, best_term = n, r.term
    return best


# -- workload -------------------------------------------------------------------------------
def workload(sim: Simulator) -> None:
    rng = sim.rng_work
    p = sim.profile
    choice = rng.choices(
        ("propose", "read", "conf", "transfer", "compact"),
        weights=(70.0, p.read_weight, p.conf_change_weight, p.transfer_weight, p.compact_weight),
    )[0]
    if choice == "propose":
        propose(sim)
    elif choice == "read":
        read(sim)
    elif choice == "conf":
        conf_change(sim)
    elif choice == "transfer":
        transfer(sim)
    else:
        compact(sim)


def pick_target(sim: Simulator) -> SimNode | None:
    """Clients mostly talk to the leader they know, sometimes to any member."""
    rng = sim.rng_work
    nodes = alive(sim)
    if not nodes:
        return None
    leader = current_leader(sim)
    if leader is not None and rng.random() < 0.7:
        return leader
    return nodes[rng.randrange(len(nodes))]


def propose(sim: Simulator) -> None:
    n = pick_target(sim)
    if n is None or n.rn is None:
        return
    rng = sim.rng_work
    sim.count("proposals")
    data = b"p%d.%d|" % (n.id, sim.stats["proposals"]) + b"x" * rng.randrange(
        sim.profile.payload_max
    )
    try:
        n.rn.propose(data)
        sim.log(f"n{n.id} propose {data[:16]!r}")
    except ProposalDropped as e:
        sim.count(f"dropped_{e.reason.name.lower()}")
        sim.log(f"n{n.id} propose dropped: {e.reason.name}")
    sim.after_action(n)


def read(sim: Simulator) -> None:
    n = pick_target(sim)
    if n is None or n.rn is None:
        return
    sim.count("reads")
    ctx = b"r%d" % sim.stats["reads"]
    floor = sim.checker.max_commit
    try:
        n.rn.read_index(ctx)
        n.reads[ctx] = floor
        sim.log(f"n{n.id} read-index {ctx.decode()} floor={floor}")
    except ProposalDropped as e:
        sim.count(f"read_dropped_{e.reason.name.lower()}")
    sim.after_action(n)


def conf_change(sim: Simulator) -> None:
    leader = current_leader(sim)
    if leader is None or leader.rn is None:
        return
    rng = sim.rng_work
    cs = leader.rn.raft.log.conf_state
    voters, learners = sorted(cs.voters), sorted(cs.learners)
    max_voters = max(MIN_VOTERS, sim.n_initial + 1)
    options: list[tuple[ConfChangeType, int]] = []
    if len(learners) < MAX_LEARNERS:
        options.append((ConfChangeType.ADD_LEARNER, sim.next_id))
    for nid in learners:
        options.append((ConfChangeType.REMOVE, nid))
        if len(voters) < max_voters:
            options.append((ConfChangeType.ADD_VOTER, nid))
    if len(voters) > MIN_VOTERS:
        for nid in voters:
            options.append((ConfChangeType.REMOVE, nid))
            options.append((ConfChangeType.ADD_LEARNER, nid))
    if rng.random() < 0.05 and cs.removed:
        # Exercise the refusal of a reused ID.
        options = [(ConfChangeType.ADD_LEARNER, min(cs.removed))]
    if not options:
        return
    typ, nid = options[rng.randrange(len(options))]
    fresh = nid == sim.next_id
    if fresh:
        sim.next_id += 1
        sim.add_node(nid, None)
    sim.count("conf_changes")
    try:
        leader.rn.propose_conf_change(ConfChange(typ, nid))
        sim.log(f"n{leader.id} propose-conf {typ.value} {nid}")
    except ProposalDropped as e:
        sim.count(f"conf_dropped_{e.reason.name.lower()}")
        sim.log(f"n{leader.id} propose-conf {typ.value} {nid} dropped: {e.reason.name}")
    sim.after_action(leader)


def transfer(sim: Simulator) -> None:
    leader = current_leader(sim)
    if leader is None or leader.rn is None:
        return
    voters = sorted(v for v in leader.rn.raft.trk.voters if v != leader.id)
    if not voters:
        return
    to = voters[sim.rng_work.randrange(len(voters))]
    sim.count("transfers")
    try:
        leader.rn.transfer_leader(to)
        sim.log(f"n{leader.id} transfer-leader to n{to}")
    except ProposalDropped as e:
        sim.count(f"transfer_dropped_{e.reason.name.lower()}")
    sim.after_action(leader)


def compact(sim: Simulator) -> None:
    nodes = alive(sim)
    if not nodes:
        return
    rng = sim.rng_work
    n = nodes[rng.randrange(len(nodes))]
    assert n.rn is not None
    rlog = n.rn.raft.log
    snap_index = rlog.first_index() - 1
    applied = rlog.applied
    if applied - snap_index < 4:
        return
    idx = applied - rng.randrange(min(8, applied - snap_index))
    ref = sim.checker.applied.get(idx)
    if ref is None:  # pragma: no cover - every applied index is recorded
        return
    snap = n.rn.compact(idx, encode_state(idx, ref[2]))
    n.disk.compact(snap)
    sim.count("compactions")
    sim.log(f"n{n.id} compact to {idx}")
    sim.after_action(n)


# -- nemesis --------------------------------------------------------------------------------
def nemesis(sim: Simulator) -> None:
    rng = sim.rng_fault
    p = sim.profile
    kinds = (
        "crash",
        "crash_leader",
        "crash_all",
        "split",
        "asymmetric",
        "isolate_leader",
        "isolate",
        "heal",
        "pause",
        "pause_leader",
    )
    weights = (
        p.crash_weight,
        p.crash_weight,
        p.crash_weight * 0.05,
        p.partition_weight,
        p.partition_weight * 0.5,
        p.partition_weight,
        p.partition_weight * 0.5,
        0.5,
        p.pause_weight,
        p.pause_weight,
    )
    kind = rng.choices(kinds, weights=weights)[0]
    ids = sorted(sim.nodes)
    leader = current_leader(sim)
    if kind in ("crash", "crash_leader"):
        victims = alive(sim)
        if kind == "crash_leader" and leader is not None:
            victims = [leader]
        down = len(sim.nodes) - len(alive(sim))
        # Usually keep a majority up so that there is progress to disrupt; crash_all and the
        # odd extra crash still explore restarts without a quorum.
        if down >= (len(sim.nodes) - 1) // 2 and rng.random() < 0.8:
            victims = []
        if victims:
            crash(sim, victims[rng.randrange(len(victims))])
    elif kind == "crash_all":
        for n in alive(sim):
            crash(sim, n)
    if kind in ("split", "asymmetric", "isolate_leader", "isolate"):
        # Partitions heal by themselves after a while (any heal ends all of them).
        sim.push(sim.now + rng.randrange(20_000, p.fault_max_us), events.HEAL_NETWORK)
    if kind == "split":
        shuffled = ids[:]
        rng.shuffle(shuffled)
        cut = rng.randrange(1, len(shuffled)) if len(shuffled) > 1 else 1
        sim.net.split(shuffled[:cut], shuffled[cut:])
        sim.log(f"partition {shuffled[:cut]} | {shuffled[cut:]}")
    elif kind == "asymmetric":
        for _ in range(rng.randrange(1, len(ids) + 1)):
            a, b = rng.choice(ids), rng.choice(ids)
            if a != b:
                sim.net.block(a, b)
                sim.log(f"block {a}->{b}")
    elif kind in ("isolate_leader", "isolate"):
        target = leader if kind == "isolate_leader" and leader is not None else None
        if target is None:
            target = sim.nodes[rng.choice(ids)]
        sim.net.isolate(target.id, ids)
        sim.log(f"isolate n{target.id}")
    elif kind == "heal":
        sim.net.heal()
        sim.log("heal network")
    else:
        victims = alive(sim)
        if kind == "pause_leader" and leader is not None:
            victims = [leader]
        if victims:
            n = victims[rng.randrange(len(victims))]
            sim.pause(n, sim.now + rng.randrange(5_000, max(10_000, p.fault_max_us // 2)))


def crash(sim: Simulator, n: SimNode) -> None:
    rng = sim.rng_fault
    kept = n.disk.crash(sim.rng_disk, sim.profile.tear_probability)
    n.stop()
    sim.count("crashes")
    sim.log(f"crash n{n.id} (kept {kept} unsynced records)")
    sim.push(sim.now + rng.randrange(10_000, 400_000), events.RESTART, n.id)
