"""Fleets belong to a project: through the API of one node, a fleet applied in project a is
invisible (404, as a missing fleet) to bob (admin of b), a project user sees it but may not
change it (403), its admin and the founding admin see it, and a project with fleets is not
removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from meshgpu.ops.fleets import Fleets
from tests.api._stub import StubAgent, api
from tests.api.test_access import _setup, as_user
from tests.scheduler._world import host, world


def _fleet(name: str, hosts: str = "10.0.0.1") -> dict[str, str]:
    return {"configuration": f"type: fleet\nname: {name}\nssh_config:\n  hosts: [{hosts}]\n"}


@pytest.fixture
def agent(tmp_path: Path) -> StubAgent:
    a = StubAgent(world(host("n1", 8)), tmp_path)
    a.fleets = Fleets(a.access.proposer, a.cluster.cluster, a.state)  # type: ignore[union-attr]
    return a


async def test_another_projects_fleet_is_invisible(agent: StubAgent) -> None:
    tokens = await _setup(agent)
    async with (
        as_user(agent, tokens["alice"], "a") as alice,
        as_user(agent, tokens["bob"], "b") as bob,
    ):
        r = await alice.post("/api/v1/fleets", json=_fleet("gpus-a"))
        assert r.status_code == 201, r.text
        assert r.json()["project"] == "a"
        assert agent.cluster.cluster.fleets.fleets["gpus-a"].project == "a"

        assert (await bob.get("/api/v1/fleets")).json() == []
        missing = await bob.get("/api/v1/fleets/nope")
        for r in (
            await bob.get("/api/v1/fleets/gpus-a"),
            await bob.delete("/api/v1/fleets/gpus-a"),
        ):
            assert r.status_code == 404, r.text
            assert r.json()["title"] == missing.json()["title"]
            assert r.json()["detail"] == "no fleet gpus-a"
        assert not agent.cluster.cluster.fleets.fleets["gpus-a"].deleting
        # bob cannot apply into a (no project of his), nor take the name or the host
        r = await as_user(agent, tokens["bob"], "a").post("/api/v1/fleets", json=_fleet("x"))
        assert r.status_code == 404, r.text
        r = await bob.post("/api/v1/fleets", json=_fleet("gpus-a", "10.0.0.9"))
        assert r.status_code == 409 and "another project" in r.json()["detail"], r.text
        r = await bob.post("/api/v1/fleets", json=_fleet("gpus-b"))
        assert r.status_code == 409, r.text
        assert "gpus-a" not in r.text and "another project" in r.json()["detail"]
        r = await bob.post("/api/v1/fleets", json=_fleet("gpus-b", "10.0.0.2"))
        assert r.status_code == 201, r.text

        assert [f["name"] for f in (await alice.get("/api/v1/fleets")).json()] == ["gpus-a"]
        assert (await alice.get("/api/v1/fleets/gpus-a")).status_code == 200
        async with api(agent) as admin:  # the founding admin: every project's
            listed = {f["name"]: f["project"] for f in (await admin.get("/api/v1/fleets")).json()}
            assert listed == {"gpus-a": "a", "gpus-b": "b"}

        # a project user sees the fleet but only an admin changes it
        r = await alice.post("/api/v1/projects/a/members", json={"user": "carol", "role": "user"})
        assert r.status_code == 200, r.text
        async with as_user(agent, tokens["carol"], "a") as carol:
            assert [f["name"] for f in (await carol.get("/api/v1/fleets")).json()] == ["gpus-a"]
            r = await carol.delete("/api/v1/fleets/gpus-a")
            assert r.status_code == 403, r.text
            assert "project admin" in r.json()["detail"]
            r = await carol.post("/api/v1/fleets", json=_fleet("gpus-c", "10.0.0.3"))
            assert r.status_code == 403, r.text

        # a project with fleets stays until they are deleted
        r = await alice.delete("/api/v1/projects/a")
        assert r.status_code == 409 and "gpus-a" in r.json()["detail"], r.text
        r = await alice.delete("/api/v1/fleets/gpus-a")
        assert r.status_code == 200, r.text
        assert r.json()["deleting"] is True


async def test_only_a_global_admin_adds_or_removes_a_backend(agent: StubAgent) -> None:
    """Backends hold cloud credentials and spend money: a project admin (alice) is refused with
    403 before anything is checked or stored; the founding admin gets past that check (here to
    the 503 of a node that serves no backends)."""
    tokens = await _setup(agent)
    body = {"name": "aws", "type": "aws", "config": {}, "secrets": {"key": "x"}}
    async with as_user(agent, tokens["alice"], "a") as alice:
        r = await alice.post("/api/v1/backends", json=body)
        assert r.status_code == 403 and "global admin" in r.json()["detail"], r.text
        r = await alice.delete("/api/v1/backends/aws")
        assert r.status_code == 403, r.text
    async with api(agent) as admin:
        assert (await admin.post("/api/v1/backends", json=body)).status_code == 503
        assert (await admin.delete("/api/v1/backends/aws")).status_code == 503
