"""Built-in sequential specifications: a register, a CAS register and a key-value map.

Operations are tuples whose first element names the operation:

=====================  ==========================================  ===============================
model                  input                                       output of an OK op
=====================  ==========================================  ===============================
RegisterModel          ``("read",)``                               the value read
                       ``("write", v)``                            ignored
CasRegisterModel       the above, and ``("cas", expected, new)``   ``True``/``None`` = swapped,
                                                                   ``False`` = value did not match
KeyValueModel          ``("get", k)``                              the value (``initial`` if none)
                       ``("put", k, v)``, ``("delete", k)``        ignored
                       ``("cas", k, expected, new)``               as for the CAS register
                       ``("append", k, suffix)``                   ignored
=====================  ==========================================  ===============================

A CAS that did not match may be recorded either as OK with output ``False`` (checked: the value
really was different at some point in its window) or as FAIL (dropped, as Jepsen does). Values must
be hashable (use tuples, not lists) because they become model states. The key-value model is
partitioned per key, so its state is only ever one key's value.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from ._history import Op, Outcome
from ._model import ModelBase

__all__ = ["CasRegisterModel", "KeyValueModel", "RegisterModel"]

_INFO = Outcome.INFO


class _Cell(ModelBase):
    """One value and the register verbs on it; the public models map their inputs onto these.

    `_apply` is the single definition of what read, write, cas, append and delete mean.
    """

    def __init__(self, initial: Hashable = None) -> None:
        self.initial = initial

    def init(self) -> Hashable:
        return self.initial

    def _apply(self, state: Any, verb: str, a: Any, b: Any, op: Op) -> tuple[bool, Any]:
        if verb == "read":
            # An INFO read is normally dropped before the search (see read_only); accepting it
            # here keeps step total for models that wrap this one.
            return (op.outcome is _INFO or op.output == state), state
        if verb == "write":
            return True, a
        if verb == "cas":
            if op.output is False and op.outcome is not _INFO:
                # Observed mismatch: legal only where the value differs; no effect.
                return state != a, state
            # Succeeded, or unknown: an INFO cas that did not match is the same as one that
            # never happened, which the search already covers by leaving it out.
            return state == a, b
        if verb == "append":
            return True, a if state is None else state + a
        if verb == "delete":
            return True, self.initial
        raise ValueError(f"unknown verb {verb!r}")  # partition() validated; unreachable

    @staticmethod
    def _describe(verb: str, args: tuple[Any, ...], op: Op) -> str:
        text = f"{verb}({', '.join(repr(a) for a in args)})"
        if op.outcome is Outcome.INFO:
            return text + " -> ?"
        if op.outcome is Outcome.FAIL:
            return text + " -> failed"
        if verb in ("read", "get"):
            return f"{text} -> {op.output!r}"
        if verb == "cas":
            return text + (" -> mismatch" if op.output is False else " -> ok")
        return text


class CasRegisterModel(_Cell):
    """A single register with read, write and compare-and-set."""

    # verb -> number of arguments after the verb
    _ARITY: dict[str, int] = {"read": 0, "write": 1, "cas": 2}

    def partition(self, op: Op) -> Hashable:
        inp = op.input
        if not isinstance(inp, tuple | list) or not inp or self._ARITY.get(inp[0]) != len(inp) - 1:
            raise ValueError(
                f"{type(self).__name__} does not understand input {inp!r}; expected one of "
                + ", ".join(f"({v!r}{', x' * n})" for v, n in self._ARITY.items())
            )
        return None

    def read_only(self, op: Op) -> bool:
        return op.input[0] == "read"

    def step(self, state: Any, op: Op) -> tuple[bool, Any]:
        inp = op.input
        n = len(inp)
        return self._apply(state, inp[0], inp[1] if n > 1 else None, inp[2] if n > 2 else None, op)

    def describe_op(self, op: Op) -> str:
        return self._describe(op.input[0], tuple(op.input[1:]), op)


class RegisterModel(CasRegisterModel):
    """A single read/write register."""

    _ARITY = {"read": 0, "write": 1}


class KeyValueModel(_Cell):
    """A map of independent keys, each a CAS register that also supports append and delete.

    Partitioned per key: the checker runs one search per key, whose state is that key's value
    (`initial` before any write), which keeps long multi-key histories tractable.
    """

    # verb -> (register verb, number of arguments after the key)
    _VERBS: dict[str, tuple[str, int]] = {
        "get": ("read", 0),
        "put": ("write", 1),
        "cas": ("cas", 2),
        "append": ("append", 1),
        "delete": ("delete", 0),
    }

    def partition(self, op: Op) -> Hashable:
        inp = op.input
        spec = self._VERBS.get(inp[0]) if isinstance(inp, tuple | list) and inp else None
        if spec is None or len(inp) != spec[1] + 2:
            raise ValueError(
                f"KeyValueModel does not understand input {inp!r}; expected one of "
                + ", ".join(f"({v!r}, key{', x' * n})" for v, (_, n) in self._VERBS.items())
            )
        return inp[1]

    def read_only(self, op: Op) -> bool:
        return op.input[0] == "get"

    def step(self, state: Any, op: Op) -> tuple[bool, Any]:
        inp = op.input
        n = len(inp)
        return self._apply(
            state,
            self._VERBS[inp[0]][0],
            inp[2] if n > 2 else None,
            inp[3] if n > 3 else None,
            op,
        )

    def describe_op(self, op: Op) -> str:
        return self._describe(op.input[0], tuple(op.input[1:]), op)
