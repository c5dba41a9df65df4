"""scripts/bench_code_fetch.py: one member fetching a 32 MiB code archive from another, over
the user API as agents did before (HTTPS, the cluster CA, the admin bearer token: a streamed
``GET /api/v1/code/{sha}``) and over the peer port as they do now (a ``code.get`` call of the
peer protocol on a mutual-TLS ``APP`` stream, 256 KiB DATA frames).

Two real agents on loopback; the fetching side runs in this process with member b's identity
(its certificate for the peer port; the admin token for the API). Each round opens a new
connection, as each fetch of an agent does. Prints a line per path and JSON last.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from consensus.transport import TLSConfig, Transport  # noqa: E402
from meshgpu.peer import PeerClient  # noqa: E402
from meshgpu.security import NodeIdentity  # noqa: E402
from meshgpu.testing import AgentProcess  # noqa: E402


def archive(size: int) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=1) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        info = tarfile.TarInfo("weights.bin")
        info.size = size
        tar.addfile(info, io.BytesIO(os.urandom(size)))
    return buf.getvalue()


async def main(args: argparse.Namespace) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-code-"))
    a = AgentProcess(root, "a", extra=["--code-copies", "0"])
    b = AgentProcess(root, "b")
    out: dict[str, float] = {}
    try:
        a.start()
        b.start(a.join_token(), a.url)
        data = archive(args.mib << 20)
        sha = hashlib.sha256(data).hexdigest()
        out["archive_mib"] = round(len(data) / 2**20, 2)
        headers = {"Authorization": f"Bearer {a.token}"}
        async with httpx.AsyncClient(verify=a.verify, headers=headers, timeout=120) as c:
            r = await c.post(f"{a.url}/api/v1/code", content=data)
            r.raise_for_status()

        async def over_api() -> bytes:
            got = bytearray()
            async with (
                httpx.AsyncClient(verify=a.verify, headers=headers, timeout=60) as c,
                c.stream("GET", f"{a.url}/api/v1/code/{sha}") as resp,
            ):
                resp.raise_for_status()
                async for chunk in resp.aiter_bytes():
                    got += chunk
            return bytes(got)

        b_raft = json.loads((b.data / "node.json").read_text())["raft_id"]
        transport = Transport(
            int(b_raft),
            on_messages=lambda msgs: None,
            tls=TLSConfig.from_files(NodeIdentity(b.data / "tls").files),
        )
        peer = PeerClient(lambda: transport, lambda node: (1, ("127.0.0.1", a.peer_port)))

        async def over_peer() -> bytes:
            return await peer.fetch_code("a", sha, 1 << 30, timeout=60)

        for label, fetch in (("api_https_token", over_api), ("peer_mtls", over_peer)):
            times = []
            for _ in range(args.rounds + 1):
                t = time.perf_counter()
                got = await fetch()
                times.append(time.perf_counter() - t)
                assert got == data, label
            times = times[1:]  # the first warms both ends up
            med = statistics.median(times)
            out[f"{label}_median_ms"] = round(med * 1000, 1)
            out[f"{label}_min_ms"] = round(min(times) * 1000, 1)
            out[f"{label}_mib_s"] = round(len(data) / 2**20 / med, 1)
            print(
                f"{label:16s} median {med * 1000:7.1f} ms  min {min(times) * 1000:7.1f} ms  "
                f"{len(data) / 2**20 / med:7.1f} MiB/s  ({args.rounds} rounds)"
            )
    finally:
        b.stop()
        a.stop()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    print(json.dumps(trio.run(main, p.parse_args())))
