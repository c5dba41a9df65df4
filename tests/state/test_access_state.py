"""The access records in the replicated state: applied the same on every member, snapshotted
and restored, absent from older snapshots (which restore unchanged), and the audit trail fed by
submit and stop in the jobs domain."""

from __future__ import annotations

import json

from meshgpu.security import policy
from meshgpu.security.secrets import UserToken
from meshgpu.state import SubmitRun, encode
from meshgpu.state.access import (
    CreateProject,
    CreateUser,
    DeleteUser,
    InstallDataKey,
    IssueUserToken,
    SetProjectMember,
    SetSecret,
)
from meshgpu.state.cluster import Replicated, encode_cluster


def _apply(r: Replicated, *cmds: object) -> list:
    start = r.jobs.applied_index
    return r.apply([(start + i + 1, encode(c)) for i, c in enumerate(cmds)])  # type: ignore[arg-type]


def test_access_snapshot_round_trip_and_old_snapshots() -> None:
    r = Replicated()
    tok = UserToken.create()
    results = _apply(
        r,
        CreateUser(at=1, name="alice"),
        IssueUserToken(at=2, user="alice", token_id=tok.token_id, verifier=tok.verifier()),
        CreateProject(at=3, name="a", owner="alice", max_gpus=4),
        InstallDataKey(at=4, key_id="0a0b0c0d", sealed_hex="00" * 100),
        SetSecret(
            at=5, project="a", name="hf", key_id="0a0b0c0d", ciphertext_hex="ab" * 30, by="alice"
        ),
        SubmitRun(
            at=6,
            request_id="r1",
            run_id="x",
            run_name="t",
            project="a",
            user="alice",
            config={"type": "task", "commands": ["true"]},
        ),
    )
    assert all(x.ok for x in results), results
    acc = r.cluster.access
    assert policy.role(acc, policy.Principal("alice"), "a") == "admin"
    assert [(a.action, a.user) for a in acc.audit_log][-2:] == [
        ("secret set", "alice"),
        ("submit", "alice"),
    ]
    copy = Replicated()
    copy.restore(r.snapshot())
    assert copy.cluster.access.snapshot() == acc.snapshot()
    assert tok.verifier() in copy.cluster.access.by_verifier
    # A snapshot from before access existed restores to an empty, working part.
    doc = json.loads(r.snapshot())
    del doc["cluster"]["access"]
    old = Replicated()
    old.restore(json.dumps(doc).encode())
    assert old.cluster.access.empty()
    # A user removed: its tokens and memberships go with it.
    _apply(
        r,
        SetProjectMember(at=7, project="main", user="alice", role="user"),
        DeleteUser(at=8, name="alice"),
    )
    assert not acc.by_verifier and "alice" not in acc.projects["a"].members
    assert "access" in json.loads(r.snapshot())["cluster"]


def test_a_second_data_key_is_refused_and_names_are_checked() -> None:
    r = Replicated()
    a, b = _apply(
        r,
        InstallDataKey(at=1, key_id="00000001", sealed_hex="00"),
        InstallDataKey(at=2, key_id="00000002", sealed_hex="00"),
    )
    assert a.ok and not b.ok and b.code == "exists"
    assert r.cluster.access.primary_key == "00000001"
    bad = r.apply([(9, encode_cluster(SetProjectMember(at=3, project="main", user="ghost")))])[0]
    assert not bad.ok and "meshgpu user create" in bad.error


def test_a_rotated_key_stays_while_a_value_uses_it_and_survives_a_snapshot() -> None:
    r = Replicated()
    k1, k2 = "0a0b0c0d", "1a1b1c1d"
    _apply(
        r,
        CreateProject(at=1, name="a"),
        InstallDataKey(at=2, key_id=k1, sealed_hex="00" * 100),
        SetSecret(at=3, project="a", name="x", key_id=k1, ciphertext_hex="ab" * 30),
        SetSecret(at=3, project="a", name="y", key_id=k1, ciphertext_hex="cd" * 30),
        InstallDataKey(at=4, key_id=k2, sealed_hex="11" * 100, rotate=True, by="alice"),
    )
    access = r.cluster.access
    assert access.primary_key == k2 and set(access.data_keys) == {k1, k2}
    assert [s.name for s in access.stale_secrets(10)] == ["x", "y"]
    # A re-encryption of a value that changed meanwhile is refused; one that did not, applies.
    res = _apply(
        r,
        SetSecret(at=5, project="a", name="x", key_id=k1, ciphertext_hex="ef" * 30),
        SetSecret(
            at=6,
            project="a",
            name="x",
            key_id=k2,
            ciphertext_hex="01" * 30,
            if_ciphertext="ab" * 30,
        ),
        SetSecret(
            at=6,
            project="a",
            name="y",
            key_id=k2,
            ciphertext_hex="02" * 30,
            if_ciphertext="cd" * 30,
        ),
    )
    assert [x.ok for x in res] == [True, False, True] and res[1].code == "stale"
    assert access.key_uses == {k1: 1, k2: 1} and set(access.data_keys) == {k1, k2}
    # Restored from a snapshot: the same uses, and the old key goes with its last value.
    other = Replicated()
    other.cluster.restore_doc(json.loads(json.dumps(r.cluster.snapshot_doc())))
    assert other.cluster.access.key_uses == {k1: 1, k2: 1}
    res = _apply(
        other,
        SetSecret(
            at=7,
            project="a",
            name="x",
            key_id=k2,
            ciphertext_hex="03" * 30,
            if_ciphertext="ef" * 30,
        ),
    )
    assert res[0].ok and set(other.cluster.access.data_keys) == {k2}
    assert other.cluster.access.stale_secrets(10) == []
