"""Flow control: the in-flight window and the progress state machine."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from consensus.core.progress import Inflights, Progress, ProgressState


def test_inflights_bounded_by_count() -> None:
    w = Inflights(max_count=3, max_bytes=0)
    for i in range(1, 4):
        assert not w.full()
        w.add(i, 1000)
    assert w.full()
    w.free_le(1)
    assert not w.full() and w.count() == 2


def test_inflights_bounded_by_bytes() -> None:
    w = Inflights(max_count=100, max_bytes=10)
    w.add(1, 4)
    w.add(2, 5)
    assert not w.full()
    w.add(3, 1)
    assert w.full()
    w.free_le(2)
    assert w.bytes == 1 and not w.full()


@given(sizes=st.lists(st.integers(0, 50), min_size=1, max_size=30), ack=st.integers(0, 40))
def test_inflights_free_le_keeps_byte_total(sizes: list[int], ack: int) -> None:
    w = Inflights(max_count=1000, max_bytes=0)
    for i, s in enumerate(sizes, start=1):
        w.add(i, s)
    w.free_le(ack)
    assert w.bytes == sum(sizes[ack:])
    assert w.count() == max(0, len(sizes) - ack)


def make(match: int = 0, next_: int = 1) -> Progress:
    pr = Progress(next_, Inflights(2, 0), False)
    pr.match = match
    return pr


def test_probe_sends_one_append_per_heartbeat() -> None:
    pr = make(match=3, next_=4)
    assert not pr.is_paused()
    pr.sent_entries(2, 10)
    assert pr.is_paused()
    assert pr.next == 4  # probing does not advance next optimistically


def test_replicate_pipelines_until_window_full() -> None:
    pr = make(match=3, next_=4)
    pr.become_replicate()
    pr.sent_entries(2, 10)
    assert pr.next == 6 and not pr.is_paused()
    pr.sent_entries(1, 5)
    assert pr.next == 7 and pr.is_paused()
    assert pr.maybe_update(5)
    pr.inflights.free_le(5)
    assert pr.match == 5 and not pr.inflights.full()


def test_stale_rejections_are_ignored() -> None:
    pr = make(match=5, next_=9)
    pr.become_replicate()
    pr.next = 9
    assert not pr.maybe_decr_to(4, 4)  # rejects an index already matched
    assert pr.maybe_decr_to(7, 6)
    assert pr.next == 6
    probe = make(match=0, next_=10)
    assert not probe.maybe_decr_to(5, 2)  # not the outstanding probe (next - 1 = 9)
    assert probe.maybe_decr_to(9, 2)
    assert probe.next == 3


def test_snapshot_state_pauses_and_resumes_after_it() -> None:
    pr = make(match=2, next_=3)
    pr.become_snapshot(10)
    assert pr.is_paused() and pr.state is ProgressState.SNAPSHOT
    pr.become_probe()
    assert pr.next == 11 and pr.state is ProgressState.PROBE
