"""Preemption: a waiting run stops lower-priority runs when -- and only when -- its whole gang then
fits, choosing the cheapest victims.

Opt-in, because stopping work is never free (dstack has no preemption at all):

* a run is a possible victim when its configuration says ``preemptible: true``, or when every host
  it runs on is labelled ``preemption=always`` (a fleet of scavenger hosts);
* a host labelled ``preemption=never`` protects everything on it;
* the preemptor must have a strictly higher priority, and ``SchedulerPolicy.preemption`` must be on.

Victims are whole gangs (a distributed job missing a node is useless). On each host the cheapest
victims are taken until the gang's job fits, then any that turn out not to be needed are spared;
cheap means lowest priority first, then fewest GPUs, then most recently started (least work lost).
Jobs already stopping count as capacity about to be free, so a preemptor whose victims are still
shutting down waits for them rather than preempting more.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from meshgpu.scheduler.capacity import Capacity, Host, HostClass
from meshgpu.scheduler.matching import Req, StaticFit, pick_gpus
from meshgpu.state.commands import Assignment
from meshgpu.state.records import JobRecord, JobStatus, NodeRecord, RunRecord

_RUNNING = (JobStatus.PROVISIONING, JobStatus.PULLING, JobStatus.RUNNING)
_NO_VICTIMS = (-1.0, 0, 0, 0.0)


def preemptible(run: RunRecord, nodes: list[NodeRecord]) -> bool:
    """May the scheduler stop this run (on these hosts) for a higher-priority one?"""
    labels = [n.labels.get("preemption", "") for n in nodes]
    if "never" in labels:
        return False
    if run.spec.preemptible:
        return True
    return bool(labels) and all(label == "always" for label in labels)


@dataclass(eq=False, slots=True)
class Victim:
    """A gang that could be stopped: all its running jobs, wherever they are."""

    key: tuple[str, int]
    run: RunRecord
    jobs: list[JobRecord]
    gpus: int
    cost: tuple[int, int, float, str]  # (priority, GPUs, -started, name): lower is cheaper


@dataclass(eq=False, slots=True)
class Decision:
    """Where a gang will start once ``victims`` (and jobs already stopping there) are gone."""

    targets: list[Assignment]
    victims: list[Victim]
    waits_for: list[JobRecord]  # jobs already stopping on the target hosts
    hosts: list[Host]
    need: list[int]
    matching: list[frozenset[int] | None]
    start: float


@dataclass(slots=True)
class _OnHost:
    """A host's jobs as preemption sees them (cached on the host until it changes)."""

    running: list[JobRecord]
    stopping: list[JobRecord]
    lowest: float  # lowest priority among runs that may be preemptible here
    by_priority: list[tuple[int, int]]  # (priority, units) of those runs' jobs here, by priority
    stopping_units: int

    def room_below(self, priority: int) -> int:
        """Units that stopping and preemptible lower-priority work here could free."""
        return self.stopping_units + sum(u for p, u in self.by_priority if p < priority)


