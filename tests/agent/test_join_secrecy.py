"""The join handshake travels over plain HTTP: nothing in its reply may be usable by someone who
reads it. The cluster API token comes back sealed to the joiner's own key."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from meshgpu.mesh.join import request_join
from meshgpu.security import JoinToken, NodeIdentity, unseal
from meshgpu.testing import AgentProcess


@pytest.fixture
def founder(tmp_path: Path):
    a = AgentProcess(tmp_path, "founder")
    a.start()
    yield a
    a.stop()
    a.kill_jobs()


async def test_join_reply_carries_the_api_token_sealed(founder: AgentProcess, tmp_path: Path):
    token = JoinToken.parse(founder.join_token())
    joiner = NodeIdentity(tmp_path / "joiner-tls")
    joiner.ensure_key()
    csr = joiner.csr_pem("joiner")
    body = {
        "token_id": token.token_id,
        "proof": token.proof(csr, "joiner"),
        "csr_pem": csr.decode(),
        "name": "joiner",
        "node_id": "joiner0001",
        "peer_address": "127.0.0.1:1",
        "api_url": "http://127.0.0.1:2",
    }
    async with httpx.AsyncClient(timeout=30) as c:
        r = await c.post(f"{founder.url}/api/v1/join", json=body)
    assert r.status_code == 200, r.text
    assert founder.token not in r.text  # what an eavesdropper sees
    assert "api_token" not in r.json()
    # Only the joiner's key opens it ...
    sealed = bytes.fromhex(r.json()["api_token_sealed"])
    assert unseal(sealed, joiner.private_key()).decode() == founder.token
    # ... not another key.
    other = NodeIdentity(tmp_path / "other-tls")
    with pytest.raises(Exception):  # noqa: B017 - cryptography's InvalidTag
        unseal(sealed, other.ensure_key())


async def test_request_join_opens_the_sealed_token(founder: AgentProcess, tmp_path: Path):
    token = JoinToken.parse(founder.join_token())
    joiner = NodeIdentity(tmp_path / "joiner-tls")
    joiner.ensure_key()
    result = await request_join(
        [founder.url],
        token,
        joiner,
        name="joiner2",
        node_id="joiner0002",
        peer_address="127.0.0.1:1",
        api_url="http://127.0.0.1:2",
    )
    assert result.api_token == founder.token
