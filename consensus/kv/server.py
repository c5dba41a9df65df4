"""``python -m consensus.kv``: one member of a replicated key-value service.

Every member serves clients: writes go through ``RaftNode.propose`` (forwarded to the leader,
held during elections, applied once per request id), reads are linearizable by default
(ReadIndex) or local with ``consistent: false``. A ``fault`` request makes this member's
transport drop all messages to and from the given peers -- the nemesis's partition, done at the
transport boundary so tests need no root or network namespaces.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import msgpack
import trio

from consensus.core import Message, ProposalDropped
from consensus.kv.machine import KVStateMachine
from consensus.kv.protocol import ProtocolError, Reader, send_obj
from consensus.node import Duplicate, NodeOptions, RaftNode, Timeout, bootstrap_storage
from consensus.storage import CorruptStorageError
from consensus.transport import NodeTLSFiles, TLSConfig, Transport, parse_address

log = logging.getLogger("consensus.kv")


class FaultyPort:
    """Wraps the transport: drops traffic to/from ``blocked`` peers (a partition)."""

    def __init__(self, node: RaftNode) -> None:
        self.node = node
        self.blocked: set[int] = set()
        self.transport: Transport | None = None

    def send(self, messages: Sequence[Message]) -> None:
        assert self.transport is not None
        ok = [m for m in messages if m.to not in self.blocked]
        for m in messages:
            if m.to in self.blocked and m.snapshot is not None:
                self.node.report_snapshot(m.to, False)
        if ok:
            self.transport.send_batch(ok)

    def set_peer_address(self, node_id: int, address: str) -> None:
        if self.transport is not None:
            self.transport.set_peer_address(node_id, address)

    async def on_messages(self, msgs: list[Message]) -> None:
        for m in msgs:
            if m.frm not in self.blocked:
                self.node.deliver(m)


class KVServer:
    def __init__(self, node: RaftNode, fsm: KVStateMachine, port: FaultyPort) -> None:
        self.node, self.fsm, self.port = node, fsm, port

    async def serve(self, stream: trio.SocketStream) -> None:
        reader = Reader(stream)
        try:
            while True:
                req = await reader.recv_obj()
                if req is None:
                    return
                await send_obj(stream, await self.handle(req))
        except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def handle(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req.get("op")
        try:
            if op in ("put", "cas", "append", "delete"):
                args = [op, req["key"]]
                if op in ("put", "append"):
                    args.append(req["value"])
                if op == "cas":
                    args += [req["value"], req.get("expected")]
                rid = req.get("rid")
                result = await self.node.propose(
                    msgpack.packb(args),
                    request_id=bytes(rid) if rid else None,
                    timeout=req.get("timeout", 5.0),
                )
                if isinstance(result, Duplicate):
                    if not result.known:  # applied once, but what it returned is forgotten
                        return {"ok": False, "error": "duplicate", "unknown": True}
                    return {"ok": True, "value": result.result, "duplicate": True}
                return {"ok": True, "value": result}
            if op == "get":
                if req.get("consistent", True):
                    await self.node.read_index(timeout=req.get("timeout", 5.0))
                return {"ok": True, "value": self.fsm.get(req["key"]), "applied": self.node.applied}
            if op == "status":
                st = self.node.status()
                digest = hashlib.sha256(self.fsm.snapshot()).hexdigest()
                return {"ok": True, "value": st | {"digest": digest, "keys": len(self.fsm.data)}}
            if op == "fault":
                self.port.blocked = set(req.get("blocked", []))
                return {"ok": True}
            return {"ok": False, "error": f"unknown op {op!r}"}
        except Timeout as e:
            return {"ok": False, "error": "timeout", "detail": str(e), "unknown": True}
        except ProposalDropped as e:
            return {"ok": False, "error": "dropped", "detail": str(e)}
        except (KeyError, TypeError) as e:
            return {"ok": False, "error": f"bad request: {e}"}


def parse_peers(text: str) -> dict[int, str]:
    peers = {}
    for part in text.split(","):
        nid, _, addr = part.partition("=")
        peers[int(nid)] = addr
    return peers


async def run(args: argparse.Namespace) -> None:
    peers = parse_peers(args.peers)
    storage = bootstrap_storage(args.data, sorted(peers))
    fsm = KVStateMachine()
    opts = NodeOptions(
        tick_s=args.tick_ms / 1000,
        election_tick=args.election_tick,
        snapshot_every=args.snapshot_every,
    )
    node = RaftNode(args.id, storage, fsm, peers=peers, options=opts)
    port = FaultyPort(node)
    tls = None
    if args.tls_dir:
        d = Path(args.tls_dir)
        tls = TLSConfig.from_files(
            NodeTLSFiles(ca_cert=d / "ca.crt", cert=d / "node.crt", key=d / "node.key")
        )
    host, peer_port = parse_address(peers[args.id])
    transport = Transport(
        args.id,
        on_messages=port.on_messages,
        on_unreachable=node.report_unreachable,
        on_snapshot_status=node.report_snapshot,
        peers={nid: parse_address(a) for nid, a in peers.items() if nid != args.id},
        tls=tls,
        plaintext=tls is None,
        host=host,
        port=peer_port,
    )
    port.transport = transport
    node.attach(port)
    server = KVServer(node, fsm, port)
    async with trio.open_nursery() as nursery:
        await nursery.start(transport.run)
        await nursery.start(node.run)
        listeners = await nursery.start(
            partial(trio.serve_tcp, server.serve, args.port, host="127.0.0.1")
        )
        print(f"ready id={args.id} client_port={listeners[0].socket.getsockname()[1]}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m consensus.kv", description=__doc__.split("\n")[0])
    p.add_argument("--id", type=int, required=True)
    p.add_argument("--peers", required=True, help="1=127.0.0.1:7001,2=127.0.0.1:7002,...")
    p.add_argument("--data", required=True)
    p.add_argument("--port", type=int, default=0, help="client port")
    p.add_argument("--tls-dir", help="node.crt, node.key, ca.crt (mutual TLS); plaintext without")
    p.add_argument("--tick-ms", type=float, default=100.0)
    p.add_argument("--election-tick", type=int, default=10)
    p.add_argument("--snapshot-every", type=int, default=10_000)
    p.add_argument("--log-level", default="warning")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        trio.run(run, args)
    except CorruptStorageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    return 0
