"""The client's end of the SSH tunnel (``meshgpu ssh-proxy``, ssh's ``ProxyCommand``):
``GET /api/v1/runs/{name}/ssh`` on any node, upgraded to a plain byte stream (``Upgrade:
meshgpu-ssh/1``, answered by the node's front door, ``meshgpu/api/front.py``) or, from a node
that does not speak it, to a WebSocket; relayed to stdin/stdout.

ssh starts this once per connection, so it is written for start-up time and throughput with
the standard library only (no httpx, trio or asyncio: ~40 ms to import, a third of the CLI's):
one thread, ``poll`` over the socket, stdin and stdout, TLS through ``ssl.MemoryBIO`` (the
socket never blocks the relay), reads of up to 256 KiB; for a WebSocket, one binary frame per
read with the RFC 6455 client mask applied with ``bytes.translate`` (C speed). The pipes to ssh
are grown to ``PIPE_SIZE`` (ssh hands over more per write, and its own buffers stay small).
Backpressure both ways: a side is read only while what it feeds has less than ``HIGH_WATER``
bytes waiting.

The byte stream is asked for first; an answer without ``Meshgpu-Tunnel`` (a node from before it,
or a proxy in front of the API that does not pass it) makes the WebSocket the next try on the
same node. The stream's end is TLS's close_notify (a connection that just breaks is reported).

Falls back across members as ``Client`` does: a node that cannot be reached, or that answers
502/503/504 (it cannot reach the job's host, or has no leader), hands over to the next one; an
answer about the request itself (no such run, the job ended, a bad token) is final."""

from __future__ import annotations

import base64
import errno
import fcntl
import hashlib
import json
import os
import selectors
import socket
import ssl
import struct
import sys
from collections.abc import Iterable
from functools import cache
from urllib.parse import quote, urlsplit

from meshgpu.client.profile import APIError, Profile

READ_SIZE = 1 << 18
HIGH_WATER = 4 << 20  # (an SFTP copy's whole window in flight: ssh's own buffers stay small)
RAW_UPGRADE = "meshgpu-ssh/1"
RAW, WEBSOCKET = "raw", "websocket"  # the protocols connect() may try, in its order
CONNECT_TIMEOUT_S = 5.0
SETUP_TIMEOUT_S = 20.0  # the upgrade's answer: the node connects to the job's host first
MAX_HEADER = 64 << 10
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_RETRY_STATUS = frozenset({502, 503, 504})
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0, 1, 2, 8, 9, 10
_NORMAL_CLOSE = frozenset({1000, 1001, 1005})


class _NoRawTunnel(Exception):
    """The node answered the byte stream's upgrade as a node without it would: try the
    WebSocket."""


class TunnelBroken(Exception):
    """The tunnel ended other than by a normal close (shown to the user, exit status 1)."""


@cache
def _xor_table(k: int) -> bytes:
    return bytes(b ^ k for b in range(256))


