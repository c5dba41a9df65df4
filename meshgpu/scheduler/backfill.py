"""Backfill: reservations for blocked gangs, and the rule for using a reserved host.

A gang that cannot start reserves the hosts where it can start soonest; its *reserved start* is
when, by the deadlines of what runs there (``deadlines.py``), those hosts will have room for it.
Another job may then use a reserved host only if

1. its own deadline is no later than the reserved start (it will be gone), or
2. it fits in the host's *slack*: what the host will have free at the reserved start beyond the
   reserving gang's needs -- and it uses that slack up.

When the reserved start is unknown (something there has no ``max_duration``), rule 1 never holds
and the slack is only what is free now beyond the gang's needs: no backfill that could matter.
So a backfilled job can never delay a reserved start (EASY backfill). Choosing *where* to reserve
weighs a bounded set of candidate hosts -- those with most free units and those whose work ends
first -- so a reservation costs the same on ten hosts or ten thousand; the choice is always a
valid reservation, a larger set only finds an earlier one.
"""

from __future__ import annotations

from meshgpu.scheduler.capacity import Capacity, Host, HostClass, Reservation
from meshgpu.scheduler.deadlines import INF
from meshgpu.scheduler.matching import Req
from meshgpu.scheduler.policy import SchedulerPolicy

_CLUSTERS_WEIGHED = 3  # a multi-node gang's reservation weighs this many clusters at most


