"""`check()`: split a history into partitions, search each within one budget, and say what it found.

The budget is shared: a deadline (from `timeout` and an injectable clock) and a count of model
steps, whichever comes first. Partitions are searched smallest first so that a huge partition that
exhausts the budget does not hide a violation in a small one; a violation anywhere is definite, so
the verdict is "not linearizable" even when another partition ran out of budget.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Any

from ._history import History, Op, Outcome
from ._model import Model
from ._wgl import search

__all__ = ["CheckResult", "PartitionResult", "Verdict", "check"]


class Verdict(enum.Enum):
    """The answer of a check."""

    LINEARIZABLE = "linearizable"
    NOT_LINEARIZABLE = "not linearizable"
    UNKNOWN = "unknown"
    """The budget ran out before an answer; nothing was proven either way."""


@dataclass(frozen=True, slots=True)
class PartitionResult:
    """The result for one partition (one key). Operations are positions in the history."""

    key: Hashable
    verdict: Verdict
    ops: tuple[int, ...]
    """The operations searched: the partition minus FAIL ops and INFO read-only ops."""
    linearization: tuple[int, ...]
    """A complete linearization when linearizable (INFO ops in it took effect; INFO ops left out
    did not); otherwise the longest linearizable prefix the search found."""
    state: Any
    """The model state after `linearization`."""
    blocker: int | None
    """When not linearizable: the operation that could not be linearized after the longest
    prefix (it had to take effect before its return, and nothing legal could go next)."""
    candidates: tuple[int, ...]
    """The operations that could have gone next after the longest prefix."""
    steps: int
    elapsed: float
    """Seconds spent on this partition, by the check's clock."""


@dataclass(frozen=True, slots=True)
class CheckResult:
    """The result of `check()`. Truthy only when the history is linearizable, so `assert result`
    fails on "unknown" too; `result.report()` explains a failure."""

    verdict: Verdict
    partitions: tuple[PartitionResult, ...]
    """One result per partition, in order of first appearance in the history."""
    history: History
    model: Model[Any]
    dropped: int
    """FAIL ops and INFO read-only ops, which cannot affect the verdict and were not searched."""
    steps: int
    elapsed: float

    def __bool__(self) -> bool:
        return self.verdict is Verdict.LINEARIZABLE

    @property
    def linearizable(self) -> bool:
        return self.verdict is Verdict.LINEARIZABLE

    @property
    def failures(self) -> list[PartitionResult]:
        """The partitions proven not linearizable."""
        return [p for p in self.partitions if p.verdict is Verdict.NOT_LINEARIZABLE]

    def report(self, *, context: int = 8) -> str:
        """A text explanation: a summary line, then for each partition that is not linearizable
        (or unknown) the end of the longest linearizable prefix, the operation that could not
        follow it, the candidates and why each was rejected, and the operations concurrent with
        it. `context` bounds each list."""
        from ._report import render  # here, not at the top: _report imports this module

        return render(self, context=context)

    def __str__(self) -> str:
        return self.report()


def check(
    history: Iterable[Op],
    model: Model[Any],
    *,
    timeout: float | None = 60.0,
    max_steps: int | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> CheckResult:
    """Check that `history` is linearizable with respect to `model`.

    Gives up with `Verdict.UNKNOWN` once `timeout` seconds (by `clock`) have passed or
    `max_steps` model steps have run, counted over all partitions; `None` removes that limit.
    `max_steps` makes a budget deterministic; the clock is read only for the deadline.
    CPU-bound: from trio, run it with `trio.to_thread.run_sync`.

    Cost: a linearizable history is usually confirmed quickly (thousands of operations per key
    from 10 clients in well under a second). Proving a violation means exhausting every order
    of everything before it, which grows exponentially with concurrency and with the number of
    INFO writes still pending (they may take effect at any later point); with a few percent of
    INFO ops over thousands of operations per key that can outlast any budget. The answer is
    then UNKNOWN, and its report still shows where the search got furthest. Memory grows with
    the search: about 1 GB after 30 s on the hardest histories measured.
    """
    if not isinstance(history, History):
        history = History(history)
    start = clock()
    deadline = None if timeout is None else start + timeout

    groups: dict[Hashable, list[int]] = {}
    dropped = 0
    for index, op in enumerate(history):
        # partition() also validates the op, so call it even for ops about to be dropped.
        key = model.partition(op)
        members = groups.setdefault(key, [])
        if op.outcome is Outcome.FAIL or (op.outcome is Outcome.INFO and model.read_only(op)):
            dropped += 1
        else:
            members.append(index)

    results: dict[Hashable, PartitionResult] = {}
    steps = 0
    for key in sorted(groups, key=lambda k: len(groups[k])):
        members = groups[key]
        began = clock()
        left = None if max_steps is None else max(0, max_steps - steps)
        found = search(
            model,
            [history[i] for i in members],
            deadline=deadline,
            clock=clock,
            max_steps=left,
        )
        steps += found.steps
        if found.linearizable is None:
            verdict = Verdict.UNKNOWN
        else:
            verdict = Verdict.LINEARIZABLE if found.linearizable else Verdict.NOT_LINEARIZABLE
        results[key] = PartitionResult(
            key=key,
            verdict=verdict,
            ops=tuple(members),
            linearization=tuple(members[i] for i in found.order),
            state=found.state,
            blocker=None if found.blocker is None else members[found.blocker],
            candidates=tuple(members[i] for i in found.candidates),
            steps=found.steps,
            elapsed=clock() - began,
        )

    partitions = tuple(results[key] for key in groups)
    verdicts = {p.verdict for p in partitions}
    if Verdict.NOT_LINEARIZABLE in verdicts:
        verdict = Verdict.NOT_LINEARIZABLE
    elif Verdict.UNKNOWN in verdicts:
        verdict = Verdict.UNKNOWN
    else:
        verdict = Verdict.LINEARIZABLE
    return CheckResult(
        verdict=verdict,
        partitions=partitions,
        history=history,
        model=model,
        dropped=dropped,
        steps=steps,
        elapsed=clock() - start,
    )
