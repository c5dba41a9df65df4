"""``GET /api/v1/agent/meshgpu.pyz``: the agent file for an instance a backend fleet is
booting, authorized by the download secret of its user data (not the API token, and without
touching its join token), good only until it joins; streamed whole."""

from __future__ import annotations

import time
from pathlib import Path

import httpx

from meshgpu.api import create_app
from meshgpu.ops.backends import DOWNLOAD_TTL_S, Backends, download_hash
from meshgpu.state import StateMachine
from meshgpu.state.cluster import Replicated, encode_cluster
from meshgpu.state.fleets import AddBackend, AddFleetInstance, ApplyFleet, UpdateFleetInstance
from tests.api._stub import Proposer, StubAgent

SECRET = "s3cr3t-" + "x" * 36
PATH = "/api/v1/agent/meshgpu.pyz"


def _world(tmp_path: Path) -> tuple[httpx.AsyncClient, Replicated, bytes]:
    services = StubAgent(StateMachine(), tmp_path)
    assert services.ssh_keys is not None
    rep = Replicated()
    rep.jobs, rep.cluster = services.state, services.ssh_keys.cluster
    proposer = Proposer(rep)
    body = bytes(range(256)) * 9000  # > 2 MB: several chunks
    pyz = tmp_path / "meshgpu.pyz"
    pyz.write_bytes(body)
    services.backends = Backends(proposer, rep.cluster, lambda: pyz)  # type: ignore[arg-type]
    now = time.time()
    for cmd in (
        AddBackend(at=now, name="local", type="local"),
        ApplyFleet(at=now, name="cloud", spec={"nodes": {"min": 0, "max": 2}}, hostnames=[]),
        AddFleetInstance(at=now, name="cloud", instance_id="i1", backend="local", offer={}),
        UpdateFleetInstance(
            at=now,
            name="cloud",
            instance_id="i1",
            token_id="t1",
            download_hash=download_hash(SECRET),
        ),
    ):
        assert rep.apply([(rep.jobs.applied_index + 1, encode_cluster(cmd))])[0].ok
    # No Authorization header: a new instance has no API token.
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(services)), base_url="http://node"
    )
    return client, rep, body


async def test_the_secret_downloads_the_file_without_the_api_token(tmp_path: Path) -> None:
    client, rep, body = _world(tmp_path)
    async with client:
        r = await client.get(PATH, headers={"X-Meshgpu-Download": SECRET})
        assert r.status_code == 200, r.text
        assert r.content == body and r.headers["content-length"] == str(len(body))
        # the join token is neither shown nor spent
        assert "t1" not in rep.cluster.tokens
        inst = rep.cluster.fleets.fleets["cloud"].instances["i1"]
        assert inst.state == "pending" and inst.token_id == "t1"
        # provisioning (the cloud call returned): still good
        cmd = UpdateFleetInstance(
            at=time.time(), name="cloud", instance_id="i1", state="provisioning"
        )
        assert rep.apply([(rep.jobs.applied_index + 1, encode_cluster(cmd))])[0].ok
        r = await client.get(PATH, headers={"X-Meshgpu-Download": SECRET})
        assert r.status_code == 200


async def test_refused_without_a_good_secret(tmp_path: Path) -> None:
    client, _, _ = _world(tmp_path)
    async with client:
        for headers in ({}, {"X-Meshgpu-Download": "wrong"}, {"Authorization": "Bearer x"}):
            r = await client.get(PATH, headers=headers)
            assert r.status_code == 403, (headers, r.text)
            assert r.json()["code"] == "forbidden"
        r = await client.get(PATH, headers={"X-Meshgpu-Download": "x" * 300})
        assert r.status_code in (403, 422)


async def test_refused_once_the_instance_joined_or_the_secret_expired(tmp_path: Path) -> None:
    client, rep, _ = _world(tmp_path)
    b = Backends(None, rep.cluster)  # type: ignore[arg-type]
    inst = rep.cluster.fleets.fleets["cloud"].instances["i1"]
    assert b.download_allowed(SECRET) == "i1"
    late = inst.updated_at + DOWNLOAD_TTL_S + 1
    try:
        b.download_allowed(SECRET, now=late)
        raise AssertionError("an expired secret was accepted")
    except Exception as e:  # noqa: BLE001
        assert "expired" in str(e)
    cmd = UpdateFleetInstance(at=time.time(), name="cloud", instance_id="i1", state="idle")
    assert rep.apply([(rep.jobs.applied_index + 1, encode_cluster(cmd))])[0].ok
    async with client:
        r = await client.get(PATH, headers={"X-Meshgpu-Download": SECRET})
        assert r.status_code == 403
        assert "joined or expired" in r.json()["detail"]
