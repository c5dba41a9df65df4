"""Throughput of the codec and of the transport over loopback.

    python -m consensus.transport.bench codec
    python -m consensus.transport.bench loopback [--plaintext] [--processes 2]

``loopback`` models a leader replicating to one follower the way Raft does: node 1 sends
MsgApp messages of one ``--payload``-byte entry, ``--batch`` per ``send_batch`` (one Ready),
never more than ``--window`` unacknowledged (``max_inflight_msgs``); node 2 answers every
delivered batch with one MsgAppResp for its last index. The figure is appends delivered per
second, end to end: encode, TLS, the kernel, TLS, decode, delivery, and the responses back.
With ``--processes 2`` the follower runs in a child process (one event loop per node, as in a
real cluster); otherwise both share this process's single thread, which halves the CPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from consensus.core.types import Entry, Message, MessageType

from .codec import FrameReader, decode_messages, encode_message_frames
from .tcp import Transport
from .tls import ClusterCA, NodeTLSFiles, TLSConfig, write_node_files

LOCALHOST = "127.0.0.1"


def _append(index: int, payload: bytes, frm: int = 1, to: int = 2) -> Message:
    return Message(
        MessageType.APP,
        to=to,
        frm=frm,
        term=7,
        log_term=7,
        index=index - 1,
        commit=max(0, index - 300),
        entries=(Entry(7, index, payload),),
    )


def bench_codec(payload: int = 1024, batch: int = 64, seconds: float = 2.0) -> dict[str, float]:
    """Encode+decode rate of ``batch``-message frames of single-entry appends, one thread."""
    msgs = [_append(1000 + i, b"x" * payload) for i in range(batch)]
    reader = FrameReader()
    done = 0
    encode_s = decode_s = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        data, _ = encode_message_frames(msgs)
        t1 = time.perf_counter()
        for _frame_type, body in reader.feed(data):
            decode_messages(body)
        t2 = time.perf_counter()
        encode_s += t1 - t0
        decode_s += t2 - t1
        done += batch
    return {
        "payload_bytes": payload,
        "batch": batch,
        "encode_msgs_per_s": round(done / encode_s),
        "decode_msgs_per_s": round(done / decode_s),
        "encode_decode_msgs_per_s": round(done / (encode_s + decode_s)),
    }


def _make_pki(directory: Path) -> dict[int, NodeTLSFiles]:
    ca = ClusterCA.create("bench CA")
    return {
        i: write_node_files(directory / str(i), ca.cert_pem(), ca.issue_node_certificate(i))
        for i in (1, 2)
    }


def _tls(files: NodeTLSFiles | None) -> TLSConfig | None:
    return None if files is None else TLSConfig.from_files(files)


async def run_follower(
    files: NodeTLSFiles | None,
    leader_port: int,
    total: int,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Node 2: acknowledge each delivered batch; return once ``total`` appends arrived."""
    received = 0
    done = trio.Event()
    transport: Transport

    async def on_messages(msgs: list[Message]) -> None:
        nonlocal received
        received += len(msgs)
        last = msgs[-1].entries[-1].index if msgs[-1].entries else 0
        transport.send_batch([Message(MessageType.APP_RESP, to=1, frm=2, term=7, index=last)])
        if received >= total:
            done.set()

    transport = Transport(
        2,
        on_messages=on_messages,
        peers={1: (LOCALHOST, leader_port)},
        tls=_tls(files),
        plaintext=files is None,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(transport.run)
        task_status.started(port)
        await done.wait()
        # Let the last acknowledgement leave before closing.
        await trio.sleep(0.2)
        transport.close()


async def run_leader(
    files: NodeTLSFiles | None,
    total: int,
    payload: int,
    batch: int,
    window: int,
    start_follower: Callable[[trio.Nursery, int], Awaitable[int]],
) -> dict[str, float]:
    """Node 1: replicate ``total`` appends with a bounded inflight window; returns timings."""
    acked = 0
    progressed = trio.Event()
    dropped = 0

    async def on_messages(msgs: list[Message]) -> None:
        nonlocal acked, progressed
        acked = max(acked, max(m.index for m in msgs))
        progressed.set()
        progressed = trio.Event()

    def on_unreachable(peer: int) -> None:
        nonlocal dropped
        dropped += 1

    leader = Transport(
        1,
        on_messages=on_messages,
        on_unreachable=on_unreachable,
        tls=_tls(files),
        plaintext=files is None,
    )
    data = b"x" * payload
    async with trio.open_nursery() as nursery:
        leader_port = await nursery.start(leader.run)
        follower_port = await start_follower(nursery, leader_port)
        leader.add_peer(2, (LOCALHOST, follower_port))
        # Warm-up: connect and deliver one message before the clock starts.
        leader.send_batch([_append(1, data)])
        with trio.fail_after(10):
            while acked < 1:
                await progressed.wait()
        sent = 1
        start = time.perf_counter()
        with trio.fail_after(120):
            while acked < total:
                while sent < total and sent - acked < window:
                    n = min(batch, total - sent, window - (sent - acked))
                    leader.send_batch([_append(sent + 1 + k, data) for k in range(n)])
                    sent += n
                await progressed.wait()
        elapsed = time.perf_counter() - start
        leader.close()
    count = total - 1
    return {
        "messages": count,
        "seconds": round(elapsed, 3),
        "msgs_per_s": round(count / elapsed),
        "payload_MB_per_s": round(count * payload / elapsed / 1e6, 1),
        "drops_reported": dropped,
        "writes": leader.stats.writes,
    }


def bench_loopback(
    total: int = 200_000,
    payload: int = 1024,
    batch: int = 64,
    window: int = 256,
    plaintext: bool = False,
    processes: int = 1,
) -> dict[str, object]:
    """Leader-to-follower replication rate over 127.0.0.1 (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        pki = None if plaintext else _make_pki(Path(tmp))

        async def main() -> dict[str, float]:
            async def start_follower(nursery: trio.Nursery, leader_port: int) -> int:
                if processes == 1:
                    return await nursery.start(
                        run_follower, pki[2] if pki else None, leader_port, total
                    )
                return await _spawn_follower(nursery, pki, leader_port, total)

            return await run_leader(
                pki[1] if pki else None, total, payload, batch, window, start_follower
            )

        result: dict[str, object] = dict(trio.run(main))
    result.update(
        mode="plaintext" if plaintext else "mtls",
        processes=processes,
        payload_bytes=payload,
        batch=batch,
        window=window,
    )
    return result


async def _spawn_follower(
    nursery: trio.Nursery,
    pki: dict[int, NodeTLSFiles] | None,
    leader_port: int,
    total: int,
) -> int:
    cmd = [sys.executable, "-m", "consensus.transport.bench", "_follower", str(leader_port)]
    cmd.append(str(total))
    if pki is not None:
        cmd += [str(pki[2].ca_cert), str(pki[2].cert), str(pki[2].key)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    process = await nursery.start(
        functools.partial(trio.run_process, cmd, stdout=subprocess.PIPE, env=env)
    )
    # The child prints its port on its first line.
    line = b""
    with trio.fail_after(20):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some()
            if not chunk:
                raise RuntimeError("the follower process exited before listening")
            line += chunk
    return int(line)


def _follower_main(argv: list[str]) -> None:
    leader_port, total = int(argv[0]), int(argv[1])
    files = NodeTLSFiles(*map(Path, argv[2:5])) if len(argv) >= 5 else None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(run_follower, files, leader_port, total)
            print(port, flush=True)

    trio.run(main)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("codec")
    c.add_argument("--payload", type=int, default=1024)
    c.add_argument("--batch", type=int, default=64)
    lo = sub.add_parser("loopback")
    lo.add_argument("--messages", type=int, default=200_000)
    lo.add_argument("--payload", type=int, default=1024)
    lo.add_argument("--batch", type=int, default=64)
    lo.add_argument("--window", type=int, default=256)
    lo.add_argument("--plaintext", action="store_true")
    lo.add_argument("--processes", type=int, choices=(1, 2), default=1)
    f = sub.add_parser("_follower")
    f.add_argument("rest", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "codec":
        print(json.dumps(bench_codec(args.payload, args.batch)))
    elif args.command == "loopback":
        result = bench_loopback(
            args.messages, args.payload, args.batch, args.window, args.plaintext, args.processes
        )
        print(json.dumps(result))
    else:
        _follower_main(args.rest)


if __name__ == "__main__":
    main()