@dataclass(eq=False)
class Preemptor:
    cap: Capacity
    claimed: set[tuple[str, int]] = field(default_factory=set)  # victims promised this plan
    _gangs: dict[tuple[str, int], Victim | None] = field(default_factory=dict)
    _lowest: float | None = None
    _relevant: list[Host] | None = None
    _options: dict[Any, dict[str | None, list[tuple[Host, StaticFit]]]] = field(
        default_factory=dict
    )

    def _on(self, host: Host) -> _OnHost:
        cached = host.victims
        if cached is None:
            state = self.cap.state
            running, stopping = [], []
            lowest = math.inf
            by_priority = []
            for job in host.held:
                if job.status is JobStatus.TERMINATING:
                    stopping.append(job)
                    continue
                running.append(job)
                run = state.runs.get(job.run_name)
                if run is not None and preemptible(run, [host.node]):
                    lowest = min(lowest, run.priority)
                    by_priority.append((run.priority, _units(host, job, None)))
            units = sum(_units(host, j, None) for j in stopping)
            by_priority.sort()
            cached = host.victims = _OnHost(running, stopping, lowest, by_priority, units)
        return cached

    def _relevant_hosts(self) -> list[Host]:
        """Hosts with work that could make room: preemptible or already stopping (per plan)."""
        if self._relevant is None:
            hosts = self.cap.hosts
            self._relevant = [
                h
                for node_id in self.cap.index.order
                if (on := self._on(h := hosts[node_id])).stopping or on.lowest < math.inf
            ]
        return self._relevant

    def may_help(self, priority: int) -> bool:
        """Could any running gang be preempted for this priority? (Priorities start at 0.)"""
        if priority <= 0:
            return False
        if self._lowest is None:
            self._lowest = min(
                (self._on(h).lowest for h in self.cap.hosts.values()), default=math.inf
            )
        return self._lowest < priority

    def _victim(self, job: JobRecord) -> Victim | None:
        key = (job.run_name, job.replica_num)
        if key in self._gangs:
            return self._gangs[key]
        state = self.cap.state
        run = state.runs[job.run_name]
        jobs = [
            j
            for j in state.run_jobs(run)
            if j.replica_num == job.replica_num and j.status in _RUNNING
        ]
        nodes = [state.nodes[j.node_id] for j in jobs if j.node_id in state.nodes]
        victim = None
        if jobs and preemptible(run, nodes):
            gpus = sum(len(j.gpu_indices) for j in jobs)
            started = max((j.started_at or j.assigned_at or 0.0) for j in jobs)
            victim = Victim(key, run, jobs, gpus, (run.priority, gpus, -started, run.run_name))
        self._gangs[key] = victim
        return victim

    def try_gang(
        self,
        gang_key: tuple[str, int],
        reqs: list[Req],
        priority: int,
        clusters: list[str | None],
        classes_of: list[list[tuple[HostClass, StaticFit]]],
    ) -> Decision | None:
        """The cheapest way to make the whole gang fit by stopping lower-priority victims."""
        best: tuple[tuple[float, ...], Decision] | None = None
        self._options = {}
        by_cluster = clusters != [None]
        for cluster in clusters:
            # Not even enough hosts that could make room: no need to weigh victims.
            if any(
                len(self._hosts_for(classes, cluster, priority, by_cluster)) < len(reqs)
                for classes in classes_of
            ):
                continue
            decision = self._in_cluster(gang_key, reqs, priority, cluster, classes_of)
            if decision is None:
                continue
            cost = _total_cost(decision.victims)
            if best is None or cost < best[0]:
                best = (cost, decision)
        if best is None:
            return None
        decision = best[1]
        if not decision.victims and not decision.waits_for:
            return None  # it would fit as it is: not a preemption (reservations are in its way)
        for v in decision.victims:
            self.claimed.add(v.key)
        return decision

    def _in_cluster(
        self,
        gang_key: tuple[str, int],
        reqs: list[Req],
        priority: int,
        cluster: str | None,
        classes_of: list[list[tuple[HostClass, StaticFit]]],
    ) -> Decision | None:
        used: set[str] = set()
        taken: set[tuple[str, int]] = set()
        targets: list[Assignment] = []
        victims: list[Victim] = []
        waits: list[JobRecord] = []
        hosts: list[Host] = []
        needs: list[int] = []
        matchings: list[frozenset[int] | None] = []
        for job_num, (req, classes) in enumerate(zip(reqs, classes_of, strict=True)):
            best = None
            for host, sf in self._hosts_for(classes, cluster, priority, cluster is not None):
                if host.node_id in used:
                    continue
                r = host.reservation
                if r is not None and r.gang != gang_key:
                    continue  # promised to a gang ahead in the queue
                if req.filters.by_name() and req.filters.reject(host.node):
                    continue
                option = self._on_host(host, sf, priority, taken)
                if option is not None and (best is None or option[0] < best[0]):
                    best = (option[0], host, sf, option[1], option[2])
                    if option[0] == _NO_VICTIMS:
                        break
            if best is None:
                return None
            _, host, sf, chosen, stopping = best
            gpus = self._target_gpus(host, sf, chosen, stopping)
            if gpus is None:
                return None
            blocks = sf.units if host.shape is not None else 0
            targets.append(
                Assignment(
                    job_id=str(job_num), node_id=host.node_id, gpu_indices=list(gpus), blocks=blocks
                )
            )
            for v in chosen:
                taken.add(v.key)
                victims.append(v)
            waits.extend(stopping)
            used.add(host.node_id)
            hosts.append(host)
            needs.append(sf.units)
            matchings.append(None if sf.all_match else sf.matching)
        dl = self.cap.deadlines
        ends = [dl.of_held(j, self.cap.spec_of(j)) for j in waits]
        ends += [dl.of_stopping(v.run.spec) for v in victims]
        return Decision(targets, victims, waits, hosts, needs, matchings, max(ends, default=0.0))

    def _hosts_for(
        self,
        classes: list[tuple[HostClass, StaticFit]],
        cluster: str | None,
        priority: int,
        by_cluster: bool,
    ) -> list[tuple[Host, StaticFit]]:
        """Hosts where the job could fit after preempting (in node order): those with room
        already, and those whose free, stopping and lower-priority preemptible work add up to
        enough. Computed for all clusters at once, once per attempt."""
        key = (tuple((cls.uid, sf.units) for cls, sf in classes), priority)
        split = self._options.get(key)
        if split is None:
            fits = {cls.uid: sf for cls, sf in classes}
            out: dict[str, tuple[Host, StaticFit]] = {}
            for host in self._relevant_hosts():
                sf = fits.get(host.cls.uid)
                if sf is None:
                    continue
                if _free(host, None) + self._on(host).room_below(priority) >= sf.units:
                    out[host.node_id] = (host, sf)
            for cls, sf in classes:
                for v in range(sf.units, cls.top + 1):
                    for node_id in cls.buckets[v]:
                        out[node_id] = (self.cap.hosts[node_id], sf)
            split = {}
            for node_id in sorted(out):
                host, sf = out[node_id]
                split.setdefault(host.cls.cluster if by_cluster else None, []).append((host, sf))
            self._options[key] = split
        return split.get(cluster, [])

    def _on_host(
        self, host: Host, sf: StaticFit, priority: int, taken: set[tuple[str, int]]
    ) -> tuple[tuple[float, ...], list[Victim], list[JobRecord]] | None:
        """The cheapest victims on ``host`` that make room for the job, with their cost."""
        matching = None if sf.all_match else sf.matching
        here = self._on(host)
        have = _free(host, matching) + sum(_units(host, j, matching) for j in here.stopping)
        if have >= sf.units:
            return _NO_VICTIMS, [], here.stopping
        if here.lowest >= priority:
            return None
        options = []
        for job in here.running:
            v = self._victim(job)
            if v is None or v.run.priority >= priority or v.key in self.claimed or v.key in taken:
                continue
            options.append((v.cost, job.job_id, v, _units(host, job, matching)))
        options.sort(key=lambda o: (o[0], o[1]))
        chosen: list[tuple[Victim, int]] = []
        for _, _, v, units in options:
            chosen.append((v, units))
            have += units
            if have >= sf.units:
                break
        if have < sf.units:
            return None
        for v, units in sorted(chosen, key=lambda c: c[0].cost, reverse=True):
            if have - units >= sf.units:  # spare what turns out not to be needed
                have -= units
                chosen.remove((v, units))
        kept = [v for v, _ in chosen]
        return _total_cost(kept), kept, here.stopping

    def _target_gpus(
        self, host: Host, sf: StaticFit, victims: list[Victim], stopping: list[JobRecord]
    ) -> tuple[int, ...] | None:
        freed = [j for v in victims for j in v.jobs if j.node_id == host.node_id] + stopping
        free = set(host.free)
        for j in freed:
            free.update(j.gpu_indices)
        free &= host.healthy
        if host.shape is not None and host.free_blocks + sum(j.blocks for j in freed) < sf.units:
            return None
        if sf.gpus == 0:
            return ()
        if not sf.all_match:
            free &= sf.matching
        if len(free) < sf.gpus:
            return None
        node = host.node
        return pick_gpus(node, [g for g in node.gpus if g.index in free], sf.gpus)


def _free(host: Host, matching: frozenset[int] | None) -> int:
    if host.shape is not None:
        return host.free_blocks
    return len(host.free) if matching is None else len(host.free & matching)


def _units(host: Host, job: JobRecord, matching: frozenset[int] | None) -> int:
    if host.shape is not None:
        return job.blocks
    if matching is None:
        return len(job.gpu_indices)
    return sum(1 for g in job.gpu_indices if g in matching)


def _total_cost(victims: list[Victim]) -> tuple[float, ...]:
    """Compare victim sets: highest priority hit, then GPUs stopped, then how many, then the
    earliest start among them (the set whose oldest victim started last loses least work)."""
    if not victims:
        return _NO_VICTIMS
    return (
        max(v.run.priority for v in victims),
        sum(v.gpus for v in victims),
        len(victims),
        max(v.cost[2] for v in victims),
    )
