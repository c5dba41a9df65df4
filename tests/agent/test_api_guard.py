"""The API's guard on a real agent (hypercorn over a socket): a chunked body with no
Content-Length is never buffered whole -- refused before a byte is read without a token, cut off
at the limit with one -- and the node's memory stays where it was."""

from __future__ import annotations

import socket
import ssl
import time

import httpx

from meshgpu.testing import rss_mb
from tests.agent.conftest import AgentProc

CHUNK = 64 << 10
SENT_AT_MOST = 64 << 20  # far over every limit; a node that buffered it would show it in RSS


def chunked_post(agent: AgentProc, path: str, token: str | None) -> tuple[str, int]:
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


def test_chunked_bodies_are_refused_without_buffering(agent: AgentProc) -> None:
    assert agent.proc is not None
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
    # The node serves on, and the scheme of the token is case-insensitive here too.
    r = httpx.get(
        f"{agent.url}/api/v1/runs",
        headers={"Authorization": f"bearer {agent.token}"},
        verify=agent.verify,
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"runs": [], "next_cursor": None}
