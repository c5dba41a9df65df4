"""Projects, users, roles and secrets on a mesh of three real agent processes (loopback): alice
(project a) and bob (project b) each submit; bob cannot list, read the logs of, stop or attach
to alice's run through any node (404); a manager adds him and then he can; a revoked token is
refused on every node within a second; a secret set through one node reaches a job's env on
another, never appears in any member's data dir (Raft DB, WAL, snapshots, job records) nor in
the jobs' workspaces nor in the run API, and is masked in the job's log."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshgpu.testing import AgentProcess
from tests.agent.conftest import start_mesh, stop_all, wait_for

SECRET = "hf_e2e-Secret-7c1d0a9b52"
_CLIENTS: list[httpx.Client] = []


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[list[AgentProcess]]:
    agents = start_mesh(tmp_path, dict.fromkeys("abc", "1xH100:80GB"), ["--tick-ms", "50"])
    try:
        yield agents
    finally:
        while _CLIENTS:
            _CLIENTS.pop().close()
        stop_all(agents)


def http(ag: AgentProcess, token: str, project: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"}
    if project:
        headers["X-Meshgpu-Project"] = project
    client = httpx.Client(base_url=ag.url, headers=headers, verify=ag.verify, timeout=15)
    _CLIENTS.append(client)
    return client


def ok(r: httpx.Response, status: int = 200) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    return r.json()


def test_projects_roles_tokens_and_secrets_across_three_nodes(
    mesh: list[AgentProcess], tmp_path: Path
) -> None:
    a, b, c = mesh
    wait_for(lambda: len(a.client().status()["voters"]) == 3, timeout=60)
    admin = http(a, a.token)
    tokens = {}
    for user in ("alice", "bob", "carol"):
        ok(admin.post("/api/v1/users", json={"name": user}), 201)
        tokens[user] = ok(admin.post(f"/api/v1/users/{user}/tokens", json={}), 201)["token"]
    ok(http(b, tokens["alice"]).post("/api/v1/projects", json={"name": "a"}), 201)
    ok(http(c, tokens["bob"]).post("/api/v1/projects", json={"name": "b"}), 201)
    # carol manages project a (added by its admin, alice, through node c).
    ok(
        http(c, tokens["alice"]).post(
            "/api/v1/projects/a/members", json={"user": "carol", "role": "manager"}
        )
    )

    # A secret set through node b; alice's job (wherever it lands) gets it in its env.
    ok(http(b, tokens["alice"]).put("/api/v1/projects/a/secrets/hf", json={"value": SECRET}))
    gate = tmp_path / "gate"
    task = (
        "type: task\nenv:\n  - HF_TOKEN=${{ secrets.hf }}\ncommands:\n"
        '  - echo "hash=$(printf %s "$HF_TOKEN" | sha256sum | cut -c1-64)"\n'
        '  - echo "value=$HF_TOKEN"\n'
        f"  - while [ ! -e {gate} ]; do sleep 0.05; done\n"
    )
    ok(
        http(a, tokens["alice"], "a").post(
            "/api/v1/runs", json={"config": task, "name": "alice-run", "request_id": "alice-run-1"}
        ),
        201,
    )
    bob_task = f"type: task\ncommands:\n  - while [ ! -e {gate} ]; do sleep 0.05; done\n"
    ok(
        http(b, tokens["bob"], "b").post(
            "/api/v1/runs", json={"config": bob_task, "name": "bob-run", "request_id": "bob-run-01"}
        ),
        201,
    )
    alice = http(c, tokens["alice"])
    wait_for(lambda: alice.get("/api/v1/runs/alice-run").json()["status"] == "running", 60)
    log = wait_for(
        lambda: (t := alice.get("/api/v1/runs/alice-run/logs").text) and "value=" in t and t, 30
    )
    assert f"hash={hashlib.sha256(SECRET.encode()).hexdigest()}" in log
    assert SECRET not in log and "value=***" in log

    # Bob, through every node: alice's run does not exist for him.
    for ag in mesh:
        bob = http(ag, tokens["bob"])
        names = [r["name"] for r in ok(bob.get("/api/v1/runs", params={"all": True}))["runs"]]
        assert names == ["bob-run"]
        assert bob.get("/api/v1/runs/alice-run").status_code == 404
        assert bob.get("/api/v1/runs/alice-run/logs").status_code == 404
        assert bob.post("/api/v1/runs/alice-run/stop", json={}).status_code == 404
        assert bob.get("/api/v1/projects/a/secrets/hf").status_code == 404
        r = bob.get(
            "/api/v1/runs/alice-run/ssh",
            headers={"Connection": "Upgrade", "Upgrade": "meshgpu-ssh/1"},
        )
        assert r.status_code == 404, r.text

    # The secret's bytes are nowhere in any member's data dir (Raft DB, WAL, snapshots, and the
    # job records: the supervisor got the value in memory) nor in the jobs' workspaces, nor in
    # views -- while the job that has it in its env still runs.
    seen = set()
    for ag in mesh:
        for root in (ag.data, ag.workspace_dir):
            for f in root.rglob("*") if root.exists() else ():
                if f.is_file():
                    assert SECRET.encode() not in f.read_bytes(), f
                    seen.add(f.name)
    assert {"job.json", "output.log"} <= seen, sorted(seen)
    for ag in mesh:
        assert SECRET not in http(ag, tokens["alice"]).get("/api/v1/runs/alice-run").text
        assert SECRET not in http(ag, a.token).get("/api/v1/runs", params={"all": True}).text

    # The manager adds bob to a: now he sees and may stop alice's run.
    ok(
        http(a, tokens["carol"]).post(
            "/api/v1/projects/a/members", json={"user": "bob", "role": "user"}
        )
    )
    bob = http(b, tokens["bob"])
    wait_for(lambda: bob.get("/api/v1/runs/alice-run").status_code == 200, 5)
    assert "value=***" in bob.get("/api/v1/runs/alice-run/logs").text
    ok(bob.post("/api/v1/runs/alice-run/stop", json={}))

    # Revoked through node a: refused on every node within a second.
    token_id = tokens["bob"].split("_")[1]
    ok(http(a, tokens["bob"]).delete(f"/api/v1/user-tokens/{token_id}"))
    deadline = time.monotonic() + 1.0
    pending = set(range(3))
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            if http(mesh[i], tokens["bob"]).get("/api/v1/me").status_code == 401:
                pending.discard(i)
        time.sleep(0.02)
    assert not pending, f"nodes {pending} still accept the revoked token"

    # The audit trail has who did what.
    audit = ok(admin.get("/api/v1/audit", params={"project": "a"}))
    seen = {(e["action"], e["user"]) for e in audit}
    assert {("submit", "alice"), ("secret set", "alice"), ("member add", "carol")} <= seen
    assert ("stop", "bob") in seen

    # The CLI: a profile's project, secrets from stdin, project usage, the audit trail.
    env = {"MESHGPU_TOKEN": tokens["alice"], "MESHGPU_PROJECT": "a"}
    r = subprocess.run(
        [sys.executable, "-m", "meshgpu", "secret", "set", "wandb"],
        input="from-stdin-value\n",
        capture_output=True,
        text=True,
        env=c.cli_env() | env,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    r = c.cli("secret", "get", "wandb", env=env)
    assert r.stdout.strip() == "from-stdin-value", r.stderr
    assert "wandb" in c.cli("secret", "ls", env=env).stdout
    listed = c.cli("project", "ls", "--json", env=env)
    assert {p["name"] for p in json.loads(listed.stdout)} == {"a"}, listed.stderr
    assert "alice-run" in c.cli("ps", "-a", env=env).stdout
    assert "alice-run" not in c.cli("--project", "main", "ps", "-a").stdout
    r = c.cli("audit", "--project", "a", "--since", "1h", env=env)
    assert "secret set" in r.stdout and "wandb" in r.stdout, r.stderr
    r = c.cli("user", "create", "dave", env=env)
    assert r.returncode != 0 and "global admin" in r.stderr
    gate.touch()
