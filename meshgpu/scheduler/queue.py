"""The wait queue: waiting jobs grouped the way the scheduler consumes them, kept up to date from
the state's change feed (``index.py``) so that a plan never re-sorts or re-groups ten thousand
jobs.

A *gang* is what must start together: the waiting jobs of one run replica (all nodes of a task,
one replica of a service). Gangs with the same priority, project and placement requirements form a
*class*; inside a class gangs stay in FIFO order (run submission time, then name, then replica).
The scheduler merges classes in priority order and, at equal priority, across projects -- and
because every gang of a class fits exactly the same hosts, one failed gang settles the rest of its
class for that plan.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from meshgpu.state.records import JobRecord, RunRecord

GangKey = tuple[str, int]  # (run_name, replica_num)
OrderKey = tuple[float, str, int]  # (run submitted_at, run_name, replica_num)
ClassKey = tuple[int, str, str, tuple[str, ...]]  # (priority, project, placement key, job keys)


@dataclass(eq=False, slots=True)
class Gang:
    """The waiting jobs of one run replica, in job-number order."""

    key: GangKey
    run: RunRecord
    order: OrderKey
    jobs: list[JobRecord]
    cls: QueueClass


@dataclass(eq=False, slots=True)
class QueueClass:
    """Gangs that are interchangeable to the scheduler, in FIFO order."""

    key: ClassKey
    order: list[OrderKey] = field(default_factory=list)  # sorted
    gangs: dict[OrderKey, Gang] = field(default_factory=dict)
    job_ids: dict[str, None] = field(default_factory=dict)  # an ordered set of waiting job ids

    @property
    def priority(self) -> int:
        return self.key[0]

    @property
    def project(self) -> str:
        return self.key[1]

    def head(self) -> Gang | None:
        return self.gangs[self.order[0]] if self.order else None

    def in_order(self) -> list[Gang]:
        return [self.gangs[k] for k in self.order]


class WaitQueue:
    """Index of waiting jobs: by gang, by class, by priority."""

    def __init__(self) -> None:
        self.gangs: dict[GangKey, Gang] = {}
        self.classes: dict[ClassKey, QueueClass] = {}
        self._by_job: dict[str, Gang] = {}
        self._levels: list[tuple[int, list[QueueClass]]] | None = None

    def __len__(self) -> int:
        return len(self._by_job)

    def add_gang(self, run: RunRecord, jobs: list[JobRecord]) -> None:
        """Queue jobs that became waiting together (a submission, or a requeued gang)."""
        if not jobs:
            return
        jobs = sorted(jobs, key=lambda j: j.job_num)
        key = (run.run_name, jobs[0].replica_num)
        old = self.gangs.get(key)
        if old is not None:
            # Should not happen (gangs are queued whole); merge rather than lose a job.
            jobs = sorted(
                {j.job_id: j for j in [*old.jobs, *jobs]}.values(), key=lambda j: j.job_num
            )
            self._drop_gang(old)
        ckey: ClassKey = (
            run.priority,
            run.project,
            # A service replica's gang is one group: its placement (spot_policy, image, ...).
            run.spec.placement_of(jobs[0].group).key,
            tuple(j.resources_key for j in jobs),
        )
        cls = self.classes.get(ckey)
        if cls is None:
            cls = self.classes[ckey] = QueueClass(ckey)
            self._levels = None
        order = (run.submitted_at, run.run_name, key[1])
        gang = Gang(key, run, order, list(jobs), cls)
        self.gangs[key] = gang
        bisect.insort(cls.order, order)
        cls.gangs[order] = gang
        for j in jobs:
            cls.job_ids[j.job_id] = None
            self._by_job[j.job_id] = gang

    def reclassify(self, run: RunRecord, replicas: list[int]) -> None:
        """Move the run's waiting gangs to the classes its changed fields (a new priority) put
        them in; each keeps its place, which follows the run's submission time."""
        for replica in replicas:
            gang = self.gangs.get((run.run_name, replica))
            if gang is not None:
                jobs = gang.jobs
                self._drop_gang(gang)
                self.add_gang(run, jobs)

    def discard(self, job_id: str) -> None:
        """The job no longer waits (assigned, stopped, forgotten)."""
        gang = self._by_job.pop(job_id, None)
        if gang is None:
            return
        gang.jobs = [j for j in gang.jobs if j.job_id != job_id]
        del gang.cls.job_ids[job_id]
        if not gang.jobs:
            self._drop_gang(gang)

    def _drop_gang(self, gang: Gang) -> None:
        cls = gang.cls
        for j in gang.jobs:
            cls.job_ids.pop(j.job_id, None)
            self._by_job.pop(j.job_id, None)
        i = bisect.bisect_left(cls.order, gang.order)
        if i < len(cls.order) and cls.order[i] == gang.order:
            del cls.order[i]
        cls.gangs.pop(gang.order, None)
        self.gangs.pop(gang.key, None)
        if not cls.order:
            del self.classes[cls.key]
            self._levels = None

    def gang_of(self, job_id: str) -> Gang | None:
        return self._by_job.get(job_id)

    def by_priority(self) -> list[tuple[int, list[QueueClass]]]:
        """Classes grouped by priority, highest first (classes in a stable order)."""
        levels: dict[int, list[QueueClass]] = {}
        for cls in self.classes.values():
            levels.setdefault(cls.priority, []).append(cls)
        return [(p, sorted(levels[p], key=lambda c: c.key)) for p in sorted(levels, reverse=True)]
