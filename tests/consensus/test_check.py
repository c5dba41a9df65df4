"""The linearizability checker on histories built by hand: known-good, known-bad, the budget,
the recorder and the report."""

from __future__ import annotations

import itertools
import threading

import pytest
import trio

from consensus.check import (
    CasRegisterModel,
    CheckResult,
    History,
    KeyValueModel,
    Model,
    ModelBase,
    Op,
    Outcome,
    Recorder,
    RegisterModel,
    Verdict,
    check,
)

OK, FAIL, INFO = Outcome.OK, Outcome.FAIL, Outcome.INFO


def w(client: object, value: object, call: float, ret: float | None, outcome: Outcome = OK) -> Op:
    return Op(client, ("write", value), None, call, ret, outcome)


def r(client: object, value: object, call: float, ret: float) -> Op:
    return Op(client, ("read",), value, call, ret)


def cas(
    client: object,
    expected: object,
    new: object,
    call: float,
    ret: float | None,
    output: object = True,
    outcome: Outcome = OK,
) -> Op:
    return Op(client, ("cas", expected, new), output, call, ret, outcome)


# --- known linearizable -------------------------------------------------------------------------


def test_porcupine_readme_examples() -> None:
    # The two register histories of Porcupine's README (from MIT 6.824's 2017 quiz 2).
    good = [w(0, 100, 0, 100), r(1, 100, 25, 75), r(2, 0, 30, 60)]
    bad = [w(0, 200, 0, 100), r(1, 200, 10, 30), r(2, 0, 40, 90)]
    assert check(good, RegisterModel(initial=0)).verdict is Verdict.LINEARIZABLE
    assert check(bad, RegisterModel(initial=0)).verdict is Verdict.NOT_LINEARIZABLE


def test_overlapping_writes_may_take_effect_in_either_order() -> None:
    # w1 and w2 overlap; the reads force w2 before w1, the reverse of their invocation order.
    history = [w(1, 1, 0, 10), w(2, 2, 5, 15), r(3, 2, 6, 8), r(3, 1, 12, 20)]
    result = check(history, RegisterModel())
    assert result
    (part,) = result.partitions
    assert part.linearization.index(1) < part.linearization.index(0)
    assert sorted(part.linearization) == [0, 1, 2, 3]


def test_touching_intervals_count_as_concurrent() -> None:
    # The read returns at the instant the write is invoked: equal timestamps cannot be ordered.
    assert check([r(1, 5, 0, 10), w(2, 5, 10, 20)], RegisterModel())
    assert not check([r(1, 5, 0, 9), w(2, 5, 10, 20)], RegisterModel())


def test_empty_history_is_linearizable() -> None:
    result = check([], RegisterModel())
    assert result.verdict is Verdict.LINEARIZABLE
    assert result.partitions == ()


def test_info_write_that_took_effect_late() -> None:
    # Its client timed out at 5, but the write landed between the two reads of the other client.
    history = [w(1, 1, 0, 5, INFO), r(2, None, 10, 11), r(2, 1, 20, 21)]
    result = check(history, RegisterModel())
    assert result
    assert 0 in result.partitions[0].linearization


def test_info_write_that_never_took_effect() -> None:
    history = [w(1, 1, 0, None, INFO), r(2, None, 10, 11), r(2, None, 20, 21)]
    result = check(history, RegisterModel())
    assert result
    assert 0 not in result.partitions[0].linearization


def test_info_write_cannot_be_undone() -> None:
    # Once a read has seen it, the value cannot go back to the initial one.
    history = [w(1, 1, 0, None, INFO), r(2, 1, 10, 11), r(2, None, 20, 21)]
    assert check(history, RegisterModel()).verdict is Verdict.NOT_LINEARIZABLE


def test_failed_ops_are_dropped_but_info_ops_are_not() -> None:
    failed = [w(1, 5, 0, 1, FAIL), r(2, 5, 2, 3)]
    unknown = [w(1, 5, 0, 1, INFO), r(2, 5, 2, 3)]
    result = check(failed, RegisterModel())
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    assert result.dropped == 1
    assert check(unknown, RegisterModel())


