"""Rotating the cluster data key (``meshgpu secret rotate-key``): the new key is sealed to the
voters, the leader's ``SecretKeys`` controller re-encrypts every value in batches with
``if_ciphertext`` (a concurrent ``secret set`` wins), the old key goes once nothing uses it,
and jobs still get their values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag

from meshgpu.control.secret_keys import SecretKeys
from meshgpu.ops.access import AccessOps
from meshgpu.scheduler import plan
from meshgpu.security.policy import Principal
from meshgpu.security.secrets import decrypt
from meshgpu.state.access import SetSecret
from meshgpu.state.cluster import decode_cluster
from tests.api._stub import StubAgent, api
from tests.api.test_access import _setup, _submit, as_user
from tests.scheduler._world import apply_plan, host, world

ADMIN = Principal("admin", "admin")


@pytest.fixture
def agent(tmp_path: Path) -> StubAgent:
    return StubAgent(world(host("n1", 8)), tmp_path)


async def test_rotation_reencrypts_every_value_and_retires_the_old_key(
    agent: StubAgent, tmp_path: Path
) -> None:
    tokens = await _setup(agent)
    ops: AccessOps = agent.access  # type: ignore[assignment]
    access = ops.access
    values = {("a", "hf"): "hf-one", ("a", "wb"): "wb-two", ("b", "hf"): "bob-three"}
    for user, project in (("alice", "a"), ("bob", "b")):
        async with as_user(agent, tokens[user], project) as c:
            for (p, name), value in values.items():
                if p == project:
                    r = await c.put(f"/api/v1/projects/{p}/secrets/{name}", json={"value": value})
                    assert r.status_code == 200, r.text
    old = access.primary_key
    old_key = ops._data_key(old)
    # Only a global admin rotates.
    async with as_user(agent, tokens["alice"], "a") as alice:
        r = await alice.post("/api/v1/secrets/rotate-key")
        assert r.status_code == 403, r.text
        assert (await alice.get("/api/v1/secrets/keys")).status_code == 403
    async with api(agent) as admin:
        r = await admin.post("/api/v1/secrets/rotate-key")
        assert r.status_code == 200, r.text
        new = r.json()["key_id"]
        assert r.json()["to_reencrypt"] == 3 and new != old
        status = (await admin.get("/api/v1/secrets/keys")).json()
        assert status == {"primary_key": new, "keys": {new: 0, old: 3}, "to_reencrypt": 3}
    assert access.data_keys[new] != old  # sealed, not the key
    # Before re-encryption the old key still opens its values.
    assert (await ops.get_secret(ADMIN, "a", "wb"))["value"] == "wb-two"

    # A concurrent `secret set` lands between the re-encryption's read and its proposal: it
    # wins (the re-encryption of that value is refused as stale), the rest go through.
    proposer: Any = ops.proposer
    real = proposer.propose
    raced = False

    async def racing(cmd: bytes, request_id: bytes | None = None) -> Any:
        nonlocal raced
        c = decode_cluster(cmd[1:]) if cmd[:1] == b"C" else None
        if isinstance(c, SetSecret) and c.if_ciphertext and (c.project, c.name) == ("a", "hf"):
            raced = True
            await ops.set_secret(Principal("alice"), "a", "hf", "hf-newer")
        return await real(cmd, request_id)

    proposer.propose = racing
    keys = SecretKeys(ops, batch=2)
    steps = [await keys.step() for _ in range(4)]
    proposer.propose = real
    assert raced and steps[0] == 1 and sum(steps) == 2 and steps[-1] == 0
    values[("a", "hf")] = "hf-newer"

    # Every stored ciphertext opens with the new key only; the old key is gone.
    assert set(access.data_keys) == {new} and access.key_uses == {new: 3}
    new_key = ops._data_key(new)
    for (p, name), s in access.secrets.items():
        blob = bytes.fromhex(s.ciphertext_hex)
        assert s.key_id == new
        assert decrypt(new_key, p, name, blob).decode() == values[(p, name)]
        with pytest.raises(InvalidTag):
            decrypt(old_key, p, name, blob)
    # A voter that never saw the key in memory opens it from the replicated state.
    fresh = AccessOps(ops.proposer, ops.cluster, ops.state, ops.ca_pem, ops.ca_key_path)
    assert (await fresh.get_secret(ADMIN, "b", "hf"))["value"] == "bob-three"
    # Jobs still get their values.
    config = "type: task\ncommands: [echo hi]\nenv:\n  - HF_TOKEN=${{ secrets.hf }}\n"
    async with as_user(agent, tokens["alice"], "a") as alice:
        assert (await _submit(alice, "after-rotation", config)).status_code == 201
    apply_plan(agent.state, plan(agent.state, now=10.0), at=10.0)
    job = agent.state.run_jobs(agent.state.runs["after-rotation"])[0]
    assert job.node_id == "n1"
    assert await fresh.resolve_for_job("n1", job.job_id) == {"hf": "hf-newer"}
    # Re-encryptions are not audited as user changes; the rotation is.
    audit = ops.audit(ADMIN, None, None, 1000)
    assert [e["action"] for e in audit].count("secret set") == 4
    assert ("data key rotate", "admin") in [(e["action"], e["user"]) for e in audit]
    # A rotation with nothing stored retires the old key at once.
    for p, name in list(values):
        await ops.delete_secret(ADMIN, p, name)
    assert set(access.data_keys) == {new}
    doc = await ops.rotate_key(ADMIN)
    assert set(access.data_keys) == {doc["key_id"]} and doc["to_reencrypt"] == 0
