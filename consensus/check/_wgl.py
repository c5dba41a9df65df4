"""The Wing-Gong-Lowe search for one partition of a history.

This is Lowe's improved version of Wing and Gong's algorithm, in the shape Porcupine
(anishathalye/porcupine, `checker.go`) made popular:

* Every operation becomes a call event and a return event, sorted by time into a doubly linked
  list. The first *return* event in the list belongs to the oldest operation not yet linearized;
  every call before it is an operation that may go next.
* Depth-first: try the candidates; if the model accepts one, "lift" its call and return out of
  the list, push it, and restart from the head. Reaching a return event means the operation it
  belongs to cannot be linearized after what was chosen: pop the last choice, put it back and
  try the next candidate after it.
* Memoization (Lowe): a configuration is the set of linearized operations plus the model state;
  the future only depends on that, so a configuration seen before is never explored again. The
  set is a Python int used as a bitset.

Additions of our own, each argued where it is implemented:

* INFO operations would otherwise multiply the configurations by every subset of the pending
  ones. A configuration is skipped when one with the same OK operations and state but a subset
  of its INFO operations was explored (dominance), and INFO operations with equal inputs are
  only used in invocation order (symmetry).
* A read-only operation that is legal is never a wrong first choice: try one first, and when it
  leads to a dead end, so does the configuration it was taken from.

Outcomes: an `INFO` operation's return is at +infinity, so it may be linearized anywhere after its
call; it is *optional*: the search succeeds once every `OK` operation is linearized, whether or
not the remaining `INFO` ones were (leaving one out is "it never took effect"). `FAIL` operations
never reach this module.

The search is pure: it reads no clock of its own; the caller passes one for the deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

from ._history import Op, Outcome
from ._model import Model

__all__ = ["SearchOutcome", "search"]

# How many model steps run between two looks at the clock: often enough that a deadline is met
# within milliseconds, rarely enough that the clock costs nothing measurable.
_CLOCK_EVERY = 1024


@dataclass(frozen=True, slots=True)
class SearchOutcome:
    """The result of searching one partition. Indices are positions in the `ops` given."""

    linearizable: bool | None
    """True, False, or None when the budget ran out first."""
    order: tuple[int, ...]
    """A complete linearization when linearizable; otherwise the longest partial one found."""
    state: Hashable
    """The model state after `order`."""
    blocker: int | None
    """When not linearizable: the operation whose return ended the longest partial
    linearization (it had to take effect before then, and nothing legal could go next)."""
    candidates: tuple[int, ...]
    """The operations that could have gone next after `order` (all rejected or exhausted)."""
    steps: int
    """How many times the model's `step` ran."""