def test_info_reads_are_dropped() -> None:
    history = [w(1, 1, 0, 1), Op(2, ("read",), 99, 2, None, INFO), r(3, 1, 4, 5)]
    result = check(history, RegisterModel())
    assert result
    assert result.dropped == 1
    assert result.partitions[0].ops == (0, 2)


def test_info_cas_took_effect() -> None:
    history = [w(1, 0, 0, 1), cas(2, 0, 7, 2, None, None, INFO), r(3, 7, 10, 11)]
    assert check(history, CasRegisterModel())


def test_cas_mismatch_recorded_as_ok_false() -> None:
    # cas(1, 2) observed a value other than 1: fine while the value is 0 ...
    good = [w(1, 0, 0, 1), cas(2, 1, 2, 2, 3, output=False), r(3, 0, 4, 5)]
    assert check(good, CasRegisterModel())
    # ... but a mismatch claim on the value that was certainly there is a violation.
    bad = [w(1, 1, 0, 1), cas(2, 1, 2, 2, 3, output=False)]
    assert not check(bad, CasRegisterModel())


def test_key_value_append_and_delete() -> None:
    def op(client: int, inp: tuple, out: object, call: float, ret: float) -> Op:
        return Op(client, inp, out, call, ret)

    concurrent_appends = [
        op(1, ("append", "k", "a"), None, 0, 10),
        op(2, ("append", "k", "b"), None, 0, 10),
    ]
    model = KeyValueModel()
    assert check([*concurrent_appends, op(3, ("get", "k"), "ba", 11, 12)], model)
    assert check([*concurrent_appends, op(3, ("get", "k"), "ab", 11, 12)], model)
    assert not check([*concurrent_appends, op(3, ("get", "k"), "aa", 11, 12)], model)
    deleted = [
        op(1, ("put", "k", "x"), None, 0, 1),
        op(1, ("delete", "k"), None, 2, 3),
        op(2, ("get", "k"), None, 4, 5),
        op(2, ("cas", "k", None, "y"), True, 6, 7),
        op(2, ("get", "k"), "y", 8, 9),
    ]
    assert check(deleted, model)


# --- known violations ---------------------------------------------------------------------------


def test_stale_read() -> None:
    # A deposed leader answers from its local state after a newer write was acknowledged.
    history = [w(1, 1, 0, 1), w(1, 2, 2, 3), r(2, 1, 4, 5)]
    result = check(history, RegisterModel())
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    (part,) = result.partitions
    assert part.blocker == 2
    assert part.state == 2
    assert [history[i] for i in part.linearization] == history[:2]


def test_lost_write() -> None:
    # An acknowledged write that a later read (on any client) does not see.
    history = [
        Op(1, ("put", "x", 1), None, 0, 1),
        Op(2, ("get", "x"), 1, 2, 3),
        Op(3, ("put", "y", 5), None, 2, 3),
        Op(2, ("get", "x"), None, 4, 5),
    ]
    result = check(history, KeyValueModel())
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    by_key = {p.key: p for p in result.partitions}
    assert by_key["y"].verdict is Verdict.LINEARIZABLE
    assert by_key["x"].verdict is Verdict.NOT_LINEARIZABLE
    assert by_key["x"].blocker == 3
    assert [p.key for p in result.failures] == ["x"]


def test_split_brain_double_cas() -> None:
    # Two leaders each accept a CAS from the same value: both cannot have happened.
    history = [w(0, 0, 0, 1), cas(1, 0, 1, 2, 10), cas(2, 0, 2, 3, 11)]
    result = check(history, CasRegisterModel())
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    # One of them alone is fine.
    assert check(history[:2], CasRegisterModel())
    # If one side timed out instead, it may simply not have happened.
    unsure = [*history[:2], cas(2, 0, 2, 3, None, None, INFO)]
    assert check(unsure, CasRegisterModel())


def test_split_brain_double_write_seen_by_readers() -> None:
    # Both "leaders" acknowledge a write; readers then see the two values alternate.
    history = [
        w(1, "a", 0, 5),
        w(2, "b", 0, 5),
        r(3, "a", 6, 7),
        r(4, "b", 8, 9),
        r(3, "a", 10, 11),
    ]
    assert check(history, RegisterModel()).verdict is Verdict.NOT_LINEARIZABLE


