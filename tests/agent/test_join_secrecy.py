"""The join handshake: nothing in it may be usable by someone who reads it or replays it. The
token's secret never travels (the request is signed with it), the cluster API token comes back
sealed to the joiner's own key, and the API speaks TLS pinned to the CA in the token."""

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


def signed_join(token: JoinToken, csr: bytes, name: str, node_id: str, **over: object) -> dict:
    fields = {"peer_address": "127.0.0.1:1", "api_url": "https://127.0.0.1:2"} | over
    return token.join_request(csr.decode(), name=name, node_id=node_id, **fields)


async def test_join_reply_carries_the_api_token_sealed(founder: AgentProcess, tmp_path: Path):
    token = JoinToken.parse(founder.join_token())
    joiner = NodeIdentity(tmp_path / "joiner-tls")
    joiner.ensure_key()
    csr = joiner.csr_pem("joiner")
    body = signed_join(token, csr, "joiner", "0123456789ab")
    assert token.secret not in str(body)  # the secret never travels
    async with httpx.AsyncClient(timeout=30, verify=founder.verify) as c:
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
        node_id="0123456789ac",
        peer_address="127.0.0.1:1",
        api_url="https://127.0.0.1:2",
    )
    assert result.api_token == founder.token


async def test_request_join_refuses_a_member_whose_ca_is_not_the_tokens(
    founder: AgentProcess, tmp_path: Path
):
    """The CA fingerprint in the token pins the cluster: another CA is not this mesh."""
    real = JoinToken.parse(founder.join_token())
    token = JoinToken(real.cluster_id, "0" * 32, real.token_id, real.secret)
    joiner = NodeIdentity(tmp_path / "joiner-tls")
    from meshgpu.mesh.join import JoinError

    with pytest.raises(JoinError, match="does not match the token"):
        await request_join(
            [founder.url],
            token,
            joiner,
            name="joiner3",
            node_id="0123456789ad",
            peer_address="127.0.0.1:3",
            api_url="https://127.0.0.1:4",
        )
