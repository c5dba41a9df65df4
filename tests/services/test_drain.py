"""Draining a service replica before its graceful stop (meshgpu/runner/drain.py and the
executor's graceful-stop path): the host waits until no connection to the replica's port is
established -- read from /proc/net/tcp{,6} -- for at least a moment and at most the stop grace,
then sends SIGTERM. A real listening process and a held connection."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import RunSpec, ServiceSpec
from meshgpu.runner import ProcessRunner
from meshgpu.runner.drain import drain, established
from meshgpu.runner.executor import Executor
from meshgpu.state import (
    AssignJobs,
    Assignment,
    JobStatus,
    RegisterNode,
    StateMachine,
    StopRun,
    SubmitRun,
)
from meshgpu.state.commands import decode

pytestmark = pytest.mark.skipif(
    not Path("/proc/net/tcp").exists(), reason="needs Linux /proc/net/tcp"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER = """
import socket, sys, threading
srv = socket.socket(socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("::1" if sys.argv[2] == "6" else "127.0.0.1", int(sys.argv[1])))
srv.listen()
print("listening", flush=True)
def hold(c):
    while c.recv(100):
        pass
    c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=hold, args=(c,), daemon=True).start()
"""


@pytest.fixture(params=["4", "6"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[int, str]]:
    if request.param == "6" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = _free_port()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port), request.param], stdout=subprocess.PIPE
        )
    except OSError as e:
        pytest.skip(str(e))
    assert proc.stdout is not None
    try:
        if proc.stdout.readline().strip() != b"listening":
            pytest.skip("cannot listen")
        yield port, ("::1" if request.param == "6" else "127.0.0.1")
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()


async def test_established_counts_connections_to_the_port(server: tuple[int, str]) -> None:
    port, host = server
    assert established(port) == 0
    a = socket.create_connection((host, port))
    b = socket.create_connection((host, port))
    await trio.sleep(0.05)
    assert established(port) == 2  # the server side of each (the client side's port differs)
    a.close()
    b.close()
    with trio.fail_after(5):
        while established(port):
            await trio.sleep(0.02)


async def test_drain_waits_for_a_held_connection(server: tuple[int, str]) -> None:
    port, host = server
    # Nothing connected: done after the minimum wait.
    t0 = trio.current_time()
    assert await drain(port, 5.0, min_s=0.2)
    assert 0.2 <= trio.current_time() - t0 < 1.0
    held = socket.create_connection((host, port))
    t0 = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def close_later() -> None:
            await trio.sleep(0.6)
            held.close()

        nursery.start_soon(close_later)
        assert await drain(port, 5.0, min_s=0.1, poll_s=0.05)
    assert 0.6 <= trio.current_time() - t0 < 2.0
    # Held past the bound: it gives up at max_s.
    held = socket.create_connection((host, port))
    t0 = trio.current_time()
    assert not await drain(port, 0.5, min_s=0.1, poll_s=0.05)
    assert 0.5 <= trio.current_time() - t0 < 1.5
    held.close()


async def test_a_graceful_stop_drains_then_terminates(tmp_path: Path) -> None:
    port = _free_port()
    script_path = tmp_path / "server.py"
    script_path.write_text(SERVER)
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
    text = (
        f"type: service\nport: {port}\nstop_duration: 30s\n"
        f"commands: ['{sys.executable} {script_path} {port} 4']\n"
    )
    sm.apply_command(
        SubmitRun(
            at=2.0,
            request_id="r",
            run_id="id-svc",
            run_name="svc",
            config=to_json(parse_config(text)),
        )
    )
    (job,) = sm.run_jobs(sm.runs["svc"])
    sm.apply_command(
        AssignJobs(
            at=3.0, assignments=[Assignment(job_id=job.job_id, node_id="n1", gpu_indices=[])]
        )
    )

    async def propose(data: bytes, request_id: bytes | None = None) -> Any:
        result = sm.apply_command(decode(data))
        ex.notify()
        return result

    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = Executor("n1", sm, runner, propose, tmp_path / "code", lambda: None)
    ex.drain_min_s = 0.2
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(ex.run)
            ex.notify()
            with trio.fail_after(20):
                while True:
                    try:
                        held = socket.create_connection(("127.0.0.1", port))
                        break
                    except OSError:
                        await trio.sleep(0.05)
                while sm.jobs[job.job_id].status is not JobStatus.RUNNING:
                    await trio.sleep(0.02)
            sm.apply_command(StopRun(at=5.0, run_name="svc"))
            ex.notify()
            await trio.sleep(1.0)
            # Still serving its connection: no SIGTERM yet.
            assert sm.jobs[job.job_id].status is JobStatus.TERMINATING
            assert runner.result(job.job_id) is None
            held.close()
            with trio.fail_after(10):
                while not sm.jobs[job.job_id].status.is_finished():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    finally:
        await runner.aclose()
    assert sm.jobs[job.job_id].termination_reason.value == "terminated_by_user"


async def test_an_abort_does_not_wait_for_the_drain(tmp_path: Path) -> None:
    """Covered through the executor's stop path: an abort during a drain cancels it."""
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = Executor("n1", StateMachine(), runner, None, tmp_path, lambda: None)  # type: ignore[arg-type]
    stopped: list[tuple[str, float]] = []
    runner.stop = lambda job_id, grace_s, reason="": stopped.append((job_id, grace_s)) or True  # type: ignore[method-assign]
    spec = RunSpec(service=ServiceSpec(port=_free_port()), stop_grace_s=30.0)  # type: ignore[call-arg]
    async with trio.open_nursery() as nursery:
        ex._nursery = nursery
        ex._stop("j1", abort=False, spec=spec)
        await trio.sleep(0.05)
        assert stopped == [] and "j1" in ex._draining
        ex._stop("j1", abort=True, spec=spec)
        assert stopped == [("j1", 0.0)] and "j1" not in ex._draining
        await trio.sleep(0.7)
        assert stopped == [("j1", 0.0)]  # the cancelled drain stops nothing more
    await runner.aclose()
