"""Properties of the linearizability checker, against histories produced by simulating a real
atomic object and against a brute-force reading of the definition."""

from __future__ import annotations

import random
from collections.abc import Hashable
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.check import (
    CasRegisterModel,
    KeyValueModel,
    Model,
    ModelBase,
    Op,
    Outcome,
    RegisterModel,
    Verdict,
    check,
)

OK, FAIL, INFO = Outcome.OK, Outcome.FAIL, Outcome.INFO

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def simulate(
    rnd: random.Random,
    *,
    kind: str = "cas",
    ops: int = 40,
    clients: int = 5,
    keys: int = 1,
    values: int = 4,
    info_rate: float = 0.1,
    fail_rate: float = 0.05,
    max_gap: int = 3,
    max_len: int = 6,
    append: bool = True,
) -> list[Op]:
    """A history of clients running against one atomic object: each op takes effect at one
    random instant inside its window (or, for an INFO op, at any instant after its invocation, or
    never; a FAIL op never), and outputs are what the object really answered. Integer times
    make equal timestamps common. `kind` is "register", "cas" or "kv". Always linearizable."""
    verbs = {"register": ["read", "write"], "cas": ["read", "write", "cas"]}.get(
        kind, ["get", "put", "cas", "append"] if append else ["get", "put", "cas"]
    )
    domain: list[Any] = list(range(values))
    if kind == "kv":  # strings, so that append works; one letter each while that suffices
        domain = list("abcdefgh"[:values]) if values <= 8 else [f"v{v}." for v in domain]
    cursor = [0] * clients
    planned: list[tuple[Any, ...]] = []  # (client, verb, key, args, call, ret, outcome, effect)
    for _ in range(ops):
        c = rnd.randrange(clients)
        call = cursor[c] + rnd.randint(0, max_gap)
        ret = call + rnd.randint(0, max_len)
        cursor[c] = ret
        verb = rnd.choice(verbs)
        key = f"k{rnd.randrange(keys)}" if kind == "kv" else "register"
        args = {"cas": (rnd.choice([None, *domain]), rnd.choice(domain))}.get(
            verb, (rnd.choice(domain),) if verb in ("write", "put", "append") else ()
        )
        roll = rnd.random()
        if roll < info_rate:
            outcome = INFO
            # It may land long after the client gave up, or never.
            effect = call + rnd.random() * (ret - call) * 3 if rnd.random() < 0.5 else None
        elif roll < info_rate + fail_rate and verb in ("write", "put", "append"):
            outcome, effect = FAIL, None
        else:
            outcome, effect = OK, call + rnd.random() * (ret - call)
        planned.append((c, verb, key, args, call, ret, outcome, effect))

    state: dict[str, Any] = {}
    outputs: dict[int, Any] = {}
    mismatched_cas_fails: set[int] = set()
    order = sorted((p[7], i) for i, p in enumerate(planned) if p[7] is not None)
    for _, i in order:
        _, verb, key, args, *_ = planned[i]
        current = state.get(key)
        if verb in ("read", "get"):
            outputs[i] = current
        elif verb in ("write", "put"):
            state[key] = args[0]
        elif verb == "append":
            state[key] = args[0] if current is None else current + args[0]
        else:
            swapped = current == args[0]
            if swapped:
                state[key] = args[1]
            elif rnd.random() < 0.5:
                mismatched_cas_fails.add(i)  # reported as FAIL, as Jepsen does
            outputs[i] = swapped

    history = []
    for i, (c, verb, key, args, call, ret, outcome, _) in enumerate(planned):
        if i in mismatched_cas_fails:
            outcome = FAIL
        inp = (verb, key, *args) if kind == "kv" else (verb, *args)
        history.append(
            Op(
                c,
                inp,
                outputs.get(i) if outcome is OK else None,
                call,
                None if outcome is INFO else ret,
                outcome,
            )
        )
    return history


MODELS: dict[str, Model[Any]] = {
    "register": RegisterModel(),
    "cas": CasRegisterModel(),
    "kv": KeyValueModel(),
}


@SETTINGS
@given(
    rnd=st.randoms(use_true_random=False),
    kind=st.sampled_from(sorted(MODELS)),
    ops=st.integers(0, 60),
    clients=st.integers(1, 8),
    values=st.sampled_from([2, 4, 1000]),
    append=st.booleans(),
)
def test_simulated_atomic_histories_are_linearizable(
    rnd: random.Random, kind: str, ops: int, clients: int, values: int, append: bool
) -> None:
    history = simulate(
        rnd, kind=kind, ops=ops, clients=clients, keys=3, values=values, append=append
    )
    result = check(history, MODELS[kind], timeout=20)
    assert result.verdict is Verdict.LINEARIZABLE, result.report()
    # The linearization found is a witness: replaying it through the model must succeed.
    model = MODELS[kind]
    for part in result.partitions:
        state = model.init()
        for index in part.linearization:
            legal, state = model.step(state, history[index])
            assert legal


