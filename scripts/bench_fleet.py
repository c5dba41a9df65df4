"""SSH fleets: how long from ``apply`` of a fleet to a host joined (``active``), on loopback
network namespaces that run only OpenSSH's sshd (as tests/e2e/test_ssh_fleet.py), and the agent
file's size and cold start (unpacking included) with the system Python. Needs root,
iproute2/nftables and openssh-server. The last line printed is one JSON object.

    scripts/bench fleet [--rounds 5] [--hosts 1]

Each round applies a fleet of ``--hosts`` fresh hosts (their install dirs emptied first: the
file is copied and unpacked every time), times each host from the apply request to ``active``,
then deletes the fleet and waits until it is gone. Target: p50 <= 10 s (dstack polls its SSH
hosts for up to 20 minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshgpu.fleets.pyz import build  # noqa: E402
from tests.e2e import bare_hosts  # noqa: E402
from tests.e2e.agents import ns_agent, wait_for  # noqa: E402
from tests.e2e.netns import Net  # noqa: E402

FLEET = """\
type: fleet
name: bench
placement: cluster
ssh_config:
  user: root
  identity_file: {key}
  hosts:
{hosts}
"""


def start_time(pyz: Path, tmp: Path) -> tuple[float, float]:
    """Cold (unpacks itself) and warm ``python3 meshgpu.pyz version``."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp), "SHIV_ROOT": str(tmp / "shiv")}
    out = []
    for _ in range(2):
        t0 = time.perf_counter()
        subprocess.run(
            ["/usr/bin/python3", str(pyz), "version"], env=env, check=True, capture_output=True
        )
        out.append(time.perf_counter() - t0)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--hosts", type=int, default=1)
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    pyz = build(tmp / "meshgpu.pyz")
    size = pyz.stat().st_size
    cold, warm = start_time(pyz, tmp)
    key = bare_hosts.keypair(tmp / "key")
    net = Net.create(1 + a.hosts)
    agent = None
    bare: list[bare_hosts.BareHost] = []
    samples: list[float] = []
    try:
        agent = ns_agent(
            net.hosts[0],
            tmp,
            "m1",
            env={"MESHGPU_AGENT_PYZ": str(pyz)},
            extra=["--log-level", "info"],
        )
        agent.start()
        bare = [
            bare_hosts.BareHost(h, tmp / f"bare{i}").start([key])
            for i, h in enumerate(net.hosts[1:])
        ]
        c = agent.client()
        for r in range(a.rounds):
            for b in bare:
                shutil.rmtree(b.install_dir, ignore_errors=True)
            text = FLEET.format(key=key, hosts="\n".join(f"    - {b.host.ip}" for b in bare))
            body = {
                "configuration": text,
                "filename": "fleet.yml",
                "identities": {str(key): key.read_text()},
            }
            t0 = time.monotonic()
            c._request("POST", "/api/v1/fleets", json=body)  # noqa: SLF001
            joined: dict[str, float] = {}
            deadline = t0 + 120
            while len(joined) < len(bare) and time.monotonic() < deadline:
                doc = c._request("GET", "/api/v1/fleets/bench").json()  # noqa: SLF001
                for h in doc["hosts"]:
                    if h["state"] == "active" and h["hostname"] not in joined:
                        joined[h["hostname"]] = time.monotonic() - t0
                    if h["state"] == "failed":
                        raise SystemExit(f"host {h['hostname']} failed: {h['reason']}")
                time.sleep(0.05)
            samples += joined.values()
            print(
                f"round {r}: " + ", ".join(f"{h} {s:.2f}s" for h, s in joined.items()),
                file=sys.stderr,
            )
            c._request("DELETE", "/api/v1/fleets/bench")  # noqa: SLF001
            wait_for(lambda: c._request("GET", "/api/v1/fleets").json() == [], timeout=120)  # noqa: SLF001
    finally:
        for b in bare:
            b.stop()
        if agent is not None:
            agent.close()
        net.delete()
        if os.environ.get("KEEP"):
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(
        json.dumps(
            {
                "ssh_fleet_apply_to_joined_s": round(statistics.median(samples), 3),
                "ssh_fleet_apply_to_joined_max_s": round(max(samples), 3),
                "samples": len(samples),
                "pyz_bytes": size,
                "pyz_start_s": round(cold, 3),
                "pyz_warm_start_s": round(warm, 3),
                "target_apply_to_joined_s": 10,
            }
        )
    )


if __name__ == "__main__":
    main()
