"""Backend fleets with the ``local`` plugin: how long the leader takes to decide to buy an
instance for a waiting run, how long a ``local`` instance (a network namespace running the user
data) takes from the create call to its agent joined, and from the end of its ``idle_duration``
to terminated. Needs root and iproute2 (as tests/e2e/test_backend_fleet_local.py). The last line
printed is one JSON object.

    scripts/bench provision [--rounds 3] [--idle 5]

Each round submits a 1-GPU task to a mesh without GPUs and a fleet ``nodes: 0..1``:
``decide_ms``: from the job's submission to the instance record (written just before the
create call); ``local_boot_to_joined_s``: from that record to the instance's node registered;
``idle_to_terminated_s``: from the run's end plus ``idle_duration`` to the instance gone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from meshgpu.fleets.pyz import build  # noqa: E402
from meshgpu.testing import AgentProcess  # noqa: E402
from tests.e2e.agents import API_PORT, PEER_PORT, wait_for  # noqa: E402
from tests.e2e.netns import Net  # noqa: E402

TASK = """\
type: task
name: {name}
commands: [echo hello]
resources: {{gpu: 1, cpu: 1.., memory: 0.1GB.., disk: 1GB..}}
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--idle", type=int, default=5, help="the fleet's idle_duration, seconds")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-provision-") as tmp:
        root = Path(tmp)
        pyz = build(root / "dist" / "meshgpu.pyz")
        net = Net.create(0)
        state_dir = root / "local-backend"
        agent = AgentProcess(
            root,
            "m1",
            bind=f"10.213.{net.subnet}.254",
            api_port=API_PORT,
            peer_port=PEER_PORT,
            mdns=False,
            log_level=None,
            client_timeout=10,
            fake_gpus="",
            env={"MESHGPU_AGENT_PYZ": str(pyz)},
            extra=["--tick-ms", "50", "--dead-grace", "2s"],
        )
        decide, boot, gone = [], [], []
        try:
            agent.start(None)
            c = agent.client()
            wait_for(lambda: len(c.nodes()) == 1, timeout=60)
            env = {"HOME": str(root)}
            r = agent.cli(
                "backend", "add", "local", "--bridge", net.bridge,
                "-o", f"state_dir={state_dir}", "-o", "gpus=1xH100:80GB", env=env,
            )  # fmt: skip
            assert r.returncode == 0, r.stderr
            (root / "fleet.yml").write_text(
                f"type: fleet\nname: bench\nnodes: 0..1\nidle_duration: {a.idle}s\n"
            )
            assert agent.cli("apply", "-f", str(root / "fleet.yml"), "-y", env=env).returncode == 0

            def fleet() -> dict:  # type: ignore[type-arg]
                return c._request("GET", "/api/v1/fleets/bench").json()  # noqa: SLF001

            for i in range(a.rounds):
                name = f"t{i}"
                (root / f"{name}.yml").write_text(TASK.format(name=name))
                r = agent.cli("apply", "-f", f"{name}.yml", "-y", "-d", cwd=root, env=env)
                assert r.returncode == 0, r.stderr
                inst = wait_for(lambda: fleet()["instances"], timeout=60)[0]
                submitted = c.run(name)["submitted_at"]
                decide.append((inst["created_at"] - submitted) * 1000)
                want = inst["name"]
                wait_for(
                    lambda: want in {n["name"] for n in c.nodes()},  # noqa: B023
                    timeout=180,
                    interval=0.05,
                )
                boot.append(time.time() - inst["created_at"])
                run = wait_for(lambda: (x := c.run(name))["status"] == "done" and x, 120)  # noqa: B023
                end = max(j.get("finished_at") or 0 for j in run["jobs"]) or time.time()
                wait_for(lambda: not fleet()["instances"], timeout=120, interval=0.05)
                gone.append(time.time() - end - a.idle)
        finally:
            agent.close()
            from plugins.local import LocalBackend

            b = LocalBackend("local", {"state_dir": str(state_dir), "bridge": net.bridge})
            for ref in b.list({}):
                b.terminate(ref)
            net.delete()
    print(
        json.dumps(
            {
                "rounds": a.rounds,
                "decide_ms": round(statistics.median(decide), 1),
                "local_boot_to_joined_s": round(statistics.median(boot), 2),
                "idle_to_terminated_s": round(statistics.median(gone), 2),
                "idle_duration_s": a.idle,
            }
        )
    )


if __name__ == "__main__":
    main()
