"""The scheduler's indexes of one state, kept up to date from the state's change feed.

A plan must cost what changed, not the size of the queue or of the mesh, so the scheduler keeps
what it derives from the state between plans:

- the wait queue (``queue.py``): waiting jobs grouped into gangs and classes;
- GPUs held per project (fair share);
- the host index (``capacity.py``): active hosts by class and free units.

``SchedulerIndex.sync(state)`` reads the state's change feed (``meshgpu.state.feed``) from where
it stopped and looks up only the jobs, nodes and runs noted there; when the feed cannot serve
its cursor (the first sync, a restore, entries dropped) it rebuilds from the state. Built
incrementally or from scratch, the index is the same (``tests/scheduler/test_index.py``).

The index belongs to whoever schedules: the leader's ``Scheduling`` controller keeps one for its
term; ``SchedulerIndex.shared(state)`` is one per state object for callers that keep none
(offers, tests, tools). The state knows nothing of it: it only writes the feed.
"""

from __future__ import annotations

import weakref

from meshgpu.scheduler.capacity import HostIndex
from meshgpu.scheduler.queue import GangKey, WaitQueue
from meshgpu.state.feed import ChangeFeed, Changes, Cursor
from meshgpu.state.machine import StateMachine
from meshgpu.state.records import JobRecord, JobStatus

_SHARED: weakref.WeakKeyDictionary[StateMachine, SchedulerIndex] = weakref.WeakKeyDictionary()


class SchedulerIndex:
    """The wait queue, per-project GPU usage and host index of one state (module docstring)."""

    def __init__(self) -> None:
        self.queue = WaitQueue()
        self.project_gpus: dict[str, int] = {}  # GPUs held by each project's jobs
        self.hosts = HostIndex()
        self._counted: dict[str, tuple[str, int]] = {}  # job_id -> (project, GPUs) counted
        self._feed: ChangeFeed | None = None
        self._cursor: Cursor | None = None
        self.rebuilds = 0  # how many times it started over (tests, diagnostics)

    @classmethod
    def shared(cls, state: StateMachine) -> SchedulerIndex:
        """The index kept for ``state`` by this module, for callers that keep none."""
        index = _SHARED.get(state)
        if index is None:
            index = _SHARED[state] = cls()
        return index

    def sync(self, state: StateMachine) -> None:
        """Bring the index up to date with ``state``: what the feed noted since the last sync,
        or everything when the feed cannot say."""
        feed = state.feed
        changes = feed.since(self._cursor) if feed is self._feed else None
        if changes is None:
            self._rebuild(state)
        else:
            self._apply(state, changes)
        self._feed = feed
        self._cursor = feed.cursor()

    # -- from scratch --------------------------------------------------------------------------
    def _rebuild(self, state: StateMachine) -> None:
        self.rebuilds += 1
        self.queue = WaitQueue()
        self.project_gpus = {}
        self._counted = {}
        self.hosts = HostIndex()
        gangs: dict[GangKey, list[JobRecord]] = {}
        for job in state.active.values():
            if job.status is JobStatus.SUBMITTED:
                gangs.setdefault((job.run_name, job.replica_num), []).append(job)
            else:
                self._count(state, job.job_id, job)
        for key in sorted(gangs):
            self.queue.add_gang(state.runs[key[0]], gangs[key])
        self.hosts.sync(state, None)

    # -- incrementally -------------------------------------------------------------------------
    def _apply(self, state: StateMachine, changes: Changes) -> None:
        jobs = state.jobs
        queue = self.queue
        fresh: dict[GangKey, list[JobRecord]] = {}
        for job_id in dict.fromkeys(changes.jobs):
            job = jobs.get(job_id)
            if job is not None and job.status is JobStatus.SUBMITTED:
                if queue.gang_of(job_id) is None:
                    fresh.setdefault((job.run_name, job.replica_num), []).append(job)
                continue
            queue.discard(job_id)
            self._count(state, job_id, job)
        # Gangs became waiting together (a submission, a replica resubmitted): queued whole.
        for key, members in fresh.items():
            queue.add_gang(state.runs[key[0]], members)
        # Runs changed in place (a new priority): their waiting gangs move to their new class.
        for run_name in dict.fromkeys(changes.runs):
            run = state.runs.get(run_name)
            if run is None:
                continue
            replicas = {g.key[1] for j in run.job_ids if (g := queue.gang_of(j)) is not None}
            if replicas:
                queue.reclassify(run, sorted(replicas))
        self.hosts.sync(state, changes.nodes)

    def _count(self, state: StateMachine, job_id: str, job: JobRecord | None) -> None:
        """Fair share: count the job's GPUs for its project while it holds them."""
        holds = (
            job is not None
            and job.node_id is not None
            and job.status.holds_resources()
            and bool(job.gpu_indices)
        )
        counted = self._counted.get(job_id)
        if holds == (counted is not None):
            return
        usage = self.project_gpus
        if counted is None:
            assert job is not None
            run = state.runs.get(job.run_name)
            project = run.project if run is not None else ""
            gpus = len(job.gpu_indices)
            self._counted[job_id] = (project, gpus)
            usage[project] = usage.get(project, 0) + gpus
        else:
            del self._counted[job_id]
            project, gpus = counted
            left = usage[project] - gpus
            if left > 0:
                usage[project] = left
            else:
                del usage[project]
