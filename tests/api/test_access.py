"""Users, projects, roles, user tokens, secrets and the audit trail through the API of one node
(the real use cases over a state that applies at once): who sees what (404 for another
project's runs), who may do what (403), tokens revoked and expired, secrets stored only as
ciphertext, and the audit trail."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from consensus.node import NodeOptions
from meshgpu.control import Demand, Scheduling
from meshgpu.security.policy import Principal
from meshgpu.state.access import SetSecret
from meshgpu.state.cluster import decode_cluster
from tests.api._stub import Proposer, StubAgent, api
from tests.scheduler._world import host, world

TASK = "type: task\ncommands: [echo hi]\n"
SECRET = "hf_s3cr3t-value-0123456789"


@pytest.fixture
def agent(tmp_path: Path) -> StubAgent:
    return StubAgent(world(host("n1", 8)), tmp_path)


def as_user(agent: StubAgent, token: str, project: str | None = None) -> httpx.AsyncClient:
    c = api(agent)
    c.headers["Authorization"] = f"Bearer {token}"
    if project:
        c.headers["X-Meshgpu-Project"] = project
    return c


async def _setup(agent: StubAgent) -> dict[str, str]:
    """alice (admin of project a), bob (admin of b), carol (no project yet): their tokens."""
    tokens = {}
    async with api(agent) as admin:
        for name in ("alice", "bob", "carol"):
            r = await admin.post("/api/v1/users", json={"name": name})
            assert r.status_code == 201, r.text
            r = await admin.post(f"/api/v1/users/{name}/tokens", json={})
            assert r.status_code == 201, r.text
            tokens[name] = r.json()["token"]
    for user, project in (("alice", "a"), ("bob", "b")):
        async with as_user(agent, tokens[user]) as c:
            r = await c.post("/api/v1/projects", json={"name": project})
            assert r.status_code == 201, r.text
    return tokens


async def _submit(c: httpx.AsyncClient, name: str, config: str = TASK) -> httpx.Response:
    return await c.post(
        "/api/v1/runs", json={"config": config, "name": name, "request_id": f"req-{name}-1"}
    )


async def test_a_non_member_sees_nothing_of_another_projects_runs(agent: StubAgent) -> None:
    tokens = await _setup(agent)
    async with (
        as_user(agent, tokens["alice"], "a") as alice,
        as_user(agent, tokens["bob"], "b") as bob,
    ):
        assert (await _submit(alice, "alice-run")).status_code == 201
        assert (await _submit(bob, "bob-run")).status_code == 201
        run = agent.state.runs["alice-run"]
        assert (run.project, run.user) == ("a", "alice")
        listed = (await bob.get("/api/v1/runs", params={"all": True})).json()["runs"]
        assert [r["name"] for r in listed] == ["bob-run"]
        for method, path in (
            ("GET", "/api/v1/runs/alice-run"),
            ("GET", "/api/v1/runs/alice-run/logs"),
            ("GET", "/api/v1/runs/alice-run/metrics"),
            ("POST", "/api/v1/runs/alice-run/stop"),
            ("PATCH", "/api/v1/runs/alice-run"),
        ):
            body = {"priority": 5} if method == "PATCH" else {}
            r = await bob.request(method, path, json=body)
            assert r.status_code == 404, (method, path, r.text)
            assert r.json()["detail"] == "no run named 'alice-run'; see meshgpu ps -a"
        # Bob cannot submit into a, nor take alice's name.
        r = await as_user(agent, tokens["bob"], "a").post(
            "/api/v1/runs", json={"config": TASK, "name": "x", "request_id": "req-x-0001"}
        )
        assert r.status_code == 404
        r = await _submit(bob, "alice-run")
        assert r.status_code == 409
        # The founding admin sees every run.
        async with api(agent) as admin:
            names = {r["name"] for r in (await admin.get("/api/v1/runs")).json()["runs"]}
            assert names == {"alice-run", "bob-run"}


async def test_a_manager_adds_a_member_who_then_can(agent: StubAgent) -> None:
    tokens = await _setup(agent)
    async with as_user(agent, tokens["alice"], "a") as alice:
        assert (await _submit(alice, "alice-run")).status_code == 201
        r = await alice.post(
            "/api/v1/projects/a/members", json={"user": "carol", "role": "manager"}
        )
        assert r.status_code == 200, r.text
    async with as_user(agent, tokens["carol"], "a") as carol:
        # A manager adds users, not admins.
        r = await carol.post("/api/v1/projects/a/members", json={"user": "bob", "role": "admin"})
        assert r.status_code == 403
        r = await carol.post("/api/v1/projects/a/members", json={"user": "bob", "role": "user"})
        assert r.status_code == 200, r.text
    async with as_user(agent, tokens["bob"], "a") as bob:
        assert (await bob.get("/api/v1/runs/alice-run")).status_code == 200
        # A project user may not read secrets nor manage members.
        assert (await bob.get("/api/v1/projects/a/secrets/x")).status_code == 403
        r = await bob.post("/api/v1/projects/a/members", json={"user": "carol", "role": "user"})
        assert r.status_code == 403
        assert (await bob.post("/api/v1/runs/alice-run/stop", json={})).status_code == 200
    projects = {
        p["name"]: p for p in (await as_user(agent, tokens["bob"]).get("/api/v1/projects")).json()
    }
    assert set(projects) == {"a", "b"}
    assert projects["a"]["role"] == "user" and projects["b"]["role"] == "admin"
    async with api(agent) as admin:
        audit = (await admin.get("/api/v1/audit", params={"project": "a"})).json()
    actions = [(e["action"], e["user"]) for e in audit]
    assert ("submit", "alice") in actions and ("member add", "alice") in actions
    assert ("member add", "carol") in actions and ("stop", "bob") in actions


async def test_a_revoked_or_expired_token_is_refused(
    agent: StubAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokens = await _setup(agent)
    async with as_user(agent, tokens["alice"]) as alice:
        assert (await alice.get("/api/v1/me")).json()["user"] == "alice"
        token_id = tokens["alice"].split("_")[1]
        assert (await alice.delete(f"/api/v1/user-tokens/{token_id}")).status_code == 200
        assert (await alice.get("/api/v1/me")).status_code == 401
    async with api(agent) as admin:
        r = await admin.post("/api/v1/users/bob/tokens", json={"ttl_s": 30})
        short = r.json()["token"]
    async with as_user(agent, short) as bob:
        assert (await bob.get("/api/v1/me")).status_code == 200
        # A minute later (the guard's clock moved on; no sleeping on a busy machine):
        later = time.time() + 60
        monkeypatch.setattr("meshgpu.ops.cluster.time.time", lambda: later)
        assert (await bob.get("/api/v1/me")).status_code == 401
        monkeypatch.undo()
    # Only the verifier is kept.
    access = agent.cluster.cluster.access
    assert all(tokens["bob"] not in t.verifier for t in access.tokens.values())
    # A user cannot make users, join tokens or touch fleets.
    async with as_user(agent, tokens["carol"]) as carol:
        assert (await carol.post("/api/v1/users", json={"name": "eve"})).status_code == 403
        assert (await carol.post("/api/v1/tokens")).status_code == 403
        assert (await carol.post("/api/v1/users/alice/tokens", json={})).status_code == 403
        assert (await carol.get("/metrics")).status_code == 403


async def test_secrets_are_ciphertext_in_the_log_and_never_in_run_views(agent: StubAgent) -> None:
    tokens = await _setup(agent)
    async with (
        as_user(agent, tokens["alice"], "a") as alice,
        as_user(agent, tokens["bob"], "b") as bob,
    ):
        r = await alice.put("/api/v1/projects/a/secrets/hf", json={"value": SECRET})
        assert r.status_code == 200, r.text
        assert (await alice.get("/api/v1/projects/a/secrets/hf")).json()["value"] == SECRET
        assert [s["name"] for s in (await alice.get("/api/v1/projects/a/secrets")).json()] == ["hf"]
        assert (await bob.get("/api/v1/projects/a/secrets/hf")).status_code == 404
        assert (await bob.get("/api/v1/projects/a/secrets")).status_code == 404
        # Referenced in env: accepted; the run keeps the reference, not the value.
        config = TASK + "env:\n  - HF_TOKEN=${{ secrets.hf }}\n"
        r = await _submit(alice, "uses-secret", config)
        assert r.status_code == 201, r.text
        view = (await alice.get("/api/v1/runs/uses-secret")).text
        assert SECRET not in view and "secrets.hf" in view
        # A secret the project lacks is refused at submission, saying which.
        r = await _submit(bob, "no-secret", config)
        assert r.status_code == 400 and "hf" in r.json()["detail"]
        # Only ciphertext was proposed.
        proposed = agent.runs.proposer.proposed  # type: ignore[attr-defined]
        assert not any(SECRET.encode() in e for e in proposed)
        sets = [decode_cluster(e[1:]) for e in proposed if e[:1] == b"C"]
        assert any(isinstance(c, SetSecret) for c in sets)
        # The job's host gets the values (the peer call's use case), only for its own job.
        job = agent.state.run_jobs(agent.state.runs["uses-secret"])[0]
        if job.node_id:
            got = await agent.access.resolve_for_job(job.node_id, job.job_id)  # type: ignore[union-attr]
            assert got == {"hf": SECRET}
        with pytest.raises(Exception, match="not assigned"):
            await agent.access.resolve_for_job("other-node", job.job_id)  # type: ignore[union-attr]
        assert (await alice.delete("/api/v1/projects/a/secrets/hf")).status_code == 200
        assert (await alice.get("/api/v1/projects/a/secrets/hf")).status_code == 404
    audit = agent.access.audit(Principal("admin", "admin"), "a", None, 100)  # type: ignore[union-attr]
    assert ("secret set", "alice", "hf") in [(e["action"], e["user"], e["target"]) for e in audit]


async def test_bad_names_and_unknown_things_say_what_to_do(agent: StubAgent) -> None:
    async with api(agent) as admin:
        r = await admin.post("/api/v1/users", json={"name": "Bad Name"})
        assert r.status_code == 422
        r = await admin.post("/api/v1/projects/nope/members", json={"user": "x"})
        assert r.status_code == 404
        r = await admin.post("/api/v1/projects", json={"name": "main"})
        assert r.status_code == 409
        r = await admin.post("/api/v1/projects/main/members", json={"user": "ghost"})
        assert r.status_code == 404 and "meshgpu user create" in r.json()["detail"]
        r = await admin.delete("/api/v1/projects/main")
        assert r.status_code == 400


async def test_a_project_quota_holds_its_runs_through_the_api_and_scheduler(
    agent: StubAgent,
) -> None:
    """The leader's scheduling controller over the agent's state: a run that would take
    project a over its ``max_gpus`` waits and says why; raising the quota starts it."""
    tokens = await _setup(agent)
    gpu_task = "type: task\ncommands: [echo hi]\nresources: {gpu: H100:2}\n"
    replicated = agent.access.proposer.replicated
    node: Any = SimpleNamespace(
        id=1, leader_since=trio.current_time(), last_heard={}, options=NodeOptions()
    )
    demand = Demand()
    scheduling = Scheduling(node, agent.state, agent.access.cluster, Proposer(replicated), demand)
    async with (
        as_user(agent, tokens["alice"], "a") as alice,
        trio.open_nursery() as nursery,
    ):
        r = await alice.put("/api/v1/projects/a/quota", json={"max_gpus": 4})
        assert r.status_code == 200, r.text
        for i in range(3):
            assert (await _submit(alice, f"q{i}", gpu_task)).status_code == 201
        nursery.start_soon(scheduling.run)
        await trio.testing.wait_all_tasks_blocked()
        got = (await alice.get("/api/v1/runs/q2")).json()
        assert got["status"] == "submitted", got
        reasons = [j.get("why_pending") for j in got.get("jobs", [])] or [got.get("why_pending")]
        assert "project a uses 4 of its 4 GPUs (max_gpus): waiting for one of its jobs to end" in (
            reasons
        ), got
        projects = (await alice.get("/api/v1/projects")).json()
        a = next(p for p in projects if p["name"] == "a")
        assert (a["gpus_in_use"], a["max_gpus"]) == (4, 4)
        # Bob cannot change a's quota (a is invisible to him).
        async with as_user(agent, tokens["bob"], "b") as bob:
            r = await bob.put("/api/v1/projects/a/quota", json={"max_gpus": 8})
            assert r.status_code == 404, r.text
        r = await alice.put("/api/v1/projects/a/quota", json={"max_gpus": 6})
        assert r.status_code == 200, r.text
        demand.notify()
        await trio.testing.wait_all_tasks_blocked()
        assert (await alice.get("/api/v1/runs/q2")).json()["status"] == "provisioning"
        nursery.cancel_scope.cancel()
