"""scripts/bench ssh-tunnel: what the tunnel costs, with OpenSSH's own sshd on both sides.

The same sshd (loopback) reached directly, and through ``meshgpu ssh-proxy`` over the API of a
node that does not run the job (TLS, WebSocket, the relay, TCP to the sshd): ``ssh true`` round
trips (p50 of N) and a SIZE MB scp up and down. The SSH server is the same in both, so the
ratios are the tunnel's alone (``scripts/bench ssh`` puts the agent's own SSH server behind it).
Last line: JSON."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.devenv._tunnel import api_node, openssh_server, ssh_argv  # noqa: E402


def _timed(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    return time.perf_counter() - t


def _direct(sshd: object, *args: str) -> list[str]:
    return [
        "-F", "/dev/null", "-i", str(sshd.key), "-o", "IdentitiesOnly=yes",  # type: ignore[attr-defined]
        "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
        "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", *args,
    ]  # fmt: skip


async def main(runs: int, size_mb: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        blob = tmp / "blob"
        with open(blob, "wb") as f:
            chunk = bytes(range(256)) * 4096
            for _ in range(size_mb):
                f.write(chunk)
        with openssh_server(tmp) as sshd:
            async with api_node(tmp, f"127.0.0.1:{sshd.port}") as node:
                env = node.env()
                direct = ["ssh", *_direct(sshd), "-p", str(sshd.port), "root@127.0.0.1", "true"]
                tunneled = ssh_argv(node, sshd, "true")
                proxy = next(a for a in tunneled if a.startswith("ProxyCommand="))
                scp_opts = [*_direct(sshd), "-o", proxy]

                def measure() -> dict[str, float]:
                    for argv in (direct, tunneled):  # warm caches
                        _timed(argv, env)
                    d_ms = [_timed(direct, env) * 1000 for _ in range(runs)]
                    t_ms = [_timed(tunneled, env) * 1000 for _ in range(runs)]
                    mb = blob.stat().st_size / 1e6
                    up_d = mb / _timed(
                        ["scp", *_direct(sshd), "-P", str(sshd.port), str(blob),
                         f"root@127.0.0.1:{tmp}/up-direct"], env)  # fmt: skip
                    down_d = mb / _timed(
                        ["scp", *_direct(sshd), "-P", str(sshd.port),
                         f"root@127.0.0.1:{blob}", str(tmp / "down-direct")], env)  # fmt: skip
                    up_t = mb / _timed(
                        ["scp", *scp_opts, str(blob), f"root@dev:{tmp}/up-tunnel"], env
                    )
                    down_t = mb / _timed(
                        ["scp", *scp_opts, f"root@dev:{blob}", str(tmp / "down-tunnel")], env
                    )
                    same = (tmp / "down-tunnel").read_bytes() == blob.read_bytes()
                    return {
                        "tunnel_exec_p50_ms": round(statistics.median(t_ms), 1),
                        "sshd_exec_p50_ms": round(statistics.median(d_ms), 1),
                        "tunnel_scp_up_mb_s": round(up_t, 1),
                        "tunnel_scp_down_mb_s": round(down_t, 1),
                        "sshd_scp_up_mb_s": round(up_d, 1),
                        "sshd_scp_down_mb_s": round(down_d, 1),
                        "scp_byte_identical": same,
                    }

                result = await trio.to_thread.run_sync(measure)
                result["exec_ratio"] = round(
                    result["tunnel_exec_p50_ms"] / result["sshd_exec_p50_ms"], 2
                )
                result["scp_ratio"] = round(
                    min(result["tunnel_scp_up_mb_s"], result["tunnel_scp_down_mb_s"])
                    / max(result["sshd_scp_up_mb_s"], result["sshd_scp_down_mb_s"]),
                    2,
                )
                return result


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--size-mb", type=int, default=200)
    a = ap.parse_args()
    print(json.dumps(trio.run(main, a.runs, a.size_mb)))