def search(
    model: Model[Any],
    ops: Sequence[Op],
    *,
    deadline: float | None = None,
    clock: Callable[[], float] | None = None,
    max_steps: int | None = None,
) -> SearchOutcome:
    """Decide whether `ops` (one partition, no `FAIL` ops) is linearizable with respect to
    `model`. Stops with `linearizable=None` once `max_steps` model steps have run or `clock()`
    has reached `deadline`."""
    if deadline is not None and clock is None:
        raise ValueError("a deadline needs a clock")
    n = len(ops)
    required = [op.outcome is Outcome.OK for op in ops]
    read_only = [model.read_only(op) for op in ops]
    required_left = sum(required)

    # Event e: call of op e >> 1 when e is even, its return when odd. At equal times calls sort
    # before returns, so touching intervals count as concurrent (the permissive reading: a
    # clock's resolution cannot order them).
    events = sorted(
        [(op.call, 0, 2 * i) for i, op in enumerate(ops)]
        + [(op.effective_ret, 1, 2 * i + 1) for i, op in enumerate(ops)]
    )
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for _, _, e in events:
        nxt[last] = e
        prv[e] = last
        last = e

    # Optional (INFO) ops with equal inputs are interchangeable once both are invoked: neither
    # ever returns, so either can take the other's place in any order. Only ever linearize a
    # prefix of each group of twins, in invocation order; `twin[i]` is the previous one.
    twin = [-1] * n
    latest: dict[Hashable, int] = {}
    for _, _, e in events:
        i = e >> 1
        if e & 1 or required[i]:
            continue
        try:
            twin[i] = latest.get(ops[i].input, -1)
            latest[ops[i].input] = i
        except TypeError:  # an unhashable input simply has no twins
            pass

    # Bit positions: OK ops in order of return, INFO ops (separately) in order of call. Every OK op
    # returning before the oldest pending one is linearized, so the OK bitset is a run of ones
    # followed by a few bits near the frontier; the memo stores it as (run length, the bits
    # above the run), small ints instead of one int as wide as the history.
    bit = [0] * n
    ranks = [0, 0]  # next position for INFO ops, OK ops
    for _, is_return, e in events:
        i = e >> 1
        if is_return == required[i]:  # an OK op's return, or an INFO op's call
            bit[i] = 1 << ranks[is_return]
            ranks[is_return] += 1

    step = model.step
    state = model.init()
    done_req = 0  # bitset of linearized OK ops
    done_opt = 0  # bitset of linearized INFO ops
    # Memo: (done_req, state) -> the sets of INFO ops linearized along explored paths that
    # reached it, kept minimal. A configuration is a dead end if an explored one with the same
    # OK ops and state used a subset of its INFO ops: INFO ops constrain no one (they never
    # return), so having more of them still unused can only add options, never remove one.
    # Without INFO ops this is exactly Lowe's cache of (linearized set, state).
    seen: dict[tuple[int, int, Hashable], list[int]] = {}
    chosen: list[int] = []  # call events, in linearization order
    before: list[Hashable] = []  # the state before each chosen op, to undo it
    steps = 0
    next_look = 0  # look at the budget before the first step too: it may be spent already

    best_depth = -1
    best_order: list[int] = []
    best_state = state
    best_blocker: int | None = None
    best_candidates: list[int] = []

    # Candidates are tried in invocation order, INFO ops included, so an INFO op is first tried
    # where it most often took effect: right after its invocation. (Trying old INFO ops last
    # was measured too: about twice as fast to refute some violating histories, but up to 20x
    # slower on linearizable ones with appends, whose states remember every order tried.)
    e = nxt[head]
    new_node = True
    while required_left:
        if new_node:
            # At a configuration reached for the first time, try a legal read-only candidate
            # first: if there is one, it decides this configuration on its own (see the
            # backtrack), which spares exploring the others. It is stepped again below; reads
            # are cheap, and that keeps one path through the code that takes a candidate.
            new_node = False
            c = e
            while not c & 1 and steps < next_look:
                j = c >> 1
                if read_only[j] and required[j]:
                    steps += 1
                    if step(state, ops[j])[0]:
                        e = c
                        break
                c = nxt[c]
        # (e is a return event when every candidate has failed: the first return in the list
        # belongs to an op that had to be linearized by now. Then fall through to backtrack.)
        if not e & 1:
            i = e >> 1
            if steps >= next_look:
                if (max_steps is not None and steps >= max_steps) or (
                    deadline is not None and clock is not None and clock() >= deadline
                ):
                    if len(chosen) > best_depth:
                        # Out of budget on the way down: the current path is the witness.
                        return SearchOutcome(
                            None, tuple(c >> 1 for c in chosen), state, None, (), steps
                        )
                    return SearchOutcome(
                        None,
                        tuple(best_order),
                        best_state,
                        best_blocker,
                        tuple(best_candidates),
                        steps,
                    )
                next_look = steps + _CLOCK_EVERY
                if max_steps is not None and next_look > max_steps:
                    next_look = max_steps
            t = twin[i]
            if t >= 0 and not done_opt & bit[t]:
                e = nxt[e]  # its earlier twin is still unused: take that one instead
                continue
            steps += 1
            ok, new_state = step(state, ops[i])
            if not ok:
                e = nxt[e]
                continue
            if required[i]:
                req = done_req | bit[i]
                opt = done_opt
            else:
                req = done_req
                opt = done_opt | bit[i]
            run = (req ^ (req + 1)).bit_length() - 1
            key = (run, req >> run, new_state)
            explored = seen.get(key)
            fresh = True
            if explored is None:
                seen[key] = [opt]
            else:
                for other in explored:
                    if not other & ~opt:
                        fresh = False
                        break
                if fresh:
                    explored[:] = [other for other in explored if opt & ~other]
                    explored.append(opt)
            if fresh:
                chosen.append(e)
                before.append(state)
                state = new_state
                done_req = req
                done_opt = opt
                if required[i]:
                    required_left -= 1
                # Lift the call and its return out of the list. The removed nodes keep
                # their own links, which is what lets the backtrack below put them back.
                p = prv[e]
                q = nxt[e]
                nxt[p] = q
                prv[q] = p
                r = e + 1
                p = prv[r]
                q = nxt[r]
                nxt[p] = q
                if q != -1:
                    prv[q] = p
                e = nxt[head]
                new_node = True
                continue
            if not read_only[i]:
                e = nxt[e]
                continue
            # A legal read-only candidate whose configuration is a known dead end: the
            # current configuration is one too (see the backtrack below).
        depth = len(chosen)
        if depth > best_depth:
            # The deepest dead end so far: remember it for the report. Its blocker is the op of
            # the first return in the list; every call before that was a candidate.
            best_depth = depth
            best_order = [c >> 1 for c in chosen]
            best_state = state
            best_candidates = []
            c = nxt[head]
            while not c & 1:
                best_candidates.append(c >> 1)
                c = nxt[c]
            best_blocker = c >> 1
        # Backtrack. Undoing a read-only op undoes the configuration before it too: a read-only
        # op that is legal where it was taken can be moved to the front of any linearization
        # from there (it changes no state, and no pending op must precede it, or it would not
        # have been a candidate), so if taking it first failed, nothing else can succeed.
        while True:
            if not chosen:
                return SearchOutcome(
                    False,
                    tuple(best_order),
                    best_state,
                    best_blocker,
                    tuple(best_candidates),
                    steps,
                )
            e = chosen.pop()
            state = before.pop()
            i = e >> 1
            if required[i]:
                done_req ^= bit[i]
                required_left += 1
            else:
                done_opt ^= bit[i]
            # Put the return back, then the call (the reverse of the lift).
            r = e + 1
            p = prv[r]
            q = nxt[r]
            nxt[p] = r
            if q != -1:
                prv[q] = r
            p = prv[e]
            q = nxt[e]
            nxt[p] = e
            prv[q] = e
            if not read_only[i]:
                break
        e = nxt[e]
    return SearchOutcome(True, tuple(c >> 1 for c in chosen), state, None, (), steps)
