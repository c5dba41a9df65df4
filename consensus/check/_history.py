"""Operations and histories: what a linearizability check is given.

A history is the client-side view of a concurrent system: for every operation, who issued it, what
it asked for, what it got back, when it was invoked and when it returned, and whether the outcome
is known. This module holds only data; the search lives in `_wgl.py` and the recorder that builds
histories from live clients in `_recorder.py`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

__all__ = ["History", "Op", "Outcome"]


class Outcome(enum.Enum):
    """How an operation ended, as Jepsen names it."""

    OK = "ok"
    """It took effect exactly once, between its invocation and its return, with this output."""
    FAIL = "fail"
    """It definitely did not take effect (the server said so). The checker drops it."""
    INFO = "info"
    """Unknown (a timeout, a crash): it may have taken effect at any time after its invocation,
    even after the client gave up, or never. Its output is ignored."""


@dataclass(frozen=True, slots=True)
class Op:
    """One completed (or abandoned) operation of a history.

    `input` and `output` are interpreted by the model (see `_models.py` for the built-in shapes,
    e.g. `("write", 3)` with output `None`, `("read",)` with output `3`). Times are any
    non-decreasing numbers from one monotonic clock; only their order matters. `ret` is `None`
    only for an `INFO` operation that never returned.
    """

    client: Hashable
    input: Any
    output: Any = None
    call: float = 0
    ret: float | None = None
    outcome: Outcome = Outcome.OK

    def __post_init__(self) -> None:
        if self.ret is None:
            if self.outcome is not Outcome.INFO:
                raise ValueError(f"an {self.outcome.value} operation needs a return time: {self!r}")
        elif self.ret < self.call:
            raise ValueError(f"operation returns before it is invoked: {self!r}")

    @property
    def effective_ret(self) -> float:
        """The return time the checker uses: an `INFO` operation may take effect arbitrarily late,
        so its return is at +infinity whatever the client observed."""
        if self.outcome is Outcome.INFO or self.ret is None:
            return math.inf
        return self.ret


class History(Sequence[Op]):
    """An immutable, ordered collection of operations.

    The position of an operation in the history is its identity in check results and reports
    (`#12`), so two equal operations stay distinct.
    """

    __slots__ = ("_ops",)

    def __init__(self, ops: Iterable[Op] = ()) -> None:
        self._ops: tuple[Op, ...] = tuple(ops)
        for op in self._ops:
            if not isinstance(op, Op):
                raise TypeError(f"a History holds Op instances, not {type(op).__name__}")

    @overload
    def __getitem__(self, index: int) -> Op: ...
    @overload
    def __getitem__(self, index: slice) -> History: ...
    def __getitem__(self, index: int | slice) -> Op | History:
        if isinstance(index, slice):
            return History(self._ops[index])
        return self._ops[index]

    def __len__(self) -> int:
        return len(self._ops)

    def __iter__(self) -> Iterator[Op]:
        return iter(self._ops)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, History):
            return self._ops == other._ops
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._ops)

    def __repr__(self) -> str:
        return f"History({len(self._ops)} ops)"

    @property
    def ops(self) -> tuple[Op, ...]:
        """The operations, in recording order."""
        return self._ops

    def clients(self) -> list[Hashable]:
        """The distinct clients, in order of first appearance."""
        return list(dict.fromkeys(op.client for op in self._ops))
