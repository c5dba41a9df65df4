"""The simulator: determinism, that it exercises its faults, that it catches planted bugs, the
command line, and a bounded many-seed run so that CI covers it (the full 2000-seed run is in
scripts/test)."""

from __future__ import annotations

import collections

import pytest

from consensus.core import Message, MessageType, leader, raft
from consensus.core.types import HardState
from consensus.sim import run_seed
from consensus.sim.cli import main

MT = MessageType


def test_a_seed_replays_bit_for_bit() -> None:
    a = run_seed(7, events=3000, trace=True)
    b = run_seed(7, events=3000, trace=True)
    assert a.ok and b.ok
    assert a.trace == b.trace and a.stats == b.stats and a.virtual_us == b.virtual_us
    assert len(a.trace or []) > 1000
    c = run_seed(8, events=3000, trace=True)
    assert c.trace != a.trace


def test_faults_and_workload_are_exercised() -> None:
    total: collections.Counter[str] = collections.Counter()
    for seed in range(40):
        r = run_seed(seed, events=4000)
        assert r.ok, r.violation
        total.update(r.stats)
    for key in (
        "crashes",
        "crashes_in_ready",
        "torn_writes",
        "snapshots_sent",
        "compactions",
        "conf_changes",
        "transfers",
        "reads",
        "dropped_no_leader",
    ):
        assert total[key] > 0, key
    assert total["leaders"] > 40 * 2  # several elections per seed
    assert total["acked"] > 40 * 20


@pytest.mark.slow
def test_two_hundred_seeds_hold_every_invariant() -> None:
    bad = [(r.seed, str(r.violation)) for r in (run_seed(s) for s in range(200)) if not r.ok]
    assert bad == []


def _heartbeat_commit_past_match(r: raft.Raft, ctx: bytes) -> None:
    """Planted bug: heartbeats carry the leader's commit index, not min(match, commit)."""
    for nid in sorted(r.trk.progress):
        if nid != r.id:
            r.msgs.append(
                Message(
                    MT.HEARTBEAT, to=nid, frm=r.id, term=r.term, commit=r.log.committed, context=ctx
                )
            )


def test_catches_a_follower_committing_past_its_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(leader, "bcast_heartbeat", _heartbeat_commit_past_match)
    results = [run_seed(s, events=3000) for s in range(20)]
    caught = [r for r in results if not r.ok]
    assert len(caught) >= 5
    # The failing seed replays to the same violation.
    again = run_seed(caught[0].seed, events=3000)
    assert str(again.violation) == str(caught[0].violation)


def test_catches_an_unpersisted_vote(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        raft.Raft, "hard_state", lambda self: HardState(self.term, 0, self.log.committed)
    )
    r = run_seed(0, events=3000)
    assert r.violation is not None and r.violation.kind == "unpersisted-vote"


def test_cli_run_and_replay(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--seeds", "3", "--events", "800"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "seeds=3 violations=0"
    assert main(["replay", "1", "--events", "800", "--tail", "5"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "seed=1 ok"
    assert len(out) == 1 + 5 + 2  # the elision note, five trace lines, stats, verdict


def test_cli_reports_failing_seeds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(leader, "bcast_heartbeat", _heartbeat_commit_past_match)
    assert main(["run", "--seeds", "4", "--events", "3000"]) == 1
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert out[-1].startswith("seeds=4 violations=") and out[-1] != "seeds=4 violations=0"
    assert all(line.startswith("seed=") and "replay:" in line for line in out[:-1])
    # The first failing seed's compact trace goes to stderr, ending at the violation.
    assert "trace lines" in captured.err and "VIOLATION" in captured.err
