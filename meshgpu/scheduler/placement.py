"""The scheduler's pure core: ``plan(state, now) -> Plan`` (assign, preempt, explain).

Deterministic and I/O-free: the same state and ``now`` give the same plan. The leader runs it
whenever demand or capacity changes and commits the result (``AssignJobs``, ``PreemptJobs``,
``SetPendingReasons``); every decision is re-checked when applied.

**Queue.** Strict priority (0-100, high first). At equal priority, projects take turns by fair
share -- the project holding the fewest GPUs (counting what this plan gives it) goes next -- and
each project's runs go first in, first out. A gang (the waiting jobs of one run replica) is placed
whole or not at all, on distinct hosts, inside one ``cluster`` label for multi-node runs;
placement is atomic per plan, so two half-placed gangs can never hold each other's hosts.

**Backfill** (``backfill.py``). A gang that cannot start reserves the hosts where it can start
soonest; others may use them only when that cannot delay its reserved start. The first blocked
gang of each kind reserves (EASY backfill, one head per requirement); gangs of the same kind wait
in FIFO order behind it. A gang blocked only by other gangs' reservations says so and reserves
nothing.

**Preemption** (opt-in, ``preemption.py``): a gang that does not fit may stop lower-priority
preemptible gangs when its whole gang then fits; it then reserves the hosts it will start on.

**Quotas.** A project's ``max_gpus`` (``meshgpu project quota``) caps the GPUs its jobs hold:
a gang that would take the project over it is not placed -- it neither reserves hosts nor
preempts -- and says so; the rest of its class waits with it. The quotas come from the
replicated state (the leader passes them in), and ``AssignJobs`` re-checks them at apply.

**Retry backoff.** A resubmitted gang (``retry``) that must wait out its backoff keeps its place
and blocks nobody; ``Plan.wake_at`` says when to plan again.

**Why pending.** Every waiting job gets a reason. The wording is stable (no counters that move
with unrelated load except for the head of each kind), so reasons are re-proposed only when they
change.

**Cost.** The scheduler keeps waiting gangs grouped in classes (``queue.py``), fed from the
state's change feed (``index.py``): one failed gang settles its whole class, so a plan costs what
it places plus one step per class, not one per queued job; free capacity is indexed by host class
and free GPUs (``capacity.py``).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Mapping
from dataclasses import dataclass, field

from meshgpu.scheduler.backfill import Backfill
from meshgpu.scheduler.capacity import Capacity, Host, HostClass, Reservation
from meshgpu.scheduler.deadlines import Deadlines
from meshgpu.scheduler.index import SchedulerIndex
from meshgpu.scheduler.matching import Req, StaticFit, describe, gpus_wanted, req_of, spec_of
from meshgpu.scheduler.policy import SchedulerPolicy
from meshgpu.scheduler.preemption import Decision, Preemptor
from meshgpu.scheduler.queue import ClassKey, Gang, QueueClass
from meshgpu.state.commands import Assignment, Preemption
from meshgpu.state.machine import StateMachine
from meshgpu.state.retry import backoff

QUEUED = "waiting for capacity: earlier or higher-priority runs are ahead in the queue"

# How a gang failed; decides its reason and whether it reserves. PORTS: hosts had room, but the
# host ports its jobs listen on are taken there (it reserves nothing: GPUs freeing up do not help).
# QUOTA: the gang would take its project over its ``max_gpus``.
NEVER, OVERSIZED, CAPACITY, RESERVED, PORTS = "never", "oversized", "capacity", "reserved", "ports"
QUOTA = "quota"
_SAYS_WHY = (NEVER, OVERSIZED, PORTS)  # failures whose reason the whole class shares
_DURATION_FIELDS = ("max_duration", "stop_duration")
_Kind = tuple[str, tuple[str, ...]]  # (placement fields but durations, the jobs' resources)
# Derived from queue class keys, which recur from plan to plan.
_REQS: dict[tuple[str, tuple[str, ...], int], list[Req]] = {}
_KINDS: dict[tuple[str, tuple[str, ...]], _Kind] = {}


@dataclass
class Plan:
    """The decisions of one scheduling pass."""

    assignments: list[Assignment] = field(default_factory=list)
    pending: dict[str, str] = field(default_factory=dict)  # job_id -> why it waits
    preemptions: list[Preemption] = field(default_factory=list)  # for a ``PreemptJobs``
    # Where each preempting gang (run_name, replica) will start once its victims are gone.
    preemption_targets: dict[tuple[str, int], list[Assignment]] = field(default_factory=dict)
    reservations: list[Reservation] = field(default_factory=list)
    # The earliest time a resubmitted gang backing off (``retry``) may start: plan again then.
    wake_at: float | None = None


@dataclass(frozen=True, slots=True)
class _Failure:
    kind: str
    reason: str


def plan(
    state: StateMachine,
    now: float | None = None,
    policy: SchedulerPolicy | None = None,
    *,
    index: SchedulerIndex | None = None,
    quotas: Mapping[str, int] | None = None,
) -> Plan:
    """Decide what to start, preempt and say about the waiting queue of ``state``.

    ``now`` (seconds since the epoch, the proposer's clock) turns ``max_duration`` into deadlines
    for backfill; without it no deadline is known, so nothing is backfilled onto reserved hosts.
    ``index``: the caller's indexes of ``state`` (brought up to date here; by default the one
    ``SchedulerIndex.shared`` keeps for it). ``quotas``: project -> ``max_gpus`` (projects
    without a quota are left out), from the replicated state (``ClusterState.quotas()``).
    """
    return _Planner(state, now, policy or SchedulerPolicy(), index, quotas).run()


class _Planner:
    def __init__(
        self,
        state: StateMachine,
        now: float | None,
        policy: SchedulerPolicy,
        index: SchedulerIndex | None = None,
        quotas: Mapping[str, int] | None = None,
    ) -> None:
        if index is None:
            index = SchedulerIndex.shared(state)
        index.sync(state)
        self.state = state
        self.index = index
        self.policy = policy
        self.deadlines = Deadlines(now, policy)
        self.cap = Capacity(state, index.hosts, self.deadlines)
        self.out = Plan()
        self.failed: dict[_Kind, tuple[_Failure, float]] = {}  # kind -> (failure, its deadline)
        self.reserved_kinds: set[_Kind] = set()
        self.no_preempt: set[tuple[_Kind, int]] = set()
        # GPUs each project holds, counting what this plan gives it (fair share, quotas).
        self.usage = dict(index.project_gpus)
        self.quotas = dict(quotas or {})
        self.over_quota: set[ClassKey] = set()  # classes settled by their project's quota
        self.preemptor = Preemptor(self.cap)
        self.backfill = Backfill(self.cap, policy)

    def run(self) -> Plan:
        try:
            return self.plan_queue()
        finally:
            self.cap.close()

    def plan_queue(self) -> Plan:
        """Plan the whole queue (the capacity index keeps the plan's changes until closed)."""
        for priority, classes in self.index.queue.by_priority():
            self._level(priority, classes)
        return self.out

    # -- queue order ---------------------------------------------------------------------------
    def _level(self, priority: int, classes: list[QueueClass]) -> None:
        """One priority level: merge the classes' FIFO lines, projects taking fair turns."""
        fair = self.policy.fair_share
        heap: list[tuple[int, tuple[float, str, int], int]] = []
        for i, cls in enumerate(classes):
            heap.append((self.usage.get(cls.project, 0) if fair else 0, cls.order[0], i))
        heapq.heapify(heap)
        pos = [0] * len(classes)
        done: list[list[tuple[Gang, str | None]]] = [[] for _ in classes]
        while heap:
            usage, order, i = heapq.heappop(heap)
            cls = classes[i]
            if fair and usage != self.usage.get(cls.project, 0):
                heapq.heappush(heap, (self.usage.get(cls.project, 0), order, i))
                continue  # its project was served meanwhile: take its turn again later
            gang = cls.gangs[order]
            reason, more = self._gang(cls, gang, priority)
            done[i].append((gang, reason))
            if not more:
                self._settle(cls, done[i], reason)
                continue
            self._explain(gang, reason)
            pos[i] += 1
            if pos[i] < len(cls.order):
                key = self.usage.get(cls.project, 0) if fair else 0
                heapq.heappush(heap, (key, cls.order[pos[i]], i))

    def _explain(self, gang: Gang, reason: str | None) -> None:
        if reason is not None:
            for job in gang.jobs:
                self.out.pending[job.job_id] = reason

    def _settle(self, cls: QueueClass, done: list[tuple[Gang, str | None]], reason: str) -> None:
        """The class's last gang failed: the rest of the class fails too (they fit exactly the
        same hosts, and capacity only shrinks within a plan). One bulk update for all."""
        seen = self.failed.get(self._fit_kind(cls))
        says_why = cls.key in self.over_quota or (seen is not None and seen[0].kind in _SAYS_WHY)
        follower = reason if says_why else QUEUED
        self.out.pending.update(dict.fromkeys(cls.job_ids, follower))
        for gang, why in done:
            for job in gang.jobs:
                if why is None:
                    self.out.pending.pop(job.job_id, None)
                else:
                    self.out.pending[job.job_id] = why

    # -- one gang ------------------------------------------------------------------------------
    def _gang(self, cls: QueueClass, gang: Gang, priority: int) -> tuple[str | None, bool]:
        """Place, preempt for, or explain one gang. Returns (its reason or None if placed,
        whether the next gang of its class may still be tried)."""
        backing_off = self._backing_off(gang)
        if backing_off is not None:
            return backing_off, True
        over = self._over_quota(gang.run.project, self._gpus_wanted(cls, gang))
        if over is not None:
            self.over_quota.add(cls.key)
            return over, False
        kind = self._fit_kind(cls)
        reqs = self._requirements(cls, gang)
        end = self.deadlines.of_new(gang.run.spec)
        failure = self._known_failure(kind, end)
        if failure is None:
            placed = self._place(gang, reqs, end)
            if isinstance(placed, list):
                self.out.assignments.extend(placed)
                project = gang.run.project
                self.usage[project] = self.usage.get(project, 0) + sum(
                    len(a.gpu_indices) for a in placed
                )
                return None, True
            if placed.kind == QUOTA:  # this project's, not the kind's: other projects may fit
                self.over_quota.add(cls.key)
                return placed.reason, False
            failure = placed
            self.failed[kind] = (placed, end)
        if (
            failure.kind in (CAPACITY, RESERVED)
            and self.policy.preemption
            and (kind, priority) not in self.no_preempt
            and self.preemptor.may_help(priority)
        ):
            decision = self.preemptor.try_gang(
                gang.key,
                reqs,
                priority,
                self._clusters(gang, reqs),
                [self.cap.feasible(r) for r in reqs],
            )
            if decision is not None:
                return self._preempting(gang, decision), True
            self.no_preempt.add((kind, priority))
        if failure.kind in (CAPACITY, OVERSIZED) and kind not in self.reserved_kinds:
            self.reserved_kinds.add(kind)
            r = self.backfill.reserve(
                gang.key,
                reqs,
                self._clusters(gang, reqs),
                oversized=failure.kind == OVERSIZED,
                after=len(self.out.assignments),
            )
            if r is not None:
                self.out.reservations.append(r)
            return failure.reason, False
        return (failure.reason if failure.kind in _SAYS_WHY else QUEUED), False

    # -- quotas --------------------------------------------------------------------------------
    def _gpus_wanted(self, cls: QueueClass, gang: Gang) -> int:
        """The fewest GPUs the gang takes (a host split into blocks may give it more)."""
        return sum(gpus_wanted(r.res.gpu) for r in self._requirements(cls, gang))

    def _over_quota(self, project: str, gpus: int) -> str | None:
        """Why ``gpus`` more GPUs would take ``project`` over its ``max_gpus`` (None: they
        would not)."""
        quota = self.quotas.get(project)
        if quota is None or gpus == 0:
            return None
        held = self.usage.get(project, 0)
        if held + gpus <= quota:
            return None
        if gpus > quota:
            return (
                f"needs {gpus} GPUs but project {project} may hold at most {quota} (max_gpus): "
                f"raise its quota (meshgpu project quota {project} --max-gpus N)"
            )
        return (
            f"project {project} uses {held} of its {quota} GPUs (max_gpus): waiting for one of "
            "its jobs to end"
        )

    def _backing_off(self, gang: Gang) -> str | None:
        """Why a resubmitted gang may not start yet (its retry backoff), or None. It keeps its
        place and blocks nobody meanwhile; the plan says when to look again."""
        job = gang.jobs[0]
        now = self.deadlines.now
        if now is None or job.not_before <= now:
            return None
        wake = self.out.wake_at
        self.out.wake_at = job.not_before if wake is None else min(wake, job.not_before)
        return (
            f"retrying (attempt {job.retry_attempt}): backing off "
            f"{backoff(job.retry_attempt):g}s after repeated failures"
        )

    def _known_failure(self, kind: _Kind, end: float) -> _Failure | None:
        """A failure already seen this plan that settles a gang of ``kind`` ending at ``end``:
        capacity only shrinks during a plan, and a later deadline only makes backfill harder."""
        seen = self.failed.get(kind)
        if seen is None:
            return None
        failure, failed_end = seen
        if failure.kind in _SAYS_WHY or end >= failed_end:
            return failure
        return None

    def _fit_kind(self, cls: QueueClass) -> _Kind:
        """What decides where a gang of the class fits, leaving out how long it runs (gangs that
        differ only in ``max_duration`` share failures and one reservation)."""
        key = (cls.key[2], cls.key[3])
        kind = _KINDS.get(key)
        if kind is None:
            if len(_KINDS) > 10_000:
                _KINDS.clear()
            doc = {k: v for k, v in json.loads(cls.key[2]).items() if k not in _DURATION_FIELDS}
            kind = _KINDS[key] = (json.dumps(doc, sort_keys=True), cls.key[3])
        return kind

    def _requirements(self, cls: QueueClass, gang: Gang) -> list[Req]:
        """One ``Req`` per job of the gang (the same for every gang of the class)."""
        key = (cls.key[2], cls.key[3], len(gang.jobs))
        reqs = _REQS.get(key)
        if reqs is None:
            if len(_REQS) > 10_000:
                _REQS.clear()
            exclusive = len(gang.jobs) > 1
            reqs = _REQS[key] = [
                req_of(
                    spec_of(j.resources_key, j.resources),
                    gang.run.spec.placement_of(j.group),  # a replica group's own, or the run's
                    exclusive,
                )
                for j in gang.jobs
            ]
        return reqs

    def _clusters(self, gang: Gang, reqs: list[Req]) -> list[str | None]:
        """The clusters a gang may use: any host (None) unless it is a multi-node cluster gang."""
        if len(reqs) < 2 or not reqs[0].filters.cluster:
            return [None]
        seen: dict[str, None] = {}
        for cls, _ in self.cap.feasible(reqs[0]):
            seen[cls.cluster] = None
        return list(seen)

    # -- placing -------------------------------------------------------------------------------
    def _place(self, gang: Gang, reqs: list[Req], end: float) -> list[Assignment] | _Failure:
        feasible = [self.cap.feasible(r) for r in reqs]
        for req, classes in zip(reqs, feasible, strict=True):
            if not classes:
                return _Failure(NEVER, "no host can ever run it: " + self.cap.never_reasons(req))
        clusters = self._clusters(gang, reqs)
        n = len(reqs)
        keys = tuple(r.key for r in reqs)
        sizes = {
            c: self.cap.static_hosts((keys, c), lambda c=c: self._static_hosts(feasible, c))
            for c in clusters
        }
        if max(sizes.values()) < n:
            return _Failure(OVERSIZED, self._oversized(reqs, clusters, max(sizes.values())))
        if len(clusters) > 1:
            # Try the clusters with the most free room first: the first that fits wins.
            room = self._room(feasible)
            clusters.sort(key=lambda c: -room.get(c, 0))
        blocked = False
        spec = gang.run.spec
        # A process job holds its ports on its host (a container has a network of its own);
        # a service's replicas spread over hosts when they can.
        ports = spec.host_ports if not spec.image_of(gang.jobs[0].group) else ()
        spread = spec.service is not None
        conflict: tuple[int, str, str] | None = None
        quota_failure: _Failure | None = None
        for cluster in clusters:
            if sizes[cluster] < n:
                continue
            taken: list[tuple[Host, tuple[int, ...], int, Reservation | None, int]] = []
            used: set[str] = set()
            for req, classes in zip(reqs, feasible, strict=True):
                found, skipped, clash = None, False, None
                for avoid in (True, False) if spread else (False,):
                    found, skipped, clash = self._find(
                        gang, req, classes, cluster, used, end, ports, avoid
                    )
                    if found is not None:
                        break
                blocked = blocked or skipped
                conflict = conflict or clash
                if found is None:
                    break
                host, gpus, blocks, charge = found
                self.cap.take(host, gpus, blocks, end)
                self.cap.claim(host, ports, gang.run.run_name)
                r = host.reservation if charge else None
                if r is not None:
                    r.slack[host.node_id] -= charge
                taken.append((host, gpus, blocks, r, charge))
                used.add(host.node_id)
            if len(taken) == n and (
                over := self._over_quota(gang.run.project, sum(len(t[1]) for t in taken))
            ):
                # A host split into blocks gave it more GPUs than it asks for at least.
                quota_failure = _Failure(QUOTA, over)
            elif len(taken) == n:
                return [
                    Assignment(job_id=job.job_id, node_id=h.node_id, gpu_indices=list(g), blocks=b)
                    for job, (h, g, b, _, _) in zip(gang.jobs, taken, strict=True)
                ]
            for host, gpus, blocks, r, charge in reversed(taken):
                self.cap.give(host, gpus, blocks)
                self.cap.unclaim(host, ports, gang.run.run_name)
                if r is not None:
                    r.slack[host.node_id] += charge
        if quota_failure is not None:
            return quota_failure
        if conflict is not None and not blocked:
            port, ip, holder = conflict
            return _Failure(PORTS, f"port {port} is in use on {ip} by run {holder}")
        if blocked:
            return _Failure(RESERVED, QUEUED)
        return _Failure(CAPACITY, self._capacity_reason(reqs, clusters, feasible))

    def _find(
        self,
        gang: Gang,
        req: Req,
        classes: list[tuple[HostClass, StaticFit]],
        cluster: str | None,
        used: set[str],
        end: float,
        ports: tuple[int, ...] = (),
        avoid: bool = False,
    ) -> tuple[tuple[Host, tuple[int, ...], int, int] | None, bool, tuple[int, str, str] | None]:
        """Best-fit host for one job: the fewest spare units first. Returns the host, its GPUs,
        blocks, the slack it consumes on a reserved host -- whether a reservation was in the
        way somewhere, and the first host port found taken (port, ip, run) on a host with room.
        ``ports``: host ports the job holds; ``avoid``: skip hosts that already hold a job of
        the gang's run (spread)."""
        skipped = False
        clash: tuple[int, str, str] | None = None
        run_name = gang.run.run_name
        hosts = self.cap.hosts
        live = [
            (cls, sf)
            for cls, sf in classes
            if cls.top >= sf.units and (cluster is None or cls.cluster == cluster)
        ]
        if not live:
            return None, False, None  # nowhere has room: no need to look host by host
        top = max(cls.top - sf.units for cls, sf in live)
        for spare in range(top + 1):
            for cls, sf in live:
                v = sf.units + spare
                if v > cls.top:
                    continue
                bucket = cls.buckets[v]
                if not bucket:
                    continue
                for node_id in bucket:
                    host = hosts[node_id]
                    if node_id in used:
                        continue
                    if req.filters.by_name() and req.filters.reject(host.node):
                        continue
                    if avoid and self.cap.runs_on(host, run_name):
                        continue
                    if ports:
                        taken = self.cap.port_conflict(host, ports)
                        if taken is not None:
                            clash = clash or taken
                            continue
                    gpus = self.cap.gpus_for(host, sf)
                    if gpus is None:
                        continue
                    blocks = sf.units if host.shape is not None else 0
                    charge = self.backfill.admits(host, gang.key, end, gpus, blocks)
                    if charge is None:
                        skipped = True
                        continue
                    return (host, gpus, blocks, charge), skipped, clash
        return None, skipped, clash

    def _static_hosts(
        self, feasible: list[list[tuple[HostClass, StaticFit]]], cluster: str | None
    ) -> int:
        """How many distinct hosts (in ``cluster``) could run some job of the gang."""
        seen: set[int] = set()
        count = 0
        for classes in feasible:
            for cls, _ in classes:
                if cls.uid not in seen and (cluster is None or cls.cluster == cluster):
                    seen.add(cls.uid)
                    count += len(cls.members)
        return count

    @staticmethod
    def _room(feasible: list[list[tuple[HostClass, StaticFit]]]) -> dict[str, int]:
        """Per cluster: hosts with room for the gang's first job now."""
        room: dict[str, int] = {}
        for cls, sf in feasible[0]:
            if cls.top >= sf.units:
                n = sum(len(cls.buckets[v]) for v in range(sf.units, cls.top + 1))
                room[cls.cluster] = room.get(cls.cluster, 0) + n
        return room

    # -- reasons -------------------------------------------------------------------------------
    def _capacity_reason(
        self,
        reqs: list[Req],
        clusters: list[str | None],
        feasible: list[list[tuple[HostClass, StaticFit]]],
    ) -> str:
        req = reqs[0]
        what = describe(req.res)
        classes = feasible[0]
        if len(reqs) == 1:
            host, sf = self._largest(classes)
            if host.shape is not None:
                return (
                    f"needs {sf.units} blocks ({what}) on one host; largest free: "
                    f"{host.units} blocks on {host.node.name}"
                )
            return f"needs {what} on one host; largest free: {host.units} on {host.node.name}"
        where = " in one cluster" if len(clusters) > 1 else ""
        room = sum(len(b) for cls, sf in classes for b in cls.buckets[sf.units :])
        return f"needs {len(reqs)} hosts with {what} each{where}; {room} have room now"

    def _oversized(self, reqs: list[Req], clusters: list[str | None], most: int) -> str:
        where = " in one cluster" if len(clusters) > 1 else ""
        return (
            f"needs {len(reqs)} hosts for {describe(reqs[0].res)} each{where}; only {most} can "
            "ever run it: waiting for more hosts to join"
        )

    def _largest(self, classes: list[tuple[HostClass, StaticFit]]) -> tuple[Host, StaticFit]:
        """The host with the most free units among ``classes`` (on a tie, the first by id)."""
        best: tuple[int, str, StaticFit] | None = None
        for cls, sf in classes:
            if cls.top >= 0:
                node_id = cls.buckets[cls.top][0]
                if best is None or (cls.top, best[1]) > (best[0], node_id):
                    best = (cls.top, node_id, sf)
        assert best is not None
        return self.cap.hosts[best[1]], best[2]

    # -- preemption ----------------------------------------------------------------------------
    def _preempting(self, gang: Gang, d: Decision) -> str:
        """Record a preemption decision; returns the gang's reason."""
        targets = [
            a.model_copy(update={"job_id": job.job_id})
            for job, a in zip(gang.jobs, d.targets, strict=True)
        ]
        self.out.preemption_targets[gang.key] = targets
        runs = sorted({v.run.run_name for v in d.victims} | {j.run_name for j in d.waits_for})
        if d.victims:
            self.out.preemptions.append(
                Preemption(
                    by_run=gang.run.run_name,
                    job_ids=[j.job_id for v in d.victims for j in v.jobs],
                    message=f"preempted by run {gang.run.run_name} (priority {gang.run.priority})",
                )
            )
        hosts = list(zip(d.hosts, d.need, d.matching, strict=True))
        self.out.reservations.append(
            self.backfill.hold(gang.key, d.start, hosts, after=len(self.out.assignments))
        )
        return f"waiting for run(s) {', '.join(runs)} to stop: it starts on their GPUs (preemption)"
