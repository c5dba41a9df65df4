"""The sequential specification a history is checked against.

A model says what a single-copy, one-at-a-time object would answer: `init()` gives the starting
state and `step(state, op)` says whether `op` (with its recorded output) is legal in `state` and
what the state is afterwards. States must be hashable and compare by value, because the search
memoizes on (set of linearized operations, state): two paths that reach the same state with the
same operations done are explored once.

`partition(op)` is Porcupine's P-compositionality: linearizability is local (Herlihy and Wing), so
operations on independent objects (the keys of a map) can be checked separately, which turns one
exponential search into many small ones. Every operation belongs to exactly one partition.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Protocol, TypeVar, runtime_checkable

from ._history import Op

__all__ = ["Model", "ModelBase"]

S = TypeVar("S", bound=Hashable)


@runtime_checkable
class Model(Protocol[S]):
    """What the checker needs from a sequential specification."""

    def init(self) -> S:
        """The state of every partition before any operation."""
        ...

    def step(self, state: S, op: Op) -> tuple[bool, S]:
        """Apply `op` to `state`: `(True, new_state)` if `op` with its recorded output is legal
        in `state`, `(False, anything)` if not. For an `INFO` op the output is unknown; answer
        whether it can take effect here (the checker separately tries "it never took effect").
        Must be pure and depend only on `op.input`, `op.output` and `op.outcome`: the search
        calls it many times on the same arguments, and treats INFO ops with equal inputs as
        interchangeable."""
        ...

    def partition(self, op: Op) -> Hashable:
        """The label of the independent sub-history `op` belongs to (a key for a map; one
        constant for a single object). Raises `ValueError` for an op this model does not
        understand, so that a malformed history fails before the search starts."""
        ...

    def read_only(self, op: Op) -> bool:
        """True if `step` never changes the state for `op`. The checker relies on it: it drops
        `INFO` read-only ops (unknown output, no effect: they carry no information), and it
        linearizes a legal read-only op as soon as it may, without trying alternatives. When in
        doubt, answer False; that is always correct, only slower."""
        ...

    def describe_op(self, op: Op) -> str:
        """A short human form of the operation and its output, for reports: `cas(1, 2) -> ok`."""
        ...

    def describe_state(self, state: S) -> str:
        """A short human form of a state, for reports."""
        ...


class ModelBase:
    """Defaults for the optional parts of `Model`: one partition, nothing read-only, `repr`
    descriptions. Subclass it and write `init` and `step`."""

    def partition(self, op: Op) -> Hashable:
        return None

    def read_only(self, op: Op) -> bool:
        return False

    def describe_op(self, op: Op) -> str:
        return f"{op.input!r} -> {op.output!r}"

    def describe_state(self, state: Any) -> str:
        return repr(state)