def mask(payload: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3 masking: byte i XOR key[i % 4]."""
    buf = bytearray(payload)
    for i in range(4):
        buf[i::4] = buf[i::4].translate(_xor_table(key[i]))
    return bytes(buf)


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked frame (a client's frames are always masked)."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = os.urandom(4)
    return head + key + mask(payload, key)


class FrameReader:
    """Server frames (unmasked) out of a byte stream, as (opcode, payload), fragments joined."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._parts: list[bytes] = []
        self._op = OP_BINARY

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self.buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        end = len(buf)
        while end - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            head = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = struct.unpack_from("!H", buf, pos + 2)[0]
                head = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = struct.unpack_from("!Q", buf, pos + 2)[0]
                head = 10
            key = None
            if b1 & 0x80:  # servers do not mask; tolerate one that does
                if end - pos < head + 4:
                    break
                key = bytes(buf[pos + head : pos + head + 4])
                head += 4
            if end - pos < head + n:
                break
            payload = bytes(buf[pos + head : pos + head + n])
            if key is not None:
                payload = mask(payload, key)
            pos += head + n
            op = b0 & 0x0F
            if op >= OP_CLOSE:  # control frames are never fragmented
                out.append((op, payload))
            elif not b0 & 0x80:  # a fragment: wait for the final one
                if op != OP_CONT:
                    self._op = op
                self._parts.append(payload)
            elif op == OP_CONT:
                self._parts.append(payload)
                out.append((self._op, b"".join(self._parts)))
                self._parts = []
            else:
                out.append((op, payload))
        if pos:
            del buf[:pos]
        return out


class _Wire:
    """Bytes on the socket vs. plaintext: TLS through memory BIOs, or nothing (plain http)."""

    def __init__(self, ctx: ssl.SSLContext | None) -> None:
        self.tls = None
        if ctx is not None:
            self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = ctx.wrap_bio(self._in, self._out)
        self.eof = False
        self.clean = False  # the peer ended with TLS's close_notify (not a broken connection)

    def handshake(self, sock: socket.socket) -> None:
        """Blocking (the socket has a timeout): before the relay starts."""
        if self.tls is None:
            return
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                out = self._out.read()
                if out:
                    sock.sendall(out)
                data = sock.recv(READ_SIZE)
                if not data:
                    raise ConnectionError("the node closed the connection during TLS") from None
                self._in.write(data)
        out = self._out.read()
        if out:
            sock.sendall(out)

    def wrap(self, plain: bytes) -> bytes:
        if self.tls is None:
            return plain
        self.tls.write(plain)
        return self._out.read()

    def close(self) -> bytes:
        """TLS's close_notify (our end of the stream), to send."""
        if self.tls is None:
            return b""
        try:
            self.tls.unwrap()
        except ssl.SSLError:
            pass  # (it waits for the peer's: we do not)
        return self._out.read()

    def unwrap(self, data: bytes) -> tuple[bytes, bytes]:
        """(plaintext, bytes to send back: TLS's own, e.g. a key update)."""
        if self.tls is None:
            if not data:
                self.eof = True
            return data, b""
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
        chunks = []
        while True:
            try:
                chunk = self.tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.eof = self.clean = True
                break
            except ssl.SSLEOFError:
                self.eof = True
                break
            if not chunk:
                self.eof = True
                break
            chunks.append(chunk)
        if not data:
            self.eof = True
        return b"".join(chunks), self._out.read()


class Tunnel:
    """An upgraded connection to a node: ``relay`` carries it to file descriptors."""

    def __init__(
        self, sock: socket.socket, wire: _Wire, early: bytes, url: str, raw: bool = False
    ) -> None:
        self.sock, self.wire, self.url = sock, wire, url
        self.early = early  # stream (or frame) bytes that came with the upgrade's answer
        self.raw = raw  # a plain byte stream (else WebSocket frames)

    def close(self) -> None:
        self.sock.close()

    def relay(self, fd_in: int = 0, fd_out: int = 1) -> None:
        """Until the node closes the tunnel or ``fd_in`` ends. Raises TunnelBroken when it
        ended abnormally (the close frame's reason, or a connection that broke)."""
        _relay(self, fd_in, fd_out)


def connect(
    profile: Profile,
    name: str,
    job: int | None = None,
    protocols: tuple[str, ...] = (RAW, WEBSOCKET),
) -> Tunnel:
    """A tunnel to the SSH server serving ``name`` (``RUN``, ``RUN-N``, with ``job``: job N of
    ``RUN``) through the first member that can make one, in the first of ``protocols`` it
    speaks. Raises APIError."""
    failures: list[str] = []
    last: APIError | None = None
    for url in dict.fromkeys([profile.url, *profile.members]):
        try:
            return _connect_any(url, profile, name, job, protocols)
        except APIError as e:
            if e.status not in _RETRY_STATUS:
                raise
            last = e
            failures.append(f"{url}: {e}")
        except (OSError, ssl.SSLError, ValueError) as e:
            failures.append(f"{url}: {type(e).__name__}: {e}")
    if last is not None and len(failures) == 1:
        raise last
    raise APIError(
        last.status if last else 0,
        f"cannot open a tunnel through {profile.url}"
        + (" nor any other member it knows" if profile.members else ""),
        "; ".join(failures),
        last.code if last else "",
    )


def _connect_any(
    url: str, profile: Profile, name: str, job: int | None, protocols: tuple[str, ...]
) -> Tunnel:
    for i, protocol in enumerate(protocols):
        try:
            return _connect_one(url, profile, name, job, protocol == RAW)
        except _NoRawTunnel as e:
            if i == len(protocols) - 1:
                raise APIError(0, "no tunnel", f"{url} does not speak {RAW_UPGRADE}") from e
    raise ValueError("no tunnel protocol to try")


def _connect_one(url: str, profile: Profile, name: str, job: int | None, raw: bool) -> Tunnel:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    sock = socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(SETUP_TIMEOUT_S)
        wire = _Wire(_tls_context(profile) if tls else None)
        wire.handshake(sock)
        key = base64.b64encode(os.urandom(16))
        path = f"{parts.path.rstrip('/')}/api/v1/runs/{quote(name, safe='')}/ssh"
        if job is not None:
            path += f"?job={int(job)}"
        host = parts.netloc.rpartition("@")[2]
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}"]
        if raw:
            lines += [f"Upgrade: {RAW_UPGRADE}", "Connection: Upgrade"]
        else:
            lines += [
                "Upgrade: websocket",
                "Connection: Upgrade",
                f"Sec-WebSocket-Key: {key.decode()}",
                "Sec-WebSocket-Version: 13",
            ]
        lines.append("User-Agent: meshgpu-ssh-proxy")
        if profile.token:
            lines.append(f"Authorization: Bearer {profile.token}")
        sock.sendall(wire.wrap(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")))
        status, headers, rest = _read_head(sock, wire)
        if raw:
            if headers.get("meshgpu-tunnel") != "1":
                raise _NoRawTunnel(status)
            if status != 101:
                raise _problem(status, headers, rest, sock, wire)
            if headers.get("upgrade", "").lower() != RAW_UPGRADE:
                raise APIError(0, "not a meshgpu node", f"{url} answered the upgrade wrongly")
            return Tunnel(sock, wire, rest, url, raw=True)
        if status != 101:
            raise _problem(status, headers, rest, sock, wire)
        want = base64.b64encode(hashlib.sha1(key + _GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != want:
            raise APIError(0, "not a meshgpu node", f"{url} answered the upgrade wrongly")
        return Tunnel(sock, wire, rest, url)
    except BaseException:
        sock.close()
        raise


def _tls_context(profile: Profile) -> ssl.SSLContext:
    verify = profile.verify()
    if isinstance(verify, ssl.SSLContext):
        return verify
    return ssl.create_default_context()


def _read_head(sock: socket.socket, wire: _Wire) -> tuple[int, dict[str, str], bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        if len(data) > MAX_HEADER:
            raise APIError(0, "not a meshgpu node", "an endless header")
        raw = sock.recv(READ_SIZE)
        plain, back = wire.unwrap(raw)
        if back:
            sock.sendall(back)
        data += plain
        if wire.eof and b"\r\n\r\n" not in data:
            raise ConnectionError("the node closed the connection before it answered")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        raise APIError(0, "not a meshgpu node", f"answered {lines[0][:80]!r}") from None
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def _problem(
    status: int, headers: dict[str, str], body: bytes, sock: socket.socket, wire: _Wire
) -> APIError:
    """The refusal's problem document as an APIError (its body read to Content-Length)."""
    try:
        length = min(int(headers.get("content-length", "0")), MAX_HEADER)
    except ValueError:
        length = 0
    try:
        while len(body) < length and not wire.eof:
            plain, _ = wire.unwrap(sock.recv(READ_SIZE))
            body += plain
    except OSError:
        pass
    try:
        doc = json.loads(body[:length] or b"{}")
    except ValueError:
        doc = {}
    if not isinstance(doc, dict):
        doc = {}
    title = doc.get("title") or f"HTTP {status}"
    if status == 403 and not doc:
        title = "refused (is this node too old to tunnel SSH?)"
    return APIError(status, str(title), str(doc.get("detail") or ""), str(doc.get("code") or ""))


def _nonblocking(fds: Iterable[int]) -> dict[int, int]:
    saved = {}
    for fd in fds:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        saved[fd] = flags
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return saved


def _relay(t: Tunnel, fd_in: int, fd_out: int) -> None:  # noqa: C901 - one loop, read whole
    sock, wire = t.sock, t.wire
    sock.setblocking(False)
    saved = _nonblocking({fd_in, fd_out})
    _grow_pipes((fd_in, fd_out))
    stream = t.raw  # a plain byte stream (else WebSocket frames)
    sel = selectors.PollSelector()
    to_sock = bytearray()  # ciphertext waiting for the socket
    to_out = bytearray()  # payload waiting for fd_out
    frames = FrameReader()
    closing = False  # we sent our close frame (fd_in ended)
    error: str | None = None
    done = False

    def take(plain: bytes) -> None:
        nonlocal done, error
        if stream:
            to_out.extend(plain)
            return
        for op, payload in frames.feed(plain):
            if op in (OP_BINARY, OP_TEXT):
                to_out.extend(payload)
            elif op == OP_PING:
                to_sock.extend(wire.wrap(client_frame(OP_PONG, payload)))
            elif op == OP_CLOSE:
                code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if code not in _NORMAL_CLOSE:
                    reason = payload[2:].decode("utf-8", "replace")
                    error = f"the tunnel closed ({code}{': ' + reason if reason else ''})"
                done = True

    try:
        if t.early:
            take(t.early)
        in_open = True
        while True:
            if done and not to_out:
                break
            want: dict[int, int] = {}
            if in_open and not closing and len(to_sock) < HIGH_WATER:
                want[fd_in] = want.get(fd_in, 0) | selectors.EVENT_READ
            if not done and len(to_out) < HIGH_WATER:
                want[sock.fileno()] = selectors.EVENT_READ
            if to_sock:
                want[sock.fileno()] = want.get(sock.fileno(), 0) | selectors.EVENT_WRITE
            if to_out:
                want[fd_out] = want.get(fd_out, 0) | selectors.EVENT_WRITE
            if not want:
                break
            for fd, events in want.items():
                _set(sel, fd, events)
            for fd in list(sel.get_map()):
                if fd not in want:
                    sel.unregister(fd)
            for key, ev in sel.select():
                fd = key.fd
                if fd == sock.fileno():
                    if ev & selectors.EVENT_WRITE and to_sock:
                        try:
                            n = sock.send(to_sock)
                        except (BlockingIOError, InterruptedError):
                            n = 0
                        except OSError as e:
                            raise TunnelBroken(f"the tunnel broke: {e}") from None
                        del to_sock[:n]
                    if ev & selectors.EVENT_READ:
                        try:
                            received = sock.recv(READ_SIZE)
                        except (BlockingIOError, InterruptedError):
                            continue
                        except OSError as e:
                            raise TunnelBroken(f"the tunnel broke: {e}") from None
                        plain, back = wire.unwrap(received)
                        to_sock.extend(back)
                        take(plain)
                        if wire.eof and not done:
                            done = True
                            if not closing and not (stream and (wire.clean or wire.tls is None)):
                                error = "the node closed the tunnel"
                    continue
                if ev & selectors.EVENT_WRITE and fd == fd_out and to_out:
                    try:
                        n = os.write(fd_out, to_out)
                    except (BlockingIOError, InterruptedError):
                        n = 0
                    except OSError as e:
                        if e.errno == errno.EPIPE:
                            return  # whoever reads our output (ssh) is gone: so are we
                        raise
                    del to_out[:n]
                if ev & selectors.EVENT_READ and fd == fd_in:
                    try:
                        data = os.read(fd_in, READ_SIZE)
                    except (BlockingIOError, InterruptedError):
                        continue
                    if data:
                        to_sock.extend(wire.wrap(data if stream else client_frame(OP_BINARY, data)))
                    else:
                        in_open = False
                        closing = True
                        if stream:
                            to_sock.extend(wire.close())
                        else:
                            end = client_frame(OP_CLOSE, struct.pack("!H", 1000))
                            to_sock.extend(wire.wrap(end))
            if closing and not to_sock and not to_out:
                if stream and wire.tls is None:
                    try:
                        sock.shutdown(socket.SHUT_WR)  # plain http: the stream's end
                    except OSError:
                        pass
                break  # our side is done and said so: nothing more to wait for
        if error:
            raise TunnelBroken(error)
    finally:
        sel.close()
        for fd, flags in saved.items():
            try:
                fcntl.fcntl(fd, fcntl.F_SETFL, flags)
            except OSError:
                pass


F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_SIZE = 1 << 20


def _grow_pipes(fds: Iterable[int]) -> None:
    """Pipes to ssh of up to PIPE_SIZE (Linux; 64 KiB by default): ssh hands over more per
    write and we read more per wakeup. Best effort (a limit below it, or not a pipe)."""
    import stat

    for fd in fds:
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                fcntl.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass


def _set(sel: selectors.BaseSelector, fd: int, events: int) -> None:
    try:
        key = sel.get_key(fd)
    except KeyError:
        sel.register(fd, events)
        return
    if key.events != events:
        sel.modify(fd, events)


def main(argv: list[str]) -> int:
    """``meshgpu ssh-proxy SELECTOR [--job N] [--url URL]``: the lean entry (no typer)."""
    from meshgpu.client.profile import load_profile

    name, job, url = _parse_args(argv)
    try:
        profile = load_profile(url)
        tunnel = connect(profile, name, job, protocols_from_env())
    except APIError as e:
        sys.stderr.write(f"meshgpu ssh-proxy: error: {e}\n")
        return 1
    try:
        tunnel.relay(0, 1)
    except TunnelBroken as e:
        sys.stderr.write(f"meshgpu ssh-proxy: {e}\n")
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        tunnel.close()
    return 0


def protocols_from_env() -> tuple[str, ...]:
    """``MESHGPU_SSH_TUNNEL=websocket``: the WebSocket only (e.g. through a proxy in front of
    the API that mishandles the byte stream's upgrade); otherwise the byte stream first."""
    if os.environ.get("MESHGPU_SSH_TUNNEL", "").strip().lower() == WEBSOCKET:
        return (WEBSOCKET,)
    return (RAW, WEBSOCKET)


USAGE = "usage: meshgpu ssh-proxy RUN[-N] [--job N] [--url URL]"


def _parse_args(argv: list[str]) -> tuple[str, int | None, str | None]:
    name = url = None
    job = None
    args = list(argv)
    while args:
        a = args.pop(0)
        if a in ("--job", "--url") or a.startswith(("--job=", "--url=")):
            flag, eq, value = a.partition("=")
            if not eq:
                if not args:
                    raise SystemExit(f"{USAGE}\nerror: {flag} needs a value")
                value = args.pop(0)
            if flag == "--job":
                if not value.isdigit():
                    raise SystemExit(f"{USAGE}\nerror: --job must be a number, not {value!r}")
                job = int(value)
            else:
                url = value
        elif a.startswith("-") and a != "-":
            raise SystemExit(f"{USAGE}\nerror: unknown option {a}")
        elif name is None:
            name = a
        else:
            raise SystemExit(f"{USAGE}\nerror: one RUN[-N] only")
    if not name:
        raise SystemExit(USAGE)
    return name, job, url


__all__ = ["FrameReader", "Tunnel", "TunnelBroken", "client_frame", "connect", "main", "mask"]
