"""One codec for every domain: today's encoding is the one existing data dirs hold, so entries
written before the codec was unified decode unchanged (golden bytes below were produced by the
two codecs it replaced)."""

from __future__ import annotations

from typing import Literal

import pytest

from meshgpu.state.cluster import CLUSTER_TAG, CreateToken, NodeUnreachable, Replicated
from meshgpu.state.codec import REGISTRY, Command, UndecodableCommand, decode, encode
from meshgpu.state.commands import JobFinished, JobReports, JobStarted, SubmitRun

OLD_ENTRIES = [
    b'{"at":1.5,"kind":"submit_run","request_id":"r1","run_id":"abc","run_name":"train",'
    b'"project":"main","user":"admin","config":{"type":"task","commands":["true"],'
    b'"resources":{"gpu":{"count":{"min":1,"max":1}}}},"run_args":[],"code":null}',
    b'{"at":2.0,"kind":"job_reports","reports":[{"at":2.0,"kind":"job_started","job_id":"j",'
    b'"epoch":1,"started_at":2.0},{"at":3.0,"kind":"job_finished","job_id":"j","epoch":1,'
    b'"reason":"done_by_runner","exit_code":0,"message":""}]}',
    b'C{"at":3.0,"kind":"create_token","token_id":"0123abcd","verifier":"'
    + b"ab" * 32
    + b'","expires_at":null,"reusable":false}',
    b'C{"at":4.0,"kind":"node_unreachable","node_id":"n1"}',
]


@pytest.mark.parametrize("data", OLD_ENTRIES)
def test_entries_in_the_old_encodings_decode_and_encode_the_same(data: bytes) -> None:
    cmd = decode(data)
    assert isinstance(cmd, Command)
    assert encode(cmd) == data


def test_commands_land_in_their_domain() -> None:
    sub, rep, tok, gone = (decode(d) for d in OLD_ENTRIES)
    assert isinstance(sub, SubmitRun) and sub.domain == "jobs"
    assert isinstance(rep, JobReports)
    assert [type(r) for r in rep.reports] == [JobStarted, JobFinished]
    assert isinstance(tok, CreateToken) and tok.domain == "cluster"
    assert isinstance(gone, NodeUnreachable)
    assert encode(gone).startswith(CLUSTER_TAG)


def test_every_command_is_registered_once_under_its_kind() -> None:
    assert REGISTRY["submit_run"] is SubmitRun and REGISTRY["create_token"] is CreateToken
    assert len({c.domain for c in REGISTRY.values()}) == 2
    with pytest.raises(TypeError, match="taken"):

        class Twin(Command):
            kind: Literal["submit_run"] = "submit_run"


def test_an_unknown_command_is_a_refused_entry_not_a_crash() -> None:
    with pytest.raises(UndecodableCommand):
        decode(b'{"at":1.0,"kind":"from_the_future"}')
    rep = Replicated()
    results = rep.apply(
        [(1, b'{"at":1.0,"kind":"from_the_future"}'), (2, b'C{"at":1.0,"kind":"nope"}')]
    )
    assert [r.code for r in results] == ["undecodable", "undecodable"]
    assert rep.jobs.applied_index == 2


def test_replicated_applies_each_entry_to_its_domain() -> None:
    rep = Replicated()
    results = rep.apply([(i + 1, d) for i, d in enumerate(OLD_ENTRIES)])
    assert results[0].ok and "train" in rep.jobs.runs
    assert results[2].ok and "0123abcd" in rep.cluster.tokens


def test_a_snapshot_taken_before_specs_restores_and_is_written_in_the_same_shape() -> None:
    """Snapshots keep the rendered configuration (``config``), as they always did; the spec is
    compiled again on restore, so old snapshots load and older members can read new ones."""
    import json

    from meshgpu.state import StateMachine
    from tests._paths import FIXTURES

    old = (FIXTURES / "snapshots" / "jobs-before-specs.json").read_bytes()
    sm = StateMachine()
    sm.restore(old)
    run = sm.runs["a"]
    assert run.spec.priority == 5 and run.spec.max_duration_s == 60 and len(run.spec.jobs) == 1
    assert run.config["commands"] == ["true"]
    assert json.loads(sm.snapshot()) == json.loads(old)