class Backfill:
    """Reservations of one plan."""

    def __init__(self, cap: Capacity, policy: SchedulerPolicy) -> None:
        self.cap = cap
        self.policy = policy

    def reserve(
        self,
        gang: tuple[str, int],
        reqs: list[Req],
        clusters: list[str | None],
        oversized: bool,
        after: int,
    ) -> Reservation | None:
        """Reserve the hosts where the gang can start soonest. An oversized gang (more jobs than
        hosts that could ever run them) holds what it can get, per the policy."""
        if oversized and not self.policy.hold_for_oversized_gangs:
            return None
        pools = self._candidates(reqs, clusters)
        best: tuple[float, list[tuple[Host, int, frozenset[int] | None]]] | None = None
        partial: list[tuple[Host, int, frozenset[int] | None]] = []
        for pool in pools.values():
            # Per distinct requirement: the pool's hosts by when they can take one job.
            ranked: dict[str, list[tuple[float, str, Host, int, frozenset[int] | None]]] = {}
            for req in reqs:
                if req.key in ranked:
                    continue
                options = []
                for host in pool:
                    sf = self.cap.fit(req, host.cls)
                    if sf.ok:
                        matching = None if sf.all_match else sf.matching
                        at = self.cap.ready_time(host, sf.units, matching)
                        options.append((at, host.node_id, host, sf.units, matching))
                options.sort(key=lambda o: o[:2])
                ranked[req.key] = options
            chosen: list[tuple[Host, int, frozenset[int] | None]] = []
            used: set[str] = set()
            start = 0.0
            for req in reqs:
                pick = next((o for o in ranked[req.key] if o[1] not in used), None)
                if pick is None:
                    break
                start = max(start, pick[0])
                chosen.append((pick[2], pick[3], pick[4]))
                used.add(pick[1])
            if len(chosen) == len(reqs):
                if best is None or start < best[0]:
                    best = (start, chosen)
            elif len(chosen) > len(partial):
                partial = chosen
        if best is None:
            if not oversized or not partial:
                return None  # every candidate host is promised to gangs ahead
            best = (INF, partial)
        start, chosen = best
        r = Reservation(gang, start, after=after)
        for host, units, matching in chosen:
            r.need[host.node_id] = units
            r.matching[host.node_id] = matching
            r.slack[host.node_id] = self._slack(host, units, matching, start)
            self.cap.reserve(host, r)
        return r

    def hold(
        self,
        gang: tuple[str, int],
        start: float,
        hosts: list[tuple[Host, int, frozenset[int] | None]],
        after: int,
    ) -> Reservation:
        """Keep hosts for a preempting gang: no slack, nothing else lands there."""
        r = Reservation(gang, start, after=after, preempting=True)
        for host, units, matching in hosts:
            r.need[host.node_id] = units
            r.matching[host.node_id] = matching
            r.slack[host.node_id] = 0
            self.cap.reserve(host, r)
        return r

    def admits(
        self,
        host: Host,
        gang: tuple[str, int],
        end: float,
        gpus: tuple[int, ...],
        blocks: int,
    ) -> int | None:
        """May a job of ``gang`` with deadline ``end`` take ``gpus``/``blocks`` on ``host``?
        None if not; else how much of the host's slack it uses (0: none)."""
        r = host.reservation
        if r is None or r.gang == gang or end <= r.start < INF:
            return 0
        if host.shape is not None:
            charge = blocks
        else:
            matching = r.matching.get(host.node_id)
            charge = len(gpus) if matching is None else sum(1 for g in gpus if g in matching)
        return charge if charge <= r.slack[host.node_id] else None

    def _slack(self, host: Host, units: int, matching: frozenset[int] | None, start: float) -> int:
        free = self.cap.free_units(host, matching)
        if start == INF:
            return max(0, free - units)
        due = sum(
            self.cap.units(host, g, b, matching)
            for e, g, b in self.cap.releases(host)
            if e <= start
        )
        return max(0, free + due - units)

    def _candidates(
        self, reqs: list[Req], clusters: list[str | None]
    ) -> dict[str | None, list[Host]]:
        """Unreserved hosts worth weighing for a reservation, per cluster: the ones with most
        free units, and the ones whose work ends first -- a bounded number, so a reservation
        costs the same on a mesh of ten hosts or ten thousand."""
        by_cluster = clusters != [None]
        if by_cluster and len(clusters) > _CLUSTERS_WEIGHED:
            clusters = self._likely_clusters(reqs, clusters)
        k = max(len(reqs) + 1, self.policy.reservation_candidates // (2 * len(clusters)))
        fits: dict[int, HostClass] = {}
        for req in reqs:
            for cls, _ in self.cap.feasible(req):
                fits[cls.uid] = cls
        hosts = self.cap.hosts
        pools: dict[str | None, dict[str, Host]] = {c: {} for c in clusters}

        def take(host: Host) -> bool:
            pool = pools.get(host.cls.cluster if by_cluster else None)
            if pool is None or host.reservation is not None or host.node_id in pool:
                return False
            if reqs[0].filters.by_name() and reqs[0].filters.reject(host.node):
                return False
            pool[host.node_id] = host
            return True

        for cluster in clusters:
            added = 0
            classes = [c for c in fits.values() if not by_cluster or c.cluster == cluster]
            top = max((len(c.buckets) for c in classes), default=0)
            for v in range(top - 1, -1, -1):
                for cls in classes:
                    if v < len(cls.buckets):
                        for node_id in cls.buckets[v]:
                            added += take(hosts[node_id])
                            if added >= k:
                                break
                    if added >= k:
                        break
                if added >= k:
                    break
        if self.cap.deadlines.now is not None:
            full = 0
            room = {c: k for c in clusters}
            for _, _, node_id in self.cap.index.by_end:
                host = hosts.get(node_id)
                if host is None or host.cls.uid not in fits:
                    continue
                c = host.cls.cluster if by_cluster else None
                if room.get(c, 0) > 0 and take(host):
                    room[c] -= 1
                    if room[c] == 0:
                        full += 1
                        if full == len(clusters):
                            break
        return {c: list(p.values()) for c, p in pools.items()}

    def _likely_clusters(self, reqs: list[Req], clusters: list[str | None]) -> list[str | None]:
        """The few clusters where a gang is likely to start first: those with room for it now,
        then those whose hosts empty first (a rough ranking; the reservation is computed
        exactly among them)."""
        n = len(reqs)
        count: dict[str | None, int] = dict.fromkeys(clusters, 0)
        order: list[str | None] = []
        for cls, sf in self.cap.feasible(reqs[0]):
            if cls.cluster in count and cls.top >= sf.units:
                count[cls.cluster] += sum(len(cls.buckets[v]) for v in range(sf.units, cls.top + 1))
        order = [c for c in clusters if count[c] >= n]
        if len(order) < _CLUSTERS_WEIGHED:
            fits = {cls.uid for cls, _ in self.cap.feasible(reqs[0])}
            for _, _, node_id in self.cap.index.by_end:
                host = self.cap.hosts.get(node_id)
                if host is None or host.cls.uid not in fits or host.reservation is not None:
                    continue
                c = host.cls.cluster
                count[c] += 1
                if count[c] == n:
                    order.append(c)
                    if len(order) >= _CLUSTERS_WEIGHED:
                        break
        return order[:_CLUSTERS_WEIGHED] or clusters