# --- the budget ---------------------------------------------------------------------------------


def pathological(n: int = 24) -> list[Op]:
    """n mutually concurrent writes of distinct values and a concurrent read of a value nobody
    wrote: the search must try every subset and order of the writes before giving up."""
    return [w(i, i, 0, 100) for i in range(n)] + [r("reader", -1, 0, 100)]


def test_timeout_answers_unknown_instead_of_hanging() -> None:
    # Run it in a thread so that a hang fails this test instead of stalling the suite.
    results: list[CheckResult] = []
    worker = threading.Thread(
        target=lambda: results.append(check(pathological(), RegisterModel(), timeout=0.3)),
        daemon=True,
    )
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "check() ignored its timeout"
    (result,) = results
    assert result.verdict is Verdict.UNKNOWN
    assert not result
    assert 0.3 <= result.elapsed < 3
    assert "budget ran out" in result.report()


def test_unknown_report_shows_where_the_search_got_furthest() -> None:
    result = check(pathological(6), RegisterModel(), timeout=None, max_steps=50)
    assert result.verdict is Verdict.UNKNOWN
    (part,) = result.partitions
    assert part.blocker == 6
    assert "Cannot linearize next: #6" in result.report()


def test_step_budget_is_exact_and_deterministic() -> None:
    first = check(pathological(), RegisterModel(), timeout=None, max_steps=5000)
    second = check(pathological(), RegisterModel(), timeout=None, max_steps=5000)
    assert first.verdict is Verdict.UNKNOWN
    assert first.steps == 5000
    assert first.partitions[0].linearization == second.partitions[0].linearization


def test_injected_clock_drives_the_deadline() -> None:
    ticks = itertools.count()
    result = check(pathological(), RegisterModel(), timeout=3, clock=lambda: next(ticks))
    assert result.verdict is Verdict.UNKNOWN
    # The clock is read at start, at each partition start and every 1024 steps.
    assert result.steps < 1024 * 4


def test_violation_elsewhere_is_definite_even_when_a_key_runs_out_of_budget() -> None:
    slow = [Op(i, ("put", "slow", i), None, 0, 100) for i in range(24)]
    slow.append(Op("reader", ("get", "slow"), -1, 0, 100))
    stale = [Op(1, ("put", "k", 1), None, 0, 1), Op(2, ("get", "k"), None, 2, 3)]
    result = check(slow + stale, KeyValueModel(), timeout=0.3)
    assert result.verdict is Verdict.NOT_LINEARIZABLE
    by_key = {p.key: p.verdict for p in result.partitions}
    assert by_key == {"slow": Verdict.UNKNOWN, "k": Verdict.NOT_LINEARIZABLE}


# --- models and validation ----------------------------------------------------------------------


def test_models_satisfy_the_protocol() -> None:
    for model in (RegisterModel(), CasRegisterModel(), KeyValueModel()):
        assert isinstance(model, Model)


def test_malformed_ops_fail_before_the_search() -> None:
    with pytest.raises(ValueError, match="does not understand"):
        check([cas(1, 0, 1, 0, 1)], RegisterModel())
    with pytest.raises(ValueError, match="does not understand"):
        check([Op(1, ("get",), None, 0, 1)], KeyValueModel())
    with pytest.raises(ValueError, match="returns before"):
        Op(1, ("read",), None, 5, 4)
    with pytest.raises(ValueError, match="needs a return time"):
        Op(1, ("read",), None, 5, None, OK)
    with pytest.raises(TypeError):
        History([("not", "an", "op")])  # type: ignore[list-item]


def test_a_custom_model() -> None:
    class Counter(ModelBase):
        """add(n) and read; states are ints."""

        def init(self) -> int:
            return 0

        def step(self, state: int, op: Op) -> tuple[bool, int]:
            if op.input[0] == "add":
                return True, state + op.input[1]
            return op.outcome is INFO or op.output == state, state

        def read_only(self, op: Op) -> bool:
            return op.input[0] == "read"

    adds = [Op(1, ("add", 1), None, 0, 10), Op(2, ("add", 2), None, 0, 10)]
    assert check([*adds, Op(3, ("read",), 1, 1, 2)], Counter())
    assert not check([*adds, Op(3, ("read",), 4, 11, 12)], Counter())


