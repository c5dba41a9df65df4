"""The tunnel through any node: which SSH server a selector reaches, the WebSocket framing of
the lean client, what the API port's front takes for itself, and ``meshgpu ssh-proxy`` end to
end over TLS (the byte stream, and the WebSocket: asked for, or from a node without the front)
to a TCP echo server and to OpenSSH's own sshd (the stand-in for the agent's SSH server)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import trio
from wsproto.frame_protocol import FrameProtocol, Opcode

from meshgpu.api.front import Head, classify
from meshgpu.api.tunnel import UPGRADE, RawTunnel
from meshgpu.client.tunnel import FrameReader, client_frame, mask
from meshgpu.devenv.tunnel import Tunnels, select_job, split_address
from meshgpu.errors import Conflict, NotFound, Unavailable
from meshgpu.scheduler import plan
from meshgpu.state import JobStatus
from tests.api._stub import TOKEN
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


PROTOCOLS = pytest.mark.parametrize("protocol", ["raw", "websocket"])


def _env(node: Node, protocol: str = "raw", **more: str) -> dict[str, str]:
    return node.env(MESHGPU_SSH_TUNNEL=protocol, **more)


async def _echo_through(node: Node, data: bytes, *args: str, protocol: str = "raw") -> bytes:
    proc = await trio.lowlevel.open_process(
        node.proxy_argv("dev", *args),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(node, protocol),
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
        assert await proc.wait() == 0, await proc.stderr.receive_some()  # type: ignore[union-attr]
    return bytes(got)


@PROTOCOLS
async def test_bytes_go_through_both_ways_unchanged(tmp_path: Path, protocol: str) -> None:
    async with trio.open_nursery() as nursery:
        port, events = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}") as node:
            data = os.urandom(8 << 20)
            assert await _echo_through(node, data, protocol=protocol) == data
            assert await _echo_through(node, b"x", "--job", "0", protocol=protocol) == b"x"
            with trio.fail_after(5):
                while events.count("closed") < 2:
                    await trio.sleep(0.02)
        nursery.cancel_scope.cancel()


@PROTOCOLS
async def test_ended_unknown_and_unreachable_are_clean_errors_not_hangs(
    tmp_path: Path, protocol: str
) -> None:
    dead = free_port()
    async with api_node(tmp_path, f"127.0.0.1:{dead}") as node:
        env = _env(node, protocol)
        r = await run(node.proxy_argv("dev"), env=env, timeout=15)
        assert r.returncode == 1 and b"SSH server unreachable" in r.stderr, r.stderr
        r = await run(node.proxy_argv("nope"), env=env, timeout=15)
        assert r.returncode == 1 and b"run not found" in r.stderr, r.stderr
        r = await run(node.proxy_argv("dev", "--job", "3"), env=env, timeout=15)
        assert r.returncode == 1 and b"job not found" in r.stderr, r.stderr
        r = await run(node.proxy_argv("dev", "--job", "0x"), env=env, timeout=15)
        assert r.returncode != 0
        node.end_job()
        r = await run(node.proxy_argv("dev"), env=env, timeout=15)
        assert r.returncode == 1 and b"ended" in r.stderr, r.stderr
        r = await run(node.proxy_argv("dev"), env=_env(node, protocol, MESHGPU_TOKEN="wrong"))
        assert r.returncode == 1 and b"unauthorized" in r.stderr, r.stderr


async def test_the_byte_stream_answers_as_the_websocket_route_does(tmp_path: Path) -> None:
    """The same checks in the same order, the same problem documents (plus the mark that tells
    the client this node speaks the byte stream); no token, no connection to the SSH server."""
    import ssl

    async with trio.open_nursery() as nursery:
        port, events = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}") as node:
            from meshgpu.security import NodeIdentity

            ctx = ssl.create_default_context(cafile=NodeIdentity(tmp_path / "tls-n1").files.ca_cert)
            host, _, p = node.url.removeprefix("https://").partition(":")

            async def ask(*headers: str) -> bytes:
                tcp = await trio.open_tcp_stream(host, int(p))
                stream = trio.SSLStream(tcp, ctx, server_hostname=host)
                head = ["GET /api/v1/runs/dev/ssh HTTP/1.1", f"Host: {host}", *headers]
                await stream.send_all(("\r\n".join(head) + "\r\n\r\n").encode())
                got = b""
                with trio.fail_after(10):
                    while b"\r\n\r\n" not in got:
                        got += await stream.receive_some(1 << 16)
                await stream.aclose()
                return got

            up = (f"Upgrade: {UPGRADE.decode()}", "Connection: Upgrade")
            got = await ask(*up)
            assert got.startswith(b"HTTP/1.1 401 "), got
            assert (
                b"meshgpu-tunnel: 1" in got.lower() and b"www-authenticate: bearer" in got.lower()
            )
            got = await ask(*up, "Authorization: Bearer wrong")
            assert got.startswith(b"HTTP/1.1 401 "), got
            assert events == []  # never connected for a request without the token
            got = await ask(*up, f"Authorization: Bearer {TOKEN}")
            assert got.startswith(b"HTTP/1.1 101 ") and b"meshgpu-tunnel: 1" in got.lower(), got
            # without the upgrade (or a WebSocket one): hypercorn's, as before
            got = await ask(f"Authorization: Bearer {TOKEN}")
            assert b"meshgpu-tunnel" not in got.lower() and not got.startswith(b"HTTP/1.1 101")
        nursery.cancel_scope.cancel()


async def test_a_node_without_the_byte_stream_gets_the_websocket(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        port, _ = await nursery.start(echo_server)
        async with api_node(tmp_path, f"127.0.0.1:{port}", old=True) as node:
            data = os.urandom(1 << 20)
            assert await _echo_through(node, data) == data
            r = await run(node.proxy_argv("nope"), env=_env(node), timeout=15)
            assert r.returncode == 1 and b"run not found" in r.stderr, r.stderr
        nursery.cancel_scope.cancel()


def test_front_takes_only_the_byte_stream_upgrade_and_hands_on_the_rest() -> None:
    up = b"Upgrade: meshgpu-ssh/1\r\nConnection: Upgrade\r\n"
    req = b"GET /api/v1/runs/d%C3%A9v/ssh?job=2 HTTP/1.1\r\nHost: x\r\n" + up + b"\r\nSSH-2.0"
    head = classify(req, UPGRADE)
    assert isinstance(head, Head)
    assert (head.name, head.query, head.rest) == ("dév", b"job=2", b"SSH-2.0")
    for i in range(len(req) - len(b"\r\nSSH-2.0")):  # any split of the head: read more
        assert classify(req[:i], UPGRADE) is None, i
    for other in (
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"POST /api/v1/runs/x/ssh HTTP/1.1\r\n" + up + b"\r\n",
        b"GET /api/v1/runs HTTP/1.1\r\n\r\n",
        b"GET /api/v1/runs/x/ssh HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
        b"GET /api/v1/runs/x/ssh HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/v1/runs/x/ssh HTTP/1.1\r\nUpgrade: meshgpu-ssh/1\r\n\r\n",
        b"GET /api/v1/runs/x/logs HTTP/1.1\r\n" + up + b"\r\n",
        b"GET /api/v1/runs/x/ssh HTTP/1.0\r\n" + up + b"\r\n",
        b"G",  # (no: "G" could still be it)
    ):
        assert classify(other, UPGRADE) is (None if other == b"G" else False), other
    assert classify(b"GET /api/v1/runs/" + b"x" * (20 << 10), UPGRADE) is False
    # a service's own host (<run>.<domain>) is the ingress's, whatever the path
    raw = RawTunnel(None, lambda t: True, b"example.com")  # type: ignore[arg-type]
    on = [(b"host", b"web.example.com")]
    assert raw.claim(Head("x", b"", on, b"")) is None
    assert raw.claim(Head("x", b"", [(b"host", b"node1:8443")], b"")) is not None


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
            assert b"ssh-proxy" not in r.stderr  # a normal end: TLS's close_notify, no complaint
            blob = tmp_path / "blob"
            blob.write_bytes(os.urandom(5 << 20))
            argv = ssh_argv(node, sshd, f"cat > {tmp_path}/copy && sha256sum {tmp_path}/copy")
            r = await run(argv, stdin=blob.read_bytes(), env=node.env())
            assert r.returncode == 0 and b"ssh-proxy" not in r.stderr, r.stderr
            import hashlib

            assert r.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()
            # the job ends: the next connection is refused with the reason, no hang
            node.end_job()
            r = await run(ssh_argv(node, sshd, "true"), env=node.env(), timeout=20)
            assert r.returncode != 0
            assert b"ended" in r.stderr, r.stderr