@SETTINGS
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(["read", "write", "cas"]), st.integers(0, 3), st.integers(0, 3)),
        min_size=1,
        max_size=60,
    ),
    data=st.data(),
)
def test_a_read_changed_to_an_impossible_value_is_caught(
    steps: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    # A sequential history (no two windows overlap, every outcome known) has one possible order,
    # so any read answering something other than the current value is a violation.
    history, value = [], None
    for i, (verb, a, b) in enumerate(steps):
        if verb == "read":
            inp, out = ("read",), value
        elif verb == "write":
            inp, out, value = ("write", a), None, a
        else:
            inp, out = ("cas", a, b), value == a
            value = b if out else value
        history.append(Op(i % 3, inp, out, 2 * i, 2 * i + 1))
    reads = [i for i, op in enumerate(history) if op.input[0] == "read"]
    victim = data.draw(st.sampled_from(reads)) if reads else None
    if victim is None:
        history.append(Op(0, ("read",), "impossible", 2 * len(history), 2 * len(history) + 1))
        victim = len(history) - 1
    else:
        old = history[victim]
        wrong = data.draw(st.sampled_from([v for v in [None, 0, 1, 2, 3, 99] if v != old.output]))
        history[victim] = Op(old.client, old.input, wrong, old.call, old.ret)
    result = check(history, CasRegisterModel(), timeout=20)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    (part,) = result.partitions
    # The report points at the changed read, after exactly the operations before it.
    assert part.blocker == victim
    assert list(part.linearization) == list(range(victim))


def brute_force(history: list[Op], model: Model[Any]) -> bool:
    """Linearizability straight from the definition: some order of the non-FAIL ops, containing
    every OK op and any subset of the INFO ops, respects real time and is legal."""
    ops = [op for op in history if op.outcome is not FAIL]
    required = frozenset(i for i, op in enumerate(ops) if op.outcome is OK)
    memo: dict[tuple[frozenset[int], Hashable], bool] = {}

    def search(done: frozenset[int], state: Hashable) -> bool:
        if required <= done:
            return True
        if (done, state) in memo:
            return memo[(done, state)]
        found = False
        for i, op in enumerate(ops):
            if i in done:
                continue
            # op may go next only if no other pending op returned strictly before it began.
            if any(
                j not in done and j != i and other.effective_ret < op.call
                for j, other in enumerate(ops)
            ):
                continue
            legal, after = model.step(state, op)
            if legal and search(done | {i}, after):
                found = True
                break
        memo[(done, state)] = found
        return found

    return search(frozenset(), model.init())


@st.composite
def arbitrary_histories(draw: st.DrawFn) -> list[Op]:
    """Small histories with random windows and random outputs: mostly not linearizable."""
    history = []
    for _ in range(draw(st.integers(0, 7))):
        call = draw(st.integers(0, 12))
        ret = call + draw(st.integers(0, 8))
        verb = draw(st.sampled_from(["read", "write", "cas"]))
        args = {"read": (), "write": (draw(st.integers(0, 2)),)}.get(
            verb, (draw(st.sampled_from([None, 0, 1, 2])), draw(st.integers(0, 2)))
        )
        output = {"read": draw(st.sampled_from([None, 0, 1, 2])), "write": None}.get(
            verb, draw(st.booleans())
        )
        outcome = draw(st.sampled_from([OK, OK, OK, INFO, FAIL]))
        history.append(
            Op(
                draw(st.integers(0, 3)),
                (verb, *args),
                output,
                call,
                None if outcome is INFO else ret,
                outcome,
            )
        )
    return history


@settings(max_examples=400, deadline=None)
@given(arbitrary_histories())
def test_agrees_with_brute_force(history: list[Op]) -> None:
    model = CasRegisterModel()
    expected = brute_force(history, model)
    result = check(history, model, timeout=20)
    assert result.verdict is (Verdict.LINEARIZABLE if expected else Verdict.NOT_LINEARIZABLE)


class WholeMap(ModelBase):
    """The key-value map as one object, unpartitioned: its state is every key's value."""

    inner = KeyValueModel()

    def init(self) -> tuple[tuple[str, Any], ...]:
        return ()

    def step(self, state: tuple[tuple[str, Any], ...], op: Op) -> tuple[bool, Any]:
        values = dict(state)
        key = op.input[1]
        legal, after = self.inner.step(values.get(key), op)
        values[key] = after
        return legal, tuple(sorted(values.items()))


@settings(max_examples=100, deadline=None)
@given(rnd=st.randoms(use_true_random=False), corrupt=st.booleans())
def test_partitioning_per_key_does_not_change_the_verdict(
    rnd: random.Random, corrupt: bool
) -> None:
    # Locality (Herlihy and Wing): a history is linearizable iff each key's sub-history is.
    history = simulate(rnd, kind="kv", ops=14, clients=4, keys=3)
    if corrupt and history:
        i = rnd.randrange(len(history))
        op = history[i]
        history[i] = Op(op.client, op.input, "zz", op.call, op.ret, op.outcome)
    partitioned = check(history, KeyValueModel(), timeout=20)
    whole = check(history, WholeMap(), timeout=20)
    assert partitioned.verdict is whole.verdict
    assert len(partitioned.partitions) == len({op.input[1] for op in history})


def test_thousands_of_ops_per_key_in_seconds() -> None:
    # A regression guard for the performance figure, not a benchmark: 5,000 ops on one register
    # from 10 clients, 5% unknown outcomes. It takes about a tenth of a second; the timeout is
    # generous so that a slow machine does not turn the verdict into UNKNOWN.
    history = simulate(random.Random(7), ops=5000, clients=10, info_rate=0.05, fail_rate=0.02)
    result = check(history, CasRegisterModel(), timeout=20)
    assert result.verdict is Verdict.LINEARIZABLE, result.report()
    assert len(result.partitions[0].linearization) >= 4000
