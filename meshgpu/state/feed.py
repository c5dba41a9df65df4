"""The change feed: what ``apply`` changed, for readers that keep indexes derived from the state.

The state machine notes, in apply order, the ids of the jobs whose status or placement changed
(created, placed, started, stopping, ended, forgotten), of the nodes whose record, status or
holdings changed, and of the runs whose queue-relevant fields changed in place (a new priority).
A reader -- the scheduler's ``SchedulerIndex`` -- keeps a ``Cursor`` and asks for what changed
since; it then looks the ids up in the state as it stands. An id may appear more than once.

The feed is bounded: past ``limit`` entries the older half is dropped. A restore replaces the
whole state and starts a new *epoch*. Either way ``since`` answers ``None`` for a cursor it can
no longer serve, and the reader rebuilds from the state.
"""

from __future__ import annotations

from dataclasses import dataclass

LIMIT = 200_000  # entries kept per kind (the older half is dropped past it)


@dataclass(frozen=True, slots=True)
class Cursor:
    """A reader's position: absolute offsets into each kind's log, within one epoch."""

    epoch: int
    jobs: int
    nodes: int
    runs: int


@dataclass(frozen=True, slots=True)
class Changes:
    """Ids changed since a cursor, in the order they changed (repeats possible)."""

    jobs: list[str]
    nodes: list[str]
    runs: list[str]


class ChangeFeed:
    """Bounded logs of changed job, node and run ids (see the module docstring)."""

    __slots__ = ("epoch", "jobs", "nodes", "runs", "_bases", "limit")

    def __init__(self, limit: int = LIMIT) -> None:
        self.limit = limit
        self.epoch = 0
        self.jobs: list[str] = []
        self.nodes: list[str] = []
        self.runs: list[str] = []
        self._bases = [0, 0, 0]  # absolute offset of each log's first entry

    def job(self, job_id: str) -> None:
        jobs = self.jobs
        jobs.append(job_id)
        if len(jobs) > self.limit:
            self._trim(jobs, 0)

    def node(self, node_id: str) -> None:
        nodes = self.nodes
        nodes.append(node_id)
        if len(nodes) > self.limit:
            self._trim(nodes, 1)

    def run(self, run_name: str) -> None:
        runs = self.runs
        runs.append(run_name)
        if len(runs) > self.limit:
            self._trim(runs, 2)

    def _trim(self, log: list[str], kind: int) -> None:
        drop = len(log) // 2
        del log[:drop]
        self._bases[kind] += drop

    def reset(self) -> None:
        """The state was replaced (a restore): a new epoch; every reader rebuilds."""
        self.epoch += 1
        self.jobs.clear()
        self.nodes.clear()
        self.runs.clear()
        self._bases = [0, 0, 0]

    def cursor(self) -> Cursor:
        """The position after everything noted so far."""
        b = self._bases
        return Cursor(
            self.epoch, b[0] + len(self.jobs), b[1] + len(self.nodes), b[2] + len(self.runs)
        )

    def since(self, cursor: Cursor | None) -> Changes | None:
        """What changed after ``cursor``; None when it cannot say (no cursor, another epoch,
        or entries since dropped): the reader rebuilds from the state."""
        if cursor is None or cursor.epoch != self.epoch:
            return None
        out = []
        for pos, log, base in zip(
            (cursor.jobs, cursor.nodes, cursor.runs),
            (self.jobs, self.nodes, self.runs),
            self._bases,
            strict=True,
        ):
            if pos < base or pos > base + len(log):
                return None
            out.append(log[pos - base :])
        return Changes(*out)
