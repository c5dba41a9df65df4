"""Run a KV cluster as real processes on loopback: for the nemesis tests and the benchmark.

Each member is ``python -m consensus.kv`` with its own data directory and (by default) mutual TLS
from a CA made for the run. Members can be SIGKILLed and restarted, SIGSTOPped and continued, or
partitioned at the transport (``fault``).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import trio

from consensus.kv.client import KVClient
from consensus.transport import ClusterCA, write_node_files


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class Member:
    def __init__(self, cluster: LocalCluster, nid: int) -> None:
        self.cluster, self.id = cluster, nid
        self.proc: subprocess.Popen[bytes] | None = None
        self.client_port = 0
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self) -> None:
        c = self.cluster
        args = [
            sys.executable,
            "-m",
            "consensus.kv",
            "--id",
            str(self.id),
            "--peers",
            c.peers_arg,
            "--data",
            str(c.root / f"n{self.id}"),
            "--port",
            str(c.client_ports[self.id]),
            "--tick-ms",
            str(c.tick_ms),
            "--election-tick",
            str(c.election_tick),
            "--snapshot-every",
            str(c.snapshot_every),
        ]
        if c.tls:
            args += ["--tls-dir", str(c.root / f"tls{self.id}")]
        log = open(c.root / f"n{self.id}.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log, env=os.environ | {"PYTHONUNBUFFERED": "1"}
        )
        log.close()
        assert self.proc.stdout is not None
        line = await trio.to_thread.run_sync(self.proc.stdout.readline)
        self.proc.stdout.close()
        if not line.startswith(b"ready"):
            raise RuntimeError(
                f"member {self.id} did not start: {(c.root / f'n{self.id}.log').read_text()[-2000:]}"
            )
        self.client_port = int(line.split(b"client_port=")[1])
        self.stopped = False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.stopped:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self.stopped = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.stopped = False

    def client(self) -> KVClient:
        return KVClient("127.0.0.1", self.client_port)


class LocalCluster:
    def __init__(
        self,
        root: Path,
        size: int = 3,
        *,
        tls: bool = True,
        tick_ms: float = 100.0,
        election_tick: int = 10,
        snapshot_every: int = 10_000,
    ) -> None:
        self.root = root
        self.ids = list(range(1, size + 1))
        self.tls = tls
        self.tick_ms, self.election_tick, self.snapshot_every = (
            tick_ms,
            election_tick,
            snapshot_every,
        )
        ports = _free_ports(2 * size)
        self.peer_ports = dict(zip(self.ids, ports[:size], strict=True))
        self.client_ports = dict(zip(self.ids, ports[size:], strict=True))
        self.peers_arg = ",".join(f"{i}=127.0.0.1:{p}" for i, p in self.peer_ports.items())
        self.members = {i: Member(self, i) for i in self.ids}
        root.mkdir(parents=True, exist_ok=True)
        if tls:
            ca = ClusterCA.create()
            for i in self.ids:
                write_node_files(root / f"tls{i}", ca.cert_pem(), ca.issue_node_certificate(i))

    async def start(self) -> None:
        async with trio.open_nursery() as n:
            for m in self.members.values():
                n.start_soon(m.start)

    def shutdown(self) -> None:
        for m in self.members.values():
            m.kill()

    async def status(self, nid: int) -> dict | None:
        c = self.members[nid].client()
        try:
            with trio.move_on_after(2):
                return await c.status()
        except (OSError, trio.BrokenResourceError):
            return None
        finally:
            await c.aclose()
        return None

    async def leader(self, timeout: float = 20.0) -> int:
        with trio.fail_after(timeout):
            while True:
                for nid, m in self.members.items():
                    if m.alive and not m.stopped:
                        st = await self.status(nid)
                        if st and st["role"] == "leader":
                            return nid
                await trio.sleep(0.05)

    async def partition(self, side: list[int]) -> None:
        """Cut ``side`` from the rest (both directions)."""
        other = [i for i in self.ids if i not in side]
        for nid in self.ids:
            m = self.members[nid]
            if not m.alive or m.stopped:
                continue
            c = m.client()
            try:
                await c.fault(other if nid in side else side)
            finally:
                await c.aclose()

    async def heal(self) -> None:
        for nid in self.ids:
            m = self.members[nid]
            if m.alive and not m.stopped:
                c = m.client()
                try:
                    await c.fault([])
                finally:
                    await c.aclose()
