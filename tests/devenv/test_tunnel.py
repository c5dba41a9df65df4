"""The tunnel through any node: which SSH server a selector reaches, the WebSocket framing of
the lean client, and ``meshgpu ssh-proxy`` end to end over TLS to a TCP echo server and to
OpenSSH's own sshd (the stand-in for the agent's SSH server)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode

from meshgpu.client.tunnel import FrameReader, client_frame, mask
from meshgpu.devenv.tunnel import Tunnels, select_job, split_address
from meshgpu.errors import Conflict, NotFound, Unavailable
from meshgpu.scheduler import plan
from meshgpu.state import JobStatus
from tests.devenv._tunnel import (
    Node,
    api_node,
    free_port,
    make_state,
    needs_openssh,
    openssh_server,
    run,
    ssh_argv,
)
from tests.scheduler._world import apply_plan, jobs, submit, task

# -- which job, which SSH server -------------------------------------------------------------


def test_selector_names_a_run_a_numbered_job_or_a_job_id() -> None:
    sm, job_id = make_state("127.0.0.1:7482")
    assert select_job(sm, "dev").job_id == job_id
    assert select_job(sm, "dev-0").job_id == job_id
    assert select_job(sm, "dev", 0).job_id == job_id
    assert select_job(sm, job_id).job_id == job_id
    with pytest.raises(NotFound, match="jobs 0..0"):
        select_job(sm, "dev-1")
    with pytest.raises(NotFound, match="no run named"):
        select_job(sm, "nope")
    with pytest.raises(NotFound, match="no run named"):
        select_job(sm, "dev-0", 0)  # with an explicit job, the name is the run's


def test_a_run_named_like_a_numbered_job_wins() -> None:
    sm, _ = make_state("127.0.0.1:7482")
    sm.apply_command(submit("dev-1", task(None) | {"commands": ["sleep 1"]}, at=2))
    assert select_job(sm, "dev-1").run_name == "dev-1"


def test_target_is_the_ssh_server_of_the_host_running_the_job() -> None:
    sm, job_id = make_state("0.0.0.0:7999")
    t = Tunnels(sm, "n1").target("dev")
    assert (t.job.job_id, t.node.node_id, t.port) == (job_id, "n0", 7999)
    assert t.host == sm.nodes["n0"].internal_ip  # unspecified: the host's address
    assert Tunnels(sm, "n0").target("dev").host == "127.0.0.1"
    assert split_address("[::1]:22") == ("::1", 22)
    with pytest.raises(ValueError):
        split_address("nohost")


def test_no_tunnel_to_a_job_that_ended_never_ran_or_has_no_ssh_server() -> None:
    sm, _ = make_state(None)
    with pytest.raises(Unavailable, match="serves no SSH"):
        Tunnels(sm, "n1").target("dev")
    sm, job_id = make_state("127.0.0.1:7482")
    # a run that does not fit anywhere: it never runs
    sm.apply_command(submit("big", task("H100:64") | {"commands": ["true"]}, at=2))
    apply_plan(sm, plan(sm, now=2), at=2)
    assert jobs(sm, "big")[0].status is JobStatus.SUBMITTED
    with pytest.raises(Conflict, match="not running yet"):
        Tunnels(sm, "n1").target("big")
    Node("", Path(), sm, job_id, Path()).end_job()
    with pytest.raises(Conflict, match="ended"):
        Tunnels(sm, "n1").target("dev")


# -- the framing -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_000])
def test_client_frames_are_what_a_server_reads(size: int) -> None:
    payload = os.urandom(size)
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(client_frame(2, payload))
    frames = list(server.received_frames())
    assert len(frames) == 1
    assert frames[0].opcode is Opcode.BINARY and bytes(frames[0].payload) == payload


def test_server_frames_are_read_whole_across_any_split() -> None:
    server = FrameProtocol(client=True, extensions=[])  # frames as a server sends them
    messages = [os.urandom(n) for n in (3, 200, 70_000)]
    wire = b"".join(server.send_data(m, fin=True) for m in messages)
    reader = FrameReader()
    got = []
    for i in range(0, len(wire), 777):
        got += reader.feed(wire[i : i + 777])
    assert [p for _, p in got] == messages
    assert mask(mask(b"abcdefg", b"\x01\x02\x03\x04"), b"\x01\x02\x03\x04") == b"abcdefg"


# -- end to end ------------------------------------------------------------------------------


async def echo_server(task_status: trio.TaskStatus[tuple[int, list[str]]]) -> None:
    """A TCP echo server on a free port; ``events`` records opens and closes."""
    events: list[str] = []

    async def handle(stream: trio.SocketStream) -> None:
        events.append("open")
        try:
            async with stream:
                while data := await stream.receive_some(1 << 16):
                    await stream.send_all(data)
        except trio.BrokenResourceError:
            pass
        events.append("closed")

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, handle, listeners)
        task_status.started((port, events))


async def _echo_through(node: Node, data: bytes, *args: str) -> bytes:
    proc = await trio.lowlevel.open_process(
        node.proxy_argv("dev", *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=node.env(),
    )
    assert proc.stdin and proc.stdout
    got = bytearray()

    async def feed() -> None:
        await proc.stdin.send_all(data)

    with trio.fail_after(30):
        async with trio.open_nursery() as n:
            n.start_soon(feed)
            while len(got) < len(data):
                chunk = await proc.stdout.receive_some(1 << 18)
                assert chunk, "the tunnel ended early"
                got += chunk
        await proc.stdin.aclose()
        assert await proc.wait() == 0
    return bytes(got)


async def test_bytes_go_through_both_ways_unchanged(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port, events = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}") as node:
            data = os.urandom(8 << 20)
            assert await _echo_through(node, data) == data
            assert await _echo_through(node, b"x", "--job", "0") == b"x"
            with trio.fail_after(5):
                while events.count("closed") < 2:
                    await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


async def test_ended_unknown_and_unreachable_are_clean_errors_not_hangs(tmp_path: Path) -> None:
    dead = free_port()
    async with api_node(tmp_path, f"127.0.0.1:{dead}") as node:
        r = await run(node.proxy_argv("dev"), env=node.env(), timeout=15)
        assert r.returncode == 1 and b"SSH server unreachable" in r.stderr, r.stderr
        r = await run(node.proxy_argv("nope"), env=node.env(), timeout=15)
        assert r.returncode == 1 and b"run not found" in r.stderr, r.stderr
        r = await run(node.proxy_argv("dev", "--job", "3"), env=node.env(), timeout=15)
        assert r.returncode == 1 and b"job not found" in r.stderr, r.stderr
        node.end_job()
        r = await run(node.proxy_argv("dev"), env=node.env(), timeout=15)
        assert r.returncode == 1 and b"ended" in r.stderr, r.stderr
        r = await run(node.proxy_argv("dev"), env=node.env(MESHGPU_TOKEN="wrong"), timeout=15)
        assert r.returncode == 1 and b"unauthorized" in r.stderr, r.stderr


async def test_falls_back_to_another_member(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}") as node:
            dead = f"https://127.0.0.1:{free_port()}"
            text = node.profile.read_text().replace(node.url, dead, 1)
            text = text.replace("token =", f'members = ["{node.url}"]\ntoken =', 1)
            node.profile.write_text(text)
            assert await _echo_through(node, b"hello") == b"hello"
        nursery.cancel_scope.cancel()


async def test_a_client_that_vanishes_mid_transfer_leaves_the_node_healthy(
    tmp_path: Path,
) -> None:
    async with trio.open_nursery() as nursery:
        port, events = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}") as node:
            proc = await trio.lowlevel.open_process(
                node.proxy_argv("dev"),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=node.env(),
            )
            assert proc.stdin and proc.stdout
            with trio.fail_after(20):
                await proc.stdin.send_all(os.urandom(4 << 20))
                await proc.stdout.receive_some(1 << 16)  # flowing
                proc.send_signal(signal.SIGKILL)
                await proc.wait()
                while "closed" not in events:  # the relay closed its side
                    await trio.sleep(0.02)
            await proc.stdin.aclose()
            await proc.stdout.aclose()
            assert await _echo_through(node, b"still here") == b"still here"
        nursery.cancel_scope.cancel()


@needs_openssh
async def test_openssh_through_the_tunnel(tmp_path: Path) -> None:
    with openssh_server(tmp_path) as sshd:
        async with api_node(tmp_path, f"127.0.0.1:{sshd.port}") as node:
            r = await run(ssh_argv(node, sshd, "echo hello; pwd"), env=node.env())
            assert r.returncode == 0, r.stderr
            assert r.stdout.startswith(b"hello\n")
            blob = tmp_path / "blob"
            blob.write_bytes(os.urandom(5 << 20))
            argv = ssh_argv(node, sshd, f"cat > {tmp_path}/copy && sha256sum {tmp_path}/copy")
            r = await run(argv, stdin=blob.read_bytes(), env=node.env())
            assert r.returncode == 0, r.stderr
            import hashlib

            assert r.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()
            # the job ends: the next connection is refused with the reason, no hang
            node.end_job()
            r = await run(ssh_argv(node, sshd, "true"), env=node.env(), timeout=20)
            assert r.returncode != 0
            assert b"ended" in r.stderr, r.stderr
