"""The use cases that call other members (logs and metrics proxying, join forwarding) over a
fake ``Peers``, and what this host answers on the peer port (``ops.peers.answers``): refusals
are ``meshgpu.errors`` kinds end to end, never HTTP statuses read off attributes."""

from __future__ import annotations

import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consensus.core import Role
from meshgpu import errors
from meshgpu.ops import Admission, Logs, Metrics
from meshgpu.ops.peers import answers
from meshgpu.peer import PeerClient, PeerServer
from meshgpu.runner import ProcessRunner
from meshgpu.state.cluster import ClusterState, Member
from tests.api._stub import StubAgent
from tests.peer.test_peer import MemoryTransport
from tests.scheduler._world import host, jobs, schedule, submit, task, world


class FakePeers:
    """Answers as ``answer(op, node_id, *args)`` says (a value, or an error raised)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[tuple[Any, ...]] = []

    def _call(self, *call: Any) -> Any:
        self.calls.append(call)
        result = self.answer(*call)
        if isinstance(result, BaseException):
            raise result
        return result

    async def logs(self, node_id: str, run: str, job: int, follow: bool) -> AsyncIterator[bytes]:
        for chunk in self._call("logs", node_id, run, job, follow):
            if isinstance(chunk, BaseException):
                raise chunk
            yield chunk

    async def metrics(
        self, node_id: str, run: str, job: int | None, *, timeout: float
    ) -> dict[str, Any]:
        return self._call("metrics", node_id, run, job)

    async def join(self, node_id: str, body: dict[str, Any], *, timeout: float) -> dict[str, Any]:
        return self._call("join", node_id, body)


def _elsewhere() -> Any:
    """A run whose one job the scheduler put on n2 (this host is n1)."""
    sm = world(host("n1", 1), host("n2", 8), submit("train", task("H100:4"), at=1))
    schedule(sm)
    assert jobs(sm, "train")[0].node_id == "n2"
    return sm


async def test_a_log_elsewhere_is_proxied_and_a_broken_stream_says_so(tmp_path: Path) -> None:
    sm = _elsewhere()
    broke = errors.Unavailable("peer unavailable", "node n2 closed the stream", "unavailable")
    peers = FakePeers(lambda *call: [b"one\n", broke])
    logs = Logs(sm, ProcessRunner(tmp_path, use_launcher=False), "n1", peers)
    source = logs.source("train", 0)
    assert source.node_id == "n2"
    out = b"".join([c async for c in logs.proxy("n2", "train", 0, True)])
    assert out.startswith(b"one\n") and b"the log stream from n2 broke" in out
    assert peers.calls == [("logs", "n2", "train", 0, True)]
    with pytest.raises(errors.NotFound):
        logs.source("nope", 0)


async def test_metrics_of_a_job_elsewhere_are_asked_of_its_host(tmp_path: Path) -> None:
    sm = _elsewhere()
    runner, gpus = ProcessRunner(tmp_path, use_launcher=False), StubAgent(sm, tmp_path).gpus
    sample = {"run": "train", "jobs": [{"job_num": 0, "node": "n2", "error": None}]}
    ok = Metrics(sm, runner, gpus, "n1", "n1", FakePeers(lambda *call: sample))
    assert (await ok.run("train", None, local=False))["jobs"] == sample["jobs"]
    for err, says in (
        (errors.Unavailable("peer unavailable", "gone"), "cannot reach n2"),
        (errors.NotFound("run not found", "x"), "n2 answered: run not found"),
    ):
        failing = Metrics(sm, runner, gpus, "n1", "n1", FakePeers(lambda *call, e=err: e))
        [entry] = (await failing.run("train", None, local=False))["jobs"]
        assert entry["error"].startswith(says), entry
    [entry] = (await ok.run("train", 0, local=True))["jobs"]  # what n2's own answer skips
    assert entry["error"] == "this node (n1) does not run the job"
    with pytest.raises(errors.NotFound):
        await ok.run("nope", None, local=False)


def _follower(peers: FakePeers) -> Admission:
    cluster = ClusterState()
    cluster.members[1] = Member(
        raft_id=1, node_id="lead", name="a", peer_address="127.0.0.1:1", api_url="", joined_at=0
    )
    node: Any = types.SimpleNamespace(leader=1, role=Role.FOLLOWER)
    return Admission(node, cluster, None, None, lambda: "", peers)  # type: ignore[arg-type]


async def test_a_follower_forwards_a_join_and_passes_the_leaders_refusal_on() -> None:
    assert await _follower(FakePeers(lambda *call: {"raft_id": 4})).admit({"x": 1}) == {
        "raft_id": 4
    }
    refused = errors.Denied("join refused", "token spent", "token_used")
    with pytest.raises(errors.Denied) as e:
        await _follower(FakePeers(lambda *call: refused)).admit({})
    assert e.value is refused
    stepped_down = errors.Unavailable("not the leader", "retry", "not_leader")
    with pytest.raises(errors.Unavailable) as e:
        await _follower(FakePeers(lambda *call: stepped_down)).admit({})
    assert e.value.code == "not_leader"
    gone = errors.Unavailable("peer unavailable", "no answer within 30s", "unavailable")
    with pytest.raises(errors.Unavailable) as e:
        await _follower(FakePeers(lambda *call: gone)).admit({})
    assert e.value.title == "the leader did not answer"
    # A join forwarded here while this node is no leader is refused, not forwarded again.
    with pytest.raises(errors.Unavailable) as e:
        await _follower(FakePeers(lambda *call: {})).admit_forwarded({})
    assert e.value.code == "not_leader"


async def test_this_hosts_answers_are_the_use_cases_over_the_peer_protocol(
    tmp_path: Path, nursery: Any
) -> None:
    sm = _elsewhere()
    services = StubAgent(sm, tmp_path, node_id="n2")  # the host that runs the job
    cluster = ClusterState()
    cluster.members[1] = Member(
        raft_id=1, node_id="n1", name="n1", peer_address="127.0.0.1:1", api_url="", joined_at=0
    )

    async def gossip(peer: int, body: bytes) -> bytes:
        return body

    server = PeerServer()
    client = PeerClient(lambda: MemoryTransport(nursery, server), lambda n: (2, ("h", 1)))
    with pytest.raises(errors.Unavailable):  # not serving yet: the stream is closed
        await client.metrics("n2", "train", None, timeout=5)
    server.serve(answers(services, cluster, gossip))
    [job] = jobs(sm, "train")
    log = services.runner.log_path(job.job_id)
    log.parent.mkdir(parents=True)
    log.write_bytes(b"hello from n2\n")
    assert [c async for c in client.logs("n2", "train", 0, False)] == [b"hello from n2\n"]
    with pytest.raises(errors.NotFound) as e:
        [c async for c in client.logs("n2", "nope", 0, False)]
    assert (e.value.title, e.value.code) == ("run not found", "not_found")
    with pytest.raises(errors.NotFound):
        await client.fetch_code("n2", "0" * 64, 1 << 20, timeout=5)
    with pytest.raises(errors.Invalid):  # not an archive: the code use case refuses it
        await client.push_code("n2", "0" * 64, b"not a tar.gz", timeout=5)
    doc = await client.metrics("n2", "train", 0, timeout=5)
    assert doc["jobs"][0]["node"] == "n2"
    # A join forwarded to a member that is (no longer) the leader: refused, not passed on.
    services.admission.node = types.SimpleNamespace(leader=1, role=Role.FOLLOWER)
    with pytest.raises(errors.Unavailable) as e:
        await client.join("n2", {}, timeout=5)
    assert e.value.code == "not_leader"
    # A caller that is not a current member is refused before any use case runs.
    cluster.members[1].removed = True
    with pytest.raises(errors.Denied):
        await client.metrics("n2", "train", 0, timeout=5)
