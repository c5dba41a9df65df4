"""Free capacity, indexed so that finding a host costs what a placement touches.

Hosts with identical hardware and placement-relevant labels form a *class*: whether a job can
ever run on a host is decided once per (class, requirement), not per host. Inside a class, hosts
sit in buckets by free units (GPUs, or blocks on hosts split into blocks), so a job that needs
``n`` looks at buckets ``n, n+1, ...`` -- best fit, which keeps whole hosts free for whole-host jobs
-- and never scans hosts that are full or can never run it.

The index outlives a plan: it is part of the scheduler's ``SchedulerIndex`` (``index.py``) and is
brought up to date before each plan from the nodes the state's change feed noted, so a plan pays
for the nodes whose record or holdings changed, not for the whole mesh. What a plan changes in
it (tentative placements, reservations) is rolled back when the plan ends. Buckets and classes are kept in canonical order
(node id, class signature), so a plan depends only on the state, never on the index's history.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from meshgpu.config.spec import NO_SPEC, RunSpec
from meshgpu.scheduler.blocks import BlockShape, block_shape
from meshgpu.scheduler.deadlines import INF, Deadlines
from meshgpu.scheduler.filters import LABEL_KEYS, cluster_of
from meshgpu.scheduler.matching import Req, StaticFit, pick_gpus, static_fit
from meshgpu.state.machine import StateMachine
from meshgpu.state.records import JobRecord, JobStatus, NodeRecord


class Reservation:
    """A blocked gang's claim on hosts: nothing may land there that would still hold them at
    ``start`` beyond ``slack`` units (the rule is in ``backfill.py``)."""

    __slots__ = ("gang", "start", "need", "slack", "matching", "after", "preempting")

    def __init__(
        self, gang: tuple[str, int], start: float, after: int = 0, preempting: bool = False
    ) -> None:
        self.gang = gang  # (run_name, replica_num)
        self.start = start  # when the gang can start there at the latest (INF: unknown)
        self.need: dict[str, int] = {}  # node_id -> units the gang needs there
        self.slack: dict[str, int] = {}  # node_id -> units others may still take
        self.matching: dict[str, frozenset[int] | None] = {}  # node_id -> GPUs that count
        self.after = after  # assignments the plan had made when this was taken
        self.preempting = preempting  # the gang waits for preempted (stopping) jobs

    def __repr__(self) -> str:
        return f"Reservation({self.gang}, start={self.start}, need={self.need}, slack={self.slack})"


class HostClass:
    """Hosts alike in everything placement looks at: their members by free units."""

    __slots__ = ("sig", "key", "uid", "cluster", "rep", "shape", "members", "buckets", "top")

    def __init__(
        self, sig: tuple[Any, ...], uid: int, node: NodeRecord, shape: BlockShape | None
    ) -> None:
        self.sig = sig
        self.key = repr(sig)  # canonical order of classes
        self.uid = uid
        self.cluster = cluster_of(node)
        self.rep = node  # any member: static checks only look at what all members share
        self.shape = shape
        self.members: list[str] = []  # node ids, sorted
        top = shape.total if shape is not None else sum(1 for g in node.gpus if g.healthy)
        self.buckets: list[list[str]] = [[] for _ in range(top + 1)]  # by free units, sorted
        self.top = -1  # the highest non-empty bucket (-1: none)

    def add(self, node_id: str, units: int) -> None:
        bisect.insort(self.buckets[units], node_id)
        if units > self.top:
            self.top = units

    def discard(self, node_id: str, units: int) -> None:
        _remove(self.buckets[units], node_id)
        while self.top >= 0 and not self.buckets[self.top]:
            self.top -= 1


class Host:
    """One active node: what it has free (after the current plan's decisions so far)."""

    __slots__ = (
        "node",
        "node_id",
        "healthy",
        "shape",
        "cls",
        "free",
        "free_blocks",
        "units",
        "held",
        "planned",
        "reservation",
        "ends",
        "ends_key",
        "rel",
        "prof",
        "victims",
        "runs",
    )

    def __init__(self, node: NodeRecord, cls: HostClass, held: tuple[JobRecord, ...]) -> None:
        self.node = node
        self.node_id = node.node_id
        self.shape = cls.shape
        self.cls = cls
        self.healthy = frozenset(g.index for g in node.gpus if g.healthy)
        self.held = held
        self.planned: list[tuple[float, tuple[int, ...], int]] = []
        self.reservation: Reservation | None = None
        self.ends: Any = None  # (running deadlines, stopping jobs): see Capacity.releases
        self.ends_key: Any = None
        self.rel: tuple[Any, list[tuple[float, tuple[int, ...], int]]] | None = None
        self.prof: tuple[Any, tuple[int, float], list[float]] | None = None
        self.victims: Any = None  # the preemption module's per-host cache
        self.runs = frozenset(j.run_name for j in held)  # whose jobs it holds (spread)
        used = {i for j in held for i in j.gpu_indices}
        self.free = set(self.healthy - used)
        if self.shape is not None:
            blocks = self.shape.total - sum(j.blocks for j in held)
            if self.shape.gpus:  # a block whose GPUs are unhealthy cannot be handed out
                blocks = min(blocks, len(self.free) // self.shape.gpus)
            self.free_blocks = max(blocks, 0)
            self.units = self.free_blocks
        else:
            self.free_blocks = 0
            self.units = len(self.free)


def _signature(node: NodeRecord, shape: BlockShape | None) -> tuple[Any, ...]:
    healthy = [g for g in node.gpus if g.healthy]
    return (
        tuple((g.index, g.name, g.vendor, g.memory_mib, g.compute_capability) for g in healthy),
        len(node.gpus),
        node.cpu_count,
        node.cpu_arch,
        node.memory_mib,
        node.disk_gb,
        bool(node.container_runtime),
        tuple(node.pythons),
        node.nvcc,
        shape,
        tuple(node.labels.get(k) for k in LABEL_KEYS),
    )


class HostIndex:
    """The persistent index of one state's active hosts (see the module docstring)."""

    def __init__(self) -> None:
        self.hosts: dict[str, Host] = {}
        self.order: list[str] = []  # ids of active hosts, sorted
        self.seen: dict[str, tuple[NodeRecord, str]] = {}  # every node: (record, status)
        self.classes: list[HostClass] = []  # in canonical order
        self._by_sig: dict[tuple[Any, ...], HostClass] = {}
        self._sigs: dict[str, tuple[NodeRecord, tuple[Any, ...], BlockShape | None]] = {}
        self.fits: dict[tuple[str, int], StaticFit] = {}
        self.feasible: dict[str, list[tuple[HostClass, StaticFit]]] = {}
        # Hosts whose work has deadlines, those that empty first first: (last, first, node_id).
        # Rough on purpose (no allowances): it only picks whom to weigh for a reservation.
        self.by_end: list[tuple[float, float, str]] = []
        self._end_keys: dict[str, tuple[float, float, str]] = {}
        # How many hosts could ever run a request (per cluster): valid while membership holds.
        self.statics: dict[Any, int] = {}
        # Host ports held by process jobs (``RunSpec.host_ports``), per node: port -> the run
        # holding it; and the nodes holding any, by internal IP (hosts that share an IP share
        # ports). Every node counts, active or not: a draining host's jobs still hold theirs.
        self.node_ports: dict[str, tuple[str, dict[int, str]]] = {}  # node_id -> (ip, ports)
        self.ip_nodes: dict[str, set[str]] = {}

    def sync(self, state: StateMachine, changed: Iterable[str] | None) -> None:
        """Bring the index up to date with ``state``: the nodes the change feed noted since the
        last sync (``changed``), or every node (None: the first time, or after a restore)."""
        # node_id -> noted in the feed (True: it changed) or only looked at (False: rebuilt
        # only if its record or status did).
        todo = dict.fromkeys(changed or (), True)
        if changed is None or len(self.seen) != len(state.nodes):
            for node_id in [n for n in self.seen if n not in state.nodes]:
                del self.seen[node_id]
                self._drop(node_id)
                self._forget_ports(node_id)
            for node_id in state.nodes:
                todo.setdefault(node_id, False)
        else:
            # A node's status may have been set in place (a node declared dead) without a note
            # in the feed: one cheap look at every status keeps dead hosts out regardless.
            hosts = self.hosts
            for node_id, node in state.nodes.items():
                if node.status != "active" and node_id in hosts:
                    todo.setdefault(node_id, False)
        for node_id, noted in todo.items():
            node = state.nodes.get(node_id)
            if node is None:
                self._drop(node_id)
                self._forget_ports(node_id)
                self.seen.pop(node_id, None)
                continue
            host = self.hosts.get(node_id)
            if host is not None:
                if not noted and host.node is node and node.status == "active":
                    continue
            elif self.seen.get(node_id) == (node, node.status) and not (
                noted and node_id in self.node_ports
            ):
                continue  # known and still not active
            self.refresh(state, node_id)

    def refresh(self, state: StateMachine, node_id: str) -> None:
        """Rebuild one host from the state (also: roll back what a plan did to it)."""
        node = state.nodes.get(node_id)
        self._ports(state, node)  # before anything: a host that takes nothing new holds them
        if node is None or node.status != "active":
            self._drop(node_id)
            if node is not None:
                self.seen[node_id] = (node, node.status)  # draining/dead: takes nothing new
            return
        self.seen[node_id] = (node, node.status)
        cls = self._class_of(node)
        self._drop(node_id, keep=cls)
        held = tuple(state.jobs_on_node(node_id))
        host = Host(node, cls, held)
        self.hosts[node_id] = host
        _insert(self.order, node_id)
        if _insert(cls.members, node_id):
            self.statics.clear()
        cls.add(node_id, host.units)
        ends = []
        for j in held:
            run = state.runs.get(j.run_name)
            limit = run.spec.max_duration_s if run is not None else None
            if j.status is JobStatus.TERMINATING:
                ends.append(-INF)  # stopping: soon
            elif limit is not None:
                ends.append((j.started_at or j.assigned_at or 0.0) + limit)
        if ends:
            key = (max(ends), min(ends), node_id)
            self._end_keys[node_id] = key
            bisect.insort(self.by_end, key)

    def _ports(self, state: StateMachine, node: NodeRecord | None) -> None:
        """Note the host ports the node's jobs hold (or that it holds none any more)."""
        ports: dict[int, str] = {}
        if node is not None:
            for j in state.jobs_on_node(node.node_id):
                run = state.runs.get(j.run_name)
                if run is not None and run.spec.host_ports and not run.spec.image_of(j.group):
                    for port in run.spec.host_ports:
                        ports[port] = j.run_name
        node_id = node.node_id if node is not None else ""
        self._forget_ports(node_id)
        if ports and node is not None:
            self.node_ports[node_id] = (node.internal_ip, ports)
            self.ip_nodes.setdefault(node.internal_ip, set()).add(node_id)

    def _forget_ports(self, node_id: str) -> None:
        old = self.node_ports.pop(node_id, None)
        if old is not None:
            peers = self.ip_nodes.get(old[0], set())
            peers.discard(node_id)
            if not peers:
                self.ip_nodes.pop(old[0], None)

    def port_holder(self, ip: str, port: int) -> str | None:
        """The run whose job holds ``port`` on a host at ``ip`` (None: free)."""
        for node_id in sorted(self.ip_nodes.get(ip, ())):
            run = self.node_ports[node_id][1].get(port)
            if run is not None:
                return run
        return None

    def _drop(self, node_id: str, keep: HostClass | None = None) -> None:
        """Take a host out of the index (``keep``: the class it goes back into at once)."""
        key = self._end_keys.pop(node_id, None)
        if key is not None:
            i = bisect.bisect_left(self.by_end, key)
            if i < len(self.by_end) and self.by_end[i] == key:
                del self.by_end[i]
        host = self.hosts.pop(node_id, None)
        if host is None:
            return
        if keep is None:
            _remove(self.order, node_id)
        host.cls.discard(node_id, host.units)
        if keep is not host.cls:
            _remove(host.cls.members, node_id)
            self.statics.clear()

    def _class_of(self, node: NodeRecord) -> HostClass:
        cached = self._sigs.get(node.node_id)
        if cached is not None and cached[0] is node:
            sig, shape = cached[1], cached[2]
        else:
            shape = block_shape(node)
            sig = _signature(node, shape)
            self._sigs[node.node_id] = (node, sig, shape)
        cls = self._by_sig.get(sig)
        if cls is None:
            cls = self._by_sig[sig] = HostClass(sig, len(self._by_sig), node, shape)
            self.classes.append(cls)
            self.classes.sort(key=lambda c: c.key)
            self.feasible.clear()  # a new kind of host: recompute where requests fit
        return cls

    def move(self, host: Host, units: int) -> None:
        host.cls.discard(host.node_id, host.units)
        host.units = units
        host.cls.add(host.node_id, units)


def _insert(ids: list[str], node_id: str) -> bool:
    """Insert into a sorted list unless there; True if inserted."""
    i = bisect.bisect_left(ids, node_id)
    if i < len(ids) and ids[i] == node_id:
        return False
    ids.insert(i, node_id)
    return True


def _remove(ids: list[str], node_id: str) -> None:
    i = bisect.bisect_left(ids, node_id)
    if i < len(ids) and ids[i] == node_id:
        del ids[i]


class Capacity:
    """One plan's view of the index. ``close()`` rolls back what the plan did to it."""

    def __init__(self, state: StateMachine, index: HostIndex, deadlines: Deadlines) -> None:
        """``index``: brought up to date with ``state`` (``SchedulerIndex.sync``)."""
        self.state = state
        self.deadlines = deadlines
        self.index = index
        self.hosts = index.hosts
        # node_id -> what the host looked like before this plan touched it
        self.touched: dict[str, tuple[set[int], int, int, Reservation | None]] = {}
        # What this plan placed so far: host ports by IP (port -> run), runs by host (spread).
        self.planned_ports: dict[str, dict[int, str]] = {}
        self.planned_runs: dict[str, list[str]] = {}

    def close(self) -> None:
        """Undo the plan's tentative changes (the state, not the plan, decides what holds)."""
        for node_id, (free, free_blocks, units, reservation) in self.touched.items():
            host = self.hosts[node_id]
            host.free = free
            host.free_blocks = free_blocks
            host.planned = []
            host.reservation = reservation
            host.rel = None
            if host.units != units:
                self.index.move(host, units)
        self.touched.clear()
        self.planned_ports.clear()
        self.planned_runs.clear()

    def _touch(self, host: Host) -> None:
        if host.node_id not in self.touched:
            self.touched[host.node_id] = (
                set(host.free),
                host.free_blocks,
                host.units,
                host.reservation,
            )

    @property
    def classes(self) -> list[HostClass]:
        return self.index.classes

    def members(self, cls: HostClass) -> list[Host]:
        return [self.hosts[n] for n in cls.members]

    def bucket(self, cls: HostClass, units: int) -> list[str]:
        return cls.buckets[units]

    # -- static --------------------------------------------------------------------------------
    def fit(self, req: Req, cls: HostClass) -> StaticFit:
        key = (req.key, cls.uid)
        hit = self.index.fits.get(key)
        if hit is None:
            if len(self.index.fits) > 100_000:
                self.index.fits.clear()
            hit = self.index.fits[key] = static_fit(req, cls.rep, cls.shape)
        return hit

    def feasible(self, req: Req) -> list[tuple[HostClass, StaticFit]]:
        """The classes that can run the job (were they idle), in canonical order."""
        hit = self.index.feasible.get(req.key)
        if hit is None:
            if len(self.index.feasible) > 10_000:
                self.index.feasible.clear()
            hit = self.index.feasible[req.key] = [
                (c, f) for c in self.classes if (f := self.fit(req, c)).ok
            ]
        return [(c, f) for c, f in hit if c.members]

    def never_reasons(self, req: Req, limit: int = 3) -> str:
        """Why no host can run the job: the first few hosts' reasons."""
        ids = sorted(self.hosts)
        if not ids:
            return "the mesh has no active nodes"
        shown = []
        for node_id in ids[:limit]:
            host = self.hosts[node_id]
            why = static_fit(req, host.node, host.shape).reason
            if not why and req.filters.by_name():
                why = req.filters.reject(host.node)
            shown.append(why)
        more = f"; and {len(ids) - limit} more hosts" if len(ids) > limit else ""
        return "; ".join(shown) + more

    # -- dynamic -------------------------------------------------------------------------------
    def gpus_for(self, host: Host, sf: StaticFit) -> tuple[int, ...] | None:
        """The GPUs the job would get on ``host`` now, topology-aware (None: it does not fit)."""
        if host.shape is not None and host.free_blocks < sf.units:
            return None
        n = sf.gpus
        if n == 0:
            return ()
        free = host.free if sf.all_match else host.free & sf.matching
        if len(free) < n:
            return None
        node = host.node
        return pick_gpus(node, [g for g in node.gpus if g.index in free], n)

    def static_hosts(self, keys: Any, count: Any) -> int:
        """``count()`` cached in the index under ``keys`` until hosts join, leave or change
        class."""
        hit = self.index.statics.get(keys)
        if hit is None:
            hit = self.index.statics[keys] = count()
        return hit

    def take(self, host: Host, gpus: tuple[int, ...], blocks: int, end: float) -> None:
        self._touch(host)
        host.free.difference_update(gpus)
        host.planned.append((end, gpus, blocks))
        host.rel = None
        self._rebucket(host, -blocks)

    def give(self, host: Host, gpus: tuple[int, ...], blocks: int) -> None:
        """Undo a ``take`` (a gang that did not fit whole)."""
        host.free.update(gpus)
        host.rel = None
        for i in range(len(host.planned) - 1, -1, -1):
            if host.planned[i][1] == gpus and host.planned[i][2] == blocks:
                del host.planned[i]
                break
        self._rebucket(host, blocks)

    def _rebucket(self, host: Host, blocks: int) -> None:
        if host.shape is not None:
            host.free_blocks += blocks
            self.index.move(host, host.free_blocks)
        else:
            self.index.move(host, len(host.free))

    # -- host ports, spread ------------------------------------------------------------------
    def port_conflict(self, host: Host, ports: tuple[int, ...]) -> tuple[int, str, str] | None:
        """(port, ip, run) of the first of ``ports`` already held on the host's IP (by a job
        there or by this plan), or None when all are free."""
        ip = host.node.internal_ip
        planned = self.planned_ports.get(ip)
        for port in ports:
            run = planned.get(port) if planned else None
            if run is None:
                run = self.index.port_holder(ip, port)
            if run is not None:
                return port, ip, run
        return None

    def runs_on(self, host: Host, run_name: str) -> bool:
        """Whether the host holds (or this plan put) a job of ``run_name`` there."""
        return run_name in host.runs or run_name in self.planned_runs.get(host.node_id, ())

    def claim(self, host: Host, ports: tuple[int, ...], run_name: str) -> None:
        """This plan places a job of ``run_name`` on the host: it holds ``ports`` there."""
        if ports:
            held = self.planned_ports.setdefault(host.node.internal_ip, {})
            for port in ports:
                held[port] = run_name
        self.planned_runs.setdefault(host.node_id, []).append(run_name)

    def unclaim(self, host: Host, ports: tuple[int, ...], run_name: str) -> None:
        """Undo a ``claim`` (a gang that did not fit whole)."""
        held = self.planned_ports.get(host.node.internal_ip)
        if held is not None:
            for port in ports:
                held.pop(port, None)
        runs = self.planned_runs.get(host.node_id)
        if runs and run_name in runs:
            runs.remove(run_name)

    def reserve(self, host: Host, r: Reservation) -> None:
        self._touch(host)
        host.reservation = r

    # -- time ----------------------------------------------------------------------------------
    def spec_of(self, job: JobRecord) -> RunSpec:
        run = self.state.runs.get(job.run_name)
        return run.spec if run is not None else NO_SPEC

    def releases(self, host: Host) -> list[tuple[float, tuple[int, ...], int]]:
        """(deadline, GPUs, blocks) of everything on the host, earliest first."""
        key = (self.deadlines.policy, self.deadlines.now is None)
        if host.ends is None or host.ends_key != key:
            # Deadlines of running work do not depend on ``now``: cached until the host changes;
            # a stopping job's does (``now`` + its stop budget): kept apart.
            host.ends_key = key
            running = []
            stopping = []
            for j in host.held:
                cfg = self.spec_of(j)
                if j.status is JobStatus.TERMINATING:
                    stopping.append((cfg, tuple(j.gpu_indices), j.blocks))
                else:
                    running.append((self.deadlines.of_held(j, cfg), tuple(j.gpu_indices), j.blocks))
            running.sort(key=lambda r: r[0])
            host.ends = (running, stopping)
        running, stopping = host.ends
        if not stopping and not host.planned:
            return running
        rel_key = (key, self.deadlines.now)
        if host.rel is not None and host.rel[0] == rel_key:
            return host.rel[1]
        out = list(running)
        out.extend((self.deadlines.of_stopping(cfg), g, b) for cfg, g, b in stopping)
        out.extend(host.planned)
        out.sort(key=lambda r: r[0])
        host.rel = (rel_key, out)
        return out

    def ready_at(
        self, host: Host, units: int, matching: frozenset[int] | None
    ) -> tuple[float, int]:
        """When the host will have ``units`` free at the latest, and how many it will have free
        then beyond them (the slack). (INF, 0) when no deadline guarantees it."""
        have = self.free_units(host, matching)
        if have >= units:
            return (self.deadlines.now or 0.0), have - units
        releases = self.releases(host)
        start = INF
        for end, gpus, blocks in releases:
            if end == INF:
                break
            have += self.units(host, gpus, blocks, matching)
            if have >= units:
                start = end
                break
        if start == INF:
            return INF, 0
        # Everything due by then (ties included) is gone by then.
        total = self.free_units(host, matching) + sum(
            self.units(host, g, b, matching) for e, g, b in releases if e <= start
        )
        return start, total - units

    def ready_time(self, host: Host, units: int, matching: frozenset[int] | None) -> float:
        """``ready_at(...)[0]``, from a per-host profile (units -> time) kept while the host's
        free units and deadlines stay the same."""
        if matching is not None:
            return self.ready_at(host, units, matching)[0]
        releases = self.releases(host)
        have = self.free_units(host, None)
        prof = host.prof
        now = self.deadlines.now or 0.0
        if prof is None or prof[0] is not releases or prof[1] != (have, now):
            times = [now] * (have + 1)
            got = have
            for end, gpus, blocks in releases:
                if end == INF:
                    break
                got += self.units(host, gpus, blocks, None)
                times.extend([end] * (got + 1 - len(times)))
            prof = host.prof = (releases, (have, now), times)
        times = prof[2]
        return times[units] if units < len(times) else INF

    def free_units(self, host: Host, matching: frozenset[int] | None) -> int:
        if host.shape is not None:
            return host.free_blocks
        return len(host.free) if matching is None else len(host.free & matching)

    def units(
        self, host: Host, gpus: tuple[int, ...], blocks: int, matching: frozenset[int] | None
    ) -> int:
        if host.shape is not None:
            return blocks
        return len(gpus) if matching is None else sum(1 for g in gpus if g in matching)
