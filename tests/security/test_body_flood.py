"""The probe's chunked-body flood, against the API's guard on a real agent (hypercorn over a
socket): a chunked body with no Content-Length is never buffered whole -- refused before a byte
is read without a token, cut off at the limit with one -- the node's memory stays where it was,
and /healthz answers within a second throughout."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from meshgpu.testing import AgentProcess, rss_mb

CHUNK = 64 << 10
SENT_AT_MOST = 64 << 20  # far over every limit; a node that buffered it would show it in RSS


def chunked_post(agent: AgentProcess, path: str, token: str | None) -> tuple[str, int]:
    """POST a chunked body of up to ``SENT_AT_MOST`` bytes as fast as the node takes it, until
    it answers; returns the status line and how many body bytes went out."""
    url = httpx.URL(agent.url)
    head = f"POST {path} HTTP/1.1\r\nHost: {url.host}\r\nTransfer-Encoding: chunked\r\n"
    head += "Content-Type: application/json\r\n"
    if token:
        head += f"Authorization: bearer {token}\r\n"
    chunk = b"%x\r\n" % CHUNK + b"[" * CHUNK + b"\r\n"
    with socket.create_connection((url.host, url.port), timeout=10) as raw:
        s = agent.verify.wrap_socket(raw) if url.scheme == "https" else raw
        try:
            sent, answer = _push(s, head.encode(), chunk)
        finally:
            s.close()
    return answer.split(b"\r\n", 1)[0].decode(), sent


def _push(s: socket.socket, head: bytes, chunk: bytes) -> tuple[int, bytes]:
    sent, answer = 0, b""
    s.sendall(head + b"\r\n")
    s.settimeout(0.02)
    deadline = time.monotonic() + 20
    while b"\r\n" not in answer and time.monotonic() < deadline:
        try:
            got = s.recv(65536)
            if not got:
                break
            answer += got
            continue
        except TimeoutError:
            pass
        except (ConnectionResetError, ssl.SSLError):
            break
        if sent < SENT_AT_MOST:
            try:
                s.sendall(chunk)
                sent += CHUNK
            except TimeoutError:
                pass  # the node stopped reading: wait for its answer
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
    return sent, answer


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    a = AgentProcess(tmp_path, "agent")
    a.start()
    yield a
    a.stop()
    a.kill_jobs()


def test_chunked_bodies_are_refused_without_buffering(agent: AgentProcess) -> None:
    assert agent.proc is not None
    worst, stop, errors = [0.0], threading.Event(), []

    def watch() -> None:  # the flood runs on this thread's socket; /healthz on another
        with httpx.Client(verify=agent.verify, timeout=5) as c:
            while not stop.is_set():
                t = time.monotonic()
                try:
                    if c.get(f"{agent.url}/healthz").status_code != 200:
                        errors.append("healthz did not answer 200")
                except httpx.HTTPError as e:
                    errors.append(repr(e))
                worst[0] = max(worst[0], time.monotonic() - t)
                time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    before = rss_mb(agent.proc.pid)
    status, sent = chunked_post(agent, "/api/v1/runs", None)
    assert status == "HTTP/1.1 401 ", (status, sent)
    assert sent < 16 << 20  # what socket buffers hold, not the body
    status, sent = chunked_post(agent, "/api/v1/runs", agent.token)
    assert status == "HTTP/1.1 413 ", (status, sent)
    assert sent < 16 << 20
    status, sent = chunked_post(agent, "/api/v1/join", None)  # public: held to the limit too
    assert status == "HTTP/1.1 413 ", (status, sent)
    assert rss_mb(agent.proc.pid) - before < 40
    stop.set()
    watcher.join(10)
    assert not errors and 0 < worst[0] < 1.0, (errors, worst)
    # The node serves on, and the scheme of the token is case-insensitive here too.
    r = httpx.get(
        f"{agent.url}/api/v1/runs",
        headers={"Authorization": f"bearer {agent.token}"},
        verify=agent.verify,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"runs": [], "next_cursor": None}
