"""scripts/bench mesh: a live 3-agent mesh on loopback (separate processes, 8 fake H100s each,
default timing), 1,000 one-GPU ``true`` tasks submitted by 16 clients spread over all three
nodes' APIs (any node accepts work); jobs/s from the first submit to the last job's end, how
the jobs spread over the hosts, and each agent's CPU per job.

The last line is JSON: ``mesh_agents``, ``mesh_jobs``, ``mesh_jobs_per_s``,
``mesh_agent_cpu_ms_per_job`` (the three agents together), ``mesh_hosts_used``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import trio

from meshgpu.testing import AgentProcess, cpu_s, list_all

TRUE = "type: task\ncommands: ['true']\nresources:\n  gpu: 1\n"


async def main(args: argparse.Namespace) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-mesh-"))
    agents = [AgentProcess(root, f"n{i}", fake_gpus=args.gpus) for i in range(args.agents)]
    out: dict[str, float] = {"mesh_agents": args.agents, "mesh_jobs": args.jobs}
    try:
        agents[0].start()
        token = agents[0].join_token()
        for a in agents[1:]:
            a.start(token, agents[0].url)
        headers = {"Authorization": f"Bearer {agents[0].token}"}
        clients = [
            httpx.AsyncClient(
                base_url=a.url,
                headers=headers,
                timeout=60,
                limits=httpx.Limits(max_connections=16),
                verify=a.verify,
            )
            for a in agents
        ]
        c0 = clients[0]
        with trio.fail_after(120):  # every host registered with its GPUs
            while True:
                nodes = await list_all(c0, "/api/v1/nodes", "nodes")
                if len([n for n in nodes if n["status"] == "active" and n["gpus"]]) == len(agents):
                    break
                await trio.sleep(0.2)
        print(f"mesh of {len(agents)} agents up ({args.gpus} each)")

        names: list[str] = []
        todo = list(range(args.jobs))
        cpu0 = sum(cpu_s(a.pid) for a in agents)
        first = time.time()

        async def submitter(k: int) -> None:
            c = clients[k % len(clients)]
            while todo:
                todo.pop()
                r = await c.post(
                    "/api/v1/runs", json={"config": TRUE, "request_id": uuid.uuid4().hex}
                )
                r.raise_for_status()
                names.append(r.json()["name"])

        async with trio.open_nursery() as n:
            for k in range(16):
                n.start_soon(submitter, k)
        submitted = time.time()
        with trio.fail_after(600):
            while (await c0.get("/api/v1/status")).json()["active_runs"]:
                await trio.sleep(0.2)
        cpu = sum(cpu_s(a.pid) for a in agents) - cpu0
        runs = await list_all(c0, "/api/v1/runs", "runs", all="true")
        wanted = set(names)
        mine = [r for r in runs if r["name"] in wanted]
        assert len(mine) == len(names), (len(mine), len(names))
        bad = [r for r in mine if r["status"] != "done"]
        assert not bad, bad[:2]
        last = max(r["finished_at"] for r in mine)
        hosts = Counter(r["jobs"][0]["node"] for r in mine)
        out["mesh_jobs_per_s"] = round(len(names) / (last - first), 1)
        out["mesh_agent_cpu_ms_per_job"] = round(cpu * 1000 / len(names), 2)
        out["mesh_hosts_used"] = len(hosts)
        print(
            f"{len(names)} one-GPU true tasks on {len(agents)} agents: submitted in "
            f"{submitted - first:.1f} s, all done after {last - first:.1f} s = "
            f"{out['mesh_jobs_per_s']} jobs/s; per host: {dict(sorted(hosts.items()))}; "
            f"agents' CPU {out['mesh_agent_cpu_ms_per_job']} ms per job"
        )
        for c in clients:
            await c.aclose()
    finally:
        for a in agents:
            a.stop()
            a.kill_jobs()
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--agents", type=int, default=3)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--gpus", default="8xH100:80GB")
    a = p.parse_args()
    res = trio.run(main, a)
    print(json.dumps(res))
    os._exit(0)
