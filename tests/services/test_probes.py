"""Replica probes (meshgpu/services/probes.py): the prober runs a service's probes against a
real local HTTP server (or a TCP connect check when it has none) and reports each replica's
readiness through ``ReplicaProbes`` only when it changes, epoch-fenced. Fast intervals: the
probe spec is replaced in the state after submission."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import pytest
import trio

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import Probe
from meshgpu.services.probes import FAILING, PROBING, READY, Prober, ProbeTracker
from meshgpu.state import (
    AssignJobs,
    Assignment,
    JobStarted,
    RegisterNode,
    ReplicaProbes,
    StateMachine,
    StopRun,
    SubmitRun,
)
from meshgpu.state.commands import decode

# -- the pure streak --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ready_after", "results", "states"),
    [
        (1, [True], [READY]),
        (1, [False, True, False], [FAILING, READY, FAILING]),
        (3, [True, True, True, True], [PROBING, PROBING, READY, READY]),
        (2, [True, False, True, True, False], [PROBING, FAILING, PROBING, READY, FAILING]),
    ],
)
def test_ready_after_counts_consecutive_successes(
    ready_after: int, results: list[bool], states: list[str]
) -> None:
    t = ProbeTracker(ready_after=ready_after)
    assert t.status == FAILING
    assert [t.record(ok) for ok in results] == states


# -- a real server --------------------------------------------------------------------------


class App:
    """A tiny HTTP/1.1 server on a free port: answers ``status`` (settable), records requests."""

    def __init__(self) -> None:
        self.status = 200
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.port = 0

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            while len(body) < int(headers.get("content-length", 0)):
                body += await stream.receive_some(65536)
            self.requests.append((method, path, headers, body))
            await stream.send_all(
                f"HTTP/1.1 {self.status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".encode()
            )
        finally:
            await stream.aclose()


SERVICE = """\
type: service
port: {port}
commands: [sleep 1000]
{extra}
"""


def _state(port: int, extra: str = "") -> tuple[StateMachine, str]:
    sm = StateMachine()
    sm.apply_command(
        RegisterNode(
            at=1.0,
            node_id="n1",
            name="n1",
            internal_ip="127.0.0.1",
            gpus=[],
            cpu_count=16,
            memory_mib=64 * 1024,
            disk_gb=500,
        )
    )
    config = to_json(parse_config(SERVICE.format(port=port, extra=extra)))
    sm.apply_command(
        SubmitRun(at=2.0, request_id="r", run_id="id-svc", run_name="svc", config=config)
    )
    (job,) = sm.run_jobs(sm.runs["svc"])
    res = sm.apply_command(
        AssignJobs(
            at=3.0, assignments=[Assignment(job_id=job.job_id, node_id="n1", gpu_indices=[])]
        )
    )
    assert res.ok and not res.value["refused"], res
    sm.apply_command(
        JobStarted(at=4.0, job_id=job.job_id, epoch=sm.jobs[job.job_id].epoch, started_at=4.0)
    )
    return sm, job.job_id


def _set_probes(sm: StateMachine, *probes: Probe) -> None:
    run = sm.runs["svc"]
    service = dataclasses.replace(run.spec.service, probes=tuple(probes), probes_configured=True)
    run.spec = dataclasses.replace(run.spec, service=service)


class Log:
    """A proposer that applies ReplicaProbes to the state and keeps what it saw."""

    def __init__(self, sm: StateMachine, notify: Callable[[], None] | None = None) -> None:
        self.sm = sm
        self.commands: list[ReplicaProbes] = []
        self.notify = notify

    async def propose(self, data: bytes, request_id: bytes | None = None) -> Any:
        cmd = decode(data)
        assert isinstance(cmd, ReplicaProbes)
        self.commands.append(cmd)
        self.sm.apply_command(cmd)
        return None

    def seen(self) -> list[tuple[bool, list[str]]]:
        return [(r.ready, r.probes) for c in self.commands for r in c.reports]


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while not cond():
            await trio.sleep(0.01)


async def test_http_probe_failing_ready_failing(nursery: trio.Nursery) -> None:
    app = App()
    await nursery.start(app.serve)
    sm, job_id = _state(app.port)
    _set_probes(sm, Probe(url="/health", interval_s=0.02, timeout_s=1.0, ready_after=3))
    app.status = 503
    log = Log(sm)
    prober = Prober("n1", sm, log.propose)
    await nursery.start(prober.run)
    await _until(lambda: log.seen() == [(False, [FAILING])])
    assert all(r[1] == "/health" and r[0] == "GET" for r in app.requests)
    app.status = 200
    await _until(lambda: sm.jobs[job_id].ready)
    # ready only after three 2xx in a row; each change reported once, nothing unchanged.
    assert log.seen() == [(False, [FAILING]), (False, [PROBING]), (True, [READY])]
    app.status = 500
    await _until(lambda: not sm.jobs[job_id].ready)
    assert log.seen()[-1] == (False, [FAILING]) and sm.jobs[job_id].probes == [FAILING]
    assert all(r.epoch == sm.jobs[job_id].epoch for c in log.commands for r in c.reports)


async def test_until_ready_stops_probing_once_ready(nursery: trio.Nursery) -> None:
    app = App()
    await nursery.start(app.serve)
    sm, job_id = _state(app.port)
    _set_probes(
        sm,
        Probe(url="/a", interval_s=0.02, ready_after=2, until_ready=True),
        Probe(url="/b", interval_s=0.02, ready_after=1),
    )
    log = Log(sm)
    await nursery.start(Prober("n1", sm, log.propose).run)
    await _until(lambda: sm.jobs[job_id].ready)
    assert sm.jobs[job_id].probes == [READY, READY]
    await trio.sleep(0.2)
    paths = [r[1] for r in app.requests]
    assert paths.count("/a") == 2 and paths.count("/b") > 4
    app.status = 500  # /a is not asked again: only /b fails the replica now
    await _until(lambda: not sm.jobs[job_id].ready)
    assert sm.jobs[job_id].probes == [READY, FAILING]


async def test_default_model_probe_posts_one_token_chat_completion(nursery: trio.Nursery) -> None:
    app = App()
    await nursery.start(app.serve)
    sm, job_id = _state(app.port, "model: llama-tiny")
    (probe,) = sm.runs["svc"].spec.service.probes
    _set_probes(sm, dataclasses.replace(probe, interval_s=0.02))
    log = Log(sm)
    await nursery.start(Prober("n1", sm, log.propose).run)
    await _until(lambda: sm.jobs[job_id].ready)
    method, path, headers, body = app.requests[0]
    assert (method, path) == ("POST", "/v1/chat/completions")
    assert headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert doc["model"] == "llama-tiny" and doc["max_tokens"] == 1 and doc["messages"]


async def test_tcp_check_without_probes(nursery: trio.Nursery) -> None:
    # A free port, nothing listening yet: not ready until something accepts connections.
    probe_sock = trio.socket.socket()
    await probe_sock.bind(("127.0.0.1", 0))
    port = probe_sock.getsockname()[1]
    probe_sock.close()
    sm, job_id = _state(port, "probes: []")
    assert sm.runs["svc"].spec.service.probes == ()
    log = Log(sm)
    prober = Prober("n1", sm, log.propose, tcp_interval_s=0.02, tcp_ready_interval_s=0.02)
    await nursery.start(prober.run)
    await _until(lambda: log.seen() == [(False, [FAILING])])
    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
    await _until(lambda: sm.jobs[job_id].ready)
    assert log.seen() == [(False, [FAILING]), (True, [READY])]
    for listener in listeners:
        await listener.aclose()
    await _until(lambda: not sm.jobs[job_id].ready)


async def test_a_stopped_replica_is_no_longer_probed_and_reports_are_fenced(
    nursery: trio.Nursery,
) -> None:
    app = App()
    await nursery.start(app.serve)
    sm, job_id = _state(app.port)
    _set_probes(sm, Probe(url="/", interval_s=0.02))
    log = Log(sm)
    prober = Prober("n1", sm, log.propose)
    await nursery.start(prober.run)
    await _until(lambda: sm.jobs[job_id].ready)
    sm.apply_command(StopRun(at=5.0, run_name="svc"))
    prober.notify()
    await trio.sleep(0.05)
    assert job_id not in prober.replicas
    n = len(app.requests)
    await trio.sleep(0.1)
    assert len(app.requests) == n
    # A report for an older epoch changes nothing (the minimal handler on this branch).
    job = sm.jobs[job_id]
    stale = ReplicaProbes(
        at=6.0,
        reports=[{"job_id": job_id, "epoch": job.epoch - 1, "ready": False, "probes": []}],
    )
    sm.apply_command(stale)
    assert sm.jobs[job_id].probes == [READY]


async def test_a_restarted_prober_does_not_blink_a_ready_replica(nursery: trio.Nursery) -> None:
    app = App()
    await nursery.start(app.serve)
    sm, job_id = _state(app.port)
    _set_probes(sm, Probe(url="/", interval_s=0.02, ready_after=3))
    log = Log(sm)
    async with trio.open_nursery() as first:
        await first.start(Prober("n1", sm, log.propose).run)
        await _until(lambda: sm.jobs[job_id].ready)
        first.cancel_scope.cancel()
    before = len(log.commands)
    await nursery.start(Prober("n1", sm, log.propose).run)
    await trio.sleep(0.2)
    assert len(log.commands) == before and sm.jobs[job_id].ready