# --- the report ---------------------------------------------------------------------------------


def test_report_names_the_stuck_op_its_state_and_its_neighbours() -> None:
    history = [
        Op("c1", ("put", "x", 1), None, 0, 10),
        Op("c2", ("put", "x", 2), None, 12, 20),
        Op("c3", ("get", "x"), 2, 15, 21),
        Op("c4", ("get", "x"), 1, 22, 30),
        Op("c5", ("put", "y", 9), None, 0, 1),
    ]
    result = check(history, KeyValueModel())
    text = result.report()
    assert text.startswith("NOT LINEARIZABLE: 5 ops in 2 partition(s): 1 not linearizable")
    assert "== key 'x': not linearizable" in text
    assert "key 'y'" not in text
    assert "Cannot linearize next: #3" in text
    assert "get('x') -> 1" in text
    assert "illegal in state 2" in text
    assert "Concurrent with it" in text
    assert str(result) == text


def test_report_of_a_linearizable_history_is_one_line() -> None:
    result = check([w(1, 1, 0, 1), r(2, 1, 2, 3)], RegisterModel())
    assert result.report().startswith("LINEARIZABLE: 2 ops in 1 partition(s)")
    assert "\n" not in result.report()


# --- the recorder -------------------------------------------------------------------------------


class AtomicStore:
    """A correct register: every operation takes effect at one instant under a lock."""

    def __init__(self) -> None:
        self.value: object = None
        self.lock = threading.Lock()

    def apply(self, inp: tuple) -> object:
        with self.lock:
            if inp[0] == "read":
                return self.value
            if inp[0] == "write":
                self.value = inp[1]
                return None
            swapped = self.value == inp[1]
            if swapped:
                self.value = inp[2]
            return swapped


async def test_recorder_from_trio_tasks() -> None:
    store, recorder = AtomicStore(), Recorder(clock=trio.current_time)

    async def client(cid: int) -> None:
        for i in range(30):
            inp = [("read",), ("write", (cid, i)), ("cas", None, cid)][(cid + i) % 3]
            with recorder.operation(cid, inp) as call:
                await trio.sleep(0)  # let other clients run inside this op's window
                out = store.apply(inp)
                await trio.sleep(0)
                call.ok(out)

    async with trio.open_nursery() as nursery:
        for cid in range(6):
            nursery.start_soon(client, cid)
    history = recorder.history()
    assert len(history) == 180
    assert check(history, CasRegisterModel(), timeout=10)


def test_recorder_from_threads() -> None:
    store, recorder = AtomicStore(), Recorder()

    def client(cid: int) -> None:
        for i in range(50):
            inp = ("write", (cid, i)) if i % 2 else ("read",)
            handle = recorder.invoke(cid, inp)
            recorder.ok(handle, store.apply(inp))

    threads = [threading.Thread(target=client, args=(cid,)) for cid in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(recorder) == 250
    assert check(recorder.history(), RegisterModel(), timeout=10)


async def test_recorder_marks_cancelled_and_abandoned_ops_info() -> None:
    recorder = Recorder(clock=trio.current_time)
    with trio.move_on_after(0.01):
        with recorder.operation("a", ("write", 1)):
            await trio.sleep(10)
    with pytest.raises(RuntimeError), recorder.operation("b", ("write", 2)):
        raise RuntimeError("connection reset")
    with recorder.operation("c", ("write", 3)) as call:
        call.fail()
    open_handle = recorder.invoke("d", ("write", 4))
    history = recorder.history()
    assert [op.outcome for op in history] == [INFO, INFO, FAIL, INFO]
    assert history[3].ret is None
    recorder.ok(open_handle)
    with pytest.raises(ValueError, match="already completed"):
        recorder.ok(open_handle)


def test_recorder_explicit_times() -> None:
    recorder = Recorder(clock=lambda: pytest.fail("clock must not be read"))
    h = recorder.invoke(1, ("write", 1), at=10)
    recorder.ok(h, at=12)
    with pytest.raises(ValueError, match="before its invocation"):
        recorder.ok(recorder.invoke(2, ("read",), at=20), 1, at=19)
    assert recorder.history()[0] == Op(1, ("write", 1), None, 10, 12, OK)
