"""The probe's join scenarios against a live agent: an unauthenticated flood of bogus joins,
replays of a captured join (as is and re-pointed at other addresses), a valid signature over a
bad CSR, single-use and expiring tokens, and a local reader of the Raft database trying to forge
a join. Nothing bogus may reach the Raft log, and the API answers within a second throughout."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import trio

from meshgpu.security import JoinToken, NodeIdentity
from meshgpu.testing import AgentProcess
from tests.security._health import Watch


@pytest.fixture(scope="module")
def founder(tmp_path_factory: pytest.TempPathFactory):
    a = AgentProcess(tmp_path_factory.mktemp("join"), "founder")
    a.start()
    yield a
    a.stop()
    a.kill_jobs()


def signed(token: JoinToken, identity: NodeIdentity, node_id: str, **over: object) -> dict:
    fields = {
        "name": "h" + node_id[:8],
        "node_id": node_id,
        "peer_address": f"127.0.0.{2 + int(node_id[:2], 16) % 200}:{20000 + int(node_id[2:6], 16) % 20000}",
        "api_url": "https://127.0.0.1:2",
    } | over
    csr = str(fields.pop("csr_pem", None) or identity.csr_pem("h" + node_id[:8]).decode())
    return token.join_request(csr, **fields)


def new_identity(tmp: Path) -> NodeIdentity:
    ident = NodeIdentity(tmp / secrets.token_hex(4))
    ident.ensure_key()
    return ident


def commit_index(a: AgentProcess) -> int:
    r = httpx.get(
        f"{a.url}/api/v1/status", headers={"Authorization": f"Bearer {a.token}"}, verify=a.verify
    )
    return r.json()["commit_index"]


def create_token(a: AgentProcess, **params: object) -> JoinToken:
    r = httpx.post(
        f"{a.url}/api/v1/tokens",
        params=params,
        headers={"Authorization": f"Bearer {a.token}"},
        verify=a.verify,
    )
    assert r.status_code == 201, r.text
    return JoinToken.parse(r.json()["token"])


async def test_a_flood_of_bogus_joins_reaches_no_log_and_the_api_keeps_answering(
    founder: AgentProcess, tmp_path: Path
):
    token = JoinToken.parse(founder.join_token())
    ident = new_identity(tmp_path)
    before = commit_index(founder)
    watch = Watch(founder)
    statuses: list[int] = []
    async with (
        httpx.AsyncClient(verify=founder.verify, timeout=10) as c,
        trio.open_nursery() as n,
    ):
        n.start_soon(watch.run, c)
        for i in range(100):
            if i % 4 == 0:  # wrong secret
                bad = JoinToken(
                    token.cluster_id,
                    token.ca_fingerprint,
                    token.token_id,
                    JoinToken.create("x", "y").secret,
                )
                body = signed(bad, ident, f"{i:04x}aaaaaaaa")
            elif i % 4 == 1:  # unknown token id
                body = signed(token, ident, f"{i:04x}bbbbbbbb", token_id="00000000")
            elif i % 4 == 2:  # a huge CSR (the probe's 1 MB CSRs)
                body = signed(token, ident, f"{i:04x}cccccccc", csr_pem="A" * 200_000)
            else:  # garbage
                body = {"token_id": "x", "proof": "y" * 64}
            r = await c.post(f"{founder.url}/api/v1/join", json=body)
            statuses.append(r.status_code)
        n.cancel_scope.cancel()
    assert all(400 <= s < 500 for s in statuses), statuses
    assert commit_index(founder) == before  # nothing was proposed
    assert watch.samples > 0 and watch.worst < 1.0


async def test_a_captured_join_cannot_be_replayed_nor_re_pointed(
    founder: AgentProcess, tmp_path: Path
):
    token = create_token(founder, reusable="true")
    ident = new_identity(tmp_path)
    body = signed(token, ident, "feed00000001")
    async with httpx.AsyncClient(verify=founder.verify, timeout=30) as c:
        first = await c.post(f"{founder.url}/api/v1/join", json=body)
        assert first.status_code == 200, first.text
        before = commit_index(founder)
        again = await c.post(f"{founder.url}/api/v1/join", json=body)
        assert again.status_code == 403 and again.json()["code"] == "replay"
        # The probe's attack: the same request pointed at another peer address.
        moved = dict(body, peer_address="127.0.0.1:9", nonce=secrets.token_hex(16))
        r = await c.post(f"{founder.url}/api/v1/join", json=moved)
        assert r.status_code == 403 and r.json()["code"] == "bad_signature"
        # Re-signed by someone who holds the token, but another key for that node id: refused.
        other = signed(
            token, new_identity(tmp_path), "feed00000001", peer_address=body["peer_address"]
        )
        r = await c.post(f"{founder.url}/api/v1/join", json=other)
        assert r.status_code == 409 and r.json()["code"] == "member_conflict"
        # Too old a request (a capture kept for later) is refused for its time.
        stale = signed(token, ident, "feed00000002", ts=int(time.time()) - 3600)
        r = await c.post(f"{founder.url}/api/v1/join", json=stale)
        assert r.status_code == 403 and r.json()["code"] == "clock_skew"
    assert commit_index(founder) == before
    members = json.loads(
        httpx.get(
            f"{founder.url}/api/v1/nodes",
            headers={"Authorization": f"Bearer {founder.token}"},
            verify=founder.verify,
        ).text
    )
    assert '127.0.0.1:9"' not in json.dumps(members)


async def test_a_valid_signature_over_a_bad_csr_leaves_no_ghost(
    founder: AgentProcess, tmp_path: Path
):
    token = create_token(founder, reusable="true")
    before = commit_index(founder)
    body = signed(
        token,
        new_identity(tmp_path),
        "beef00000001",
        csr_pem="-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    async with httpx.AsyncClient(verify=founder.verify, timeout=30) as c:
        r = await c.post(f"{founder.url}/api/v1/join", json=body)
    assert r.status_code == 400 and r.json()["code"] == "invalid_csr"
    assert commit_index(founder) == before


async def test_tokens_are_single_use_by_default_and_expire(founder: AgentProcess, tmp_path: Path):
    once = create_token(founder)
    async with httpx.AsyncClient(verify=founder.verify, timeout=30) as c:
        r = await c.post(
            f"{founder.url}/api/v1/join", json=signed(once, new_identity(tmp_path), "a1a100000001")
        )
        assert r.status_code == 200, r.text
        r = await c.post(
            f"{founder.url}/api/v1/join", json=signed(once, new_identity(tmp_path), "a1a100000002")
        )
        assert r.status_code == 403 and "single-use" in r.json()["detail"]
        short = create_token(founder, ttl_s=1)
        await trio.sleep(1.5)
        r = await c.post(
            f"{founder.url}/api/v1/join", json=signed(short, new_identity(tmp_path), "a1a100000003")
        )
        assert r.status_code == 403 and "expired" in r.json()["detail"]


async def test_the_raft_database_holds_nothing_that_joins(founder: AgentProcess, tmp_path: Path):
    """A local user who reads raft.db (the probe's first finding) gets only verifiers: public
    keys, which cannot sign a join."""
    token = JoinToken.parse(founder.join_token())
    raw = b""
    for f in sorted((founder.data / "raft").iterdir()):
        raw += f.read_bytes()
    assert token.secret.encode() not in raw
    assert token.verifier().encode() in raw  # what is stored instead
    # The forger's best try: use what the log holds as if it were the secret.
    verifier = bytes.fromhex(token.verifier())
    forged = JoinToken(
        token.cluster_id,
        token.ca_fingerprint,
        token.token_id,
        base64.urlsafe_b64encode(verifier).decode().rstrip("="),
    )
    async with httpx.AsyncClient(verify=founder.verify, timeout=30) as c:
        r = await c.post(
            f"{founder.url}/api/v1/join",
            json=signed(forged, new_identity(tmp_path), "dead00000001"),
        )
    assert r.status_code == 403 and r.json()["code"] == "bad_signature"
    assert founder.token.encode() not in raw  # the API token is kept as a hash only


async def test_the_api_is_tls_pinned_to_the_cluster_ca(founder: AgentProcess):
    assert founder.url.startswith("https://")
    with pytest.raises(httpx.ConnectError):  # the system's CAs do not vouch for it
        httpx.get(f"{founder.url}/healthz")
    assert httpx.get(f"{founder.url}/healthz", verify=founder.verify).status_code == 200


def test_a_member_is_joinable_through_its_peer_address_whatever_its_api_port(
    founder: AgentProcess, tmp_path: Path
):
    """``--join HOST:PEERPORT`` (INTERFACE.md's form) with the member's API on a random port:
    the peer port says where the API is."""
    assert f":{founder.api_port}" in founder.url and founder.api_port != 7480
    joiner = AgentProcess(tmp_path, "via-peer-port")
    try:
        joiner.start(founder.join_token(), f"127.0.0.1:{founder.peer_port}")
        nodes = httpx.get(
            f"{joiner.url}/api/v1/nodes",
            headers={"Authorization": f"Bearer {joiner.token}"},
            verify=joiner.verify,
        ).json()["nodes"]
        assert {n["name"] for n in nodes} >= {"founder", "via-peer-port"}
    finally:
        joiner.stop()
        joiner.kill_jobs()


def test_a_restart_that_finds_no_leader_keeps_trying_and_says_so(tmp_path: Path):
    """The probe restarted a voter whose peers were down: it died of ``TooSlowError`` after 60 s.
    It must keep waiting (the API answering meanwhile), say why, and carry on once a peer is
    back."""
    a, b = AgentProcess(tmp_path, "a", log_level="info"), AgentProcess(tmp_path, "b")
    try:
        a.start()
        b.start(a.join_token(), a.url)
        deadline = time.monotonic() + 60
        while (
            len(
                httpx.get(
                    f"{a.url}/api/v1/status",
                    headers={"Authorization": f"Bearer {a.token}"},
                    verify=a.verify,
                ).json()["voters"]
            )
            < 2
        ):
            assert time.monotonic() < deadline, "b was not promoted to voter"
            time.sleep(0.2)
        b.stop()
        a.stop()
        # Alone of two voters: no quorum, no leader (and so no client profile written yet:
        # start it by hand rather than waiting for one).
        with open(a.log_path, "ab") as log:
            a.proc = subprocess.Popen(a.argv(), stdout=log, stderr=subprocess.STDOUT)
        t = time.monotonic()
        serving = False
        while "no leader after" not in a.log_tail(20000) or not serving:
            assert a.alive() and time.monotonic() - t < 30, a.log_tail()
            try:
                r = httpx.get(f"{a.url}/healthz", verify=a.verify, timeout=1.0)
            except httpx.ConnectError:
                assert not serving, "the API stopped answering"
            else:
                assert r.status_code == 200
                serving = True
            time.sleep(0.2)
        b.start()
        deadline = time.monotonic() + 60
        while True:
            st = httpx.get(
                f"{a.url}/api/v1/status",
                headers={"Authorization": f"Bearer {a.token}"},
                verify=a.verify,
            ).json()
            if st["leader"]:
                break
            assert time.monotonic() < deadline, a.log_tail()
            time.sleep(0.2)
    finally:
        for x in (a, b):
            x.stop()
            x.kill_jobs()


def test_with_api_tls_off_the_api_is_plain_http_and_joins_still_work(tmp_path: Path):
    """``--api-tls off`` (TLS terminated by a proxy in front): the API answers plain HTTP, and
    a joiner given the peer address finds it (HTTPS refused, plain HTTP next) and is admitted --
    the signed request and the sealed reply need no TLS."""
    a = AgentProcess(tmp_path, "plain", extra=["--api-tls", "off"])
    b = AgentProcess(tmp_path, "joiner")
    try:
        a.start()
        assert a.url.startswith("http://")
        assert httpx.get(f"{a.url}/healthz").status_code == 200
        b.start(a.join_token(), f"127.0.0.1:{a.peer_port}")
        names = {
            n["name"]
            for n in httpx.get(
                f"{b.url}/api/v1/nodes",
                headers={"Authorization": f"Bearer {b.token}"},
                verify=b.verify,
            ).json()["nodes"]
        }
        assert names == {"plain", "joiner"}
    finally:
        for x in (a, b):
            x.stop()
            x.kill_jobs()
