"""scripts/bench submit: one agent with 8 fake GPUs, driven through its REST API.

- submit->running latency: 100 sequential trivial one-GPU tasks; from the moment the API call is
  made to the job's own first timestamp (``date +%s.%N`` as its first command); p50/p99;
- throughput: 1,000 one-GPU ``true`` tasks on 8 fake GPUs, submitted by 16 concurrent clients;
  jobs/s from the first submit to the last job's finish (as recorded in the state);
- the agent's RSS after the run.

Jobs run in this host's sandbox (meshgpu/runner/confine.py): as root, each gets its cgroups and
mount namespace; ``--job-user NAME`` also runs them as that user (created if missing, removed
after), with their workspaces in a directory under /tmp; ``--job-user ''`` (the default) keeps
the agent's user.

``--compare`` measures what the sandbox costs instead: two agents side by side, one with
``--no-sandbox`` and one with the full sandbox (``--job-user``, default ``meshgpu-bench``), the
sequential submit->running latency taken in alternating rounds of 10 on each, so that the
machine's noise falls on both alike; the last line is JSON with both p50s and the difference.

The last line is JSON with the keys in INTERFACE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import trio

from meshgpu.testing import AgentProcess, cpu_s, list_all, rss_mb

TRIVIAL = "type: task\ncommands:\n  - date +%s.%N\nresources:\n  gpu: 1\n"
TRUE = "type: task\ncommands: ['true']\nresources:\n  gpu: 1\n"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


async def main(args: argparse.Namespace) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    ws = None
    made_user = False
    if args.job_user:
        import pwd

        try:
            pwd.getpwnam(args.job_user)
        except KeyError:
            made_user = True
        ws = Path(tempfile.mkdtemp(prefix="bench-submit-ws-", dir="/tmp"))
        os.chmod(ws, 0o711)
    agent = AgentProcess(
        root, "agent", fake_gpus="8xH100:80GB", job_user=args.job_user, workspace_dir=ws
    )
    agent.start()
    proc, url, token = agent.proc, agent.url, agent.token
    assert proc is not None
    out: dict[str, float] = {}
    try:
        async with httpx.AsyncClient(
            base_url=url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
            limits=httpx.Limits(max_connections=32),
            verify=agent.verify,
        ) as c:

            async def submit(cfg: str) -> str:
                r = await c.post(
                    "/api/v1/runs", json={"config": cfg, "request_id": uuid.uuid4().hex}
                )
                r.raise_for_status()
                return r.json()["name"]

            async def wait_done(name: str) -> dict:
                while True:
                    r = (await c.get(f"/api/v1/runs/{name}")).json()
                    if r["status"] in ("done", "failed", "terminated"):
                        return r
                    await trio.sleep(0.005)

            for _ in range(5):  # warm up
                await wait_done(await submit(TRIVIAL))
            lat = []
            for _ in range(args.sequential):
                t0 = time.time()
                name = await submit(TRIVIAL)
                run = await wait_done(name)
                assert run["status"] == "done", run
                text = (await c.get(f"/api/v1/runs/{name}/logs")).text
                lat.append(float(text.split()[0]) - t0)
            out["submit_running_p50_ms"] = pct(lat, 50) * 1000
            out["submit_running_p99_ms"] = pct(lat, 99) * 1000
            print(
                f"submit->running ({args.sequential} sequential): p50 {out['submit_running_p50_ms']:.1f} ms, "
                f"p99 {out['submit_running_p99_ms']:.1f} ms"
            )

            names: list[str] = []
            cpu0 = cpu_s(proc.pid)
            first = time.time()
            queue = list(range(args.jobs))

            async def submitter() -> None:
                while queue:
                    queue.pop()
                    names.append(await submit(TRUE))

            async with trio.open_nursery() as n:
                for _ in range(16):
                    n.start_soon(submitter)
            submitted = time.time()
            while (await c.get("/api/v1/status")).json()["active_runs"]:
                await trio.sleep(0.2)
            runs = await list_all(c, "/api/v1/runs", "runs", all="true")
            wanted = set(names)
            mine = [r for r in runs if r["name"] in wanted]
            assert len(mine) == len(names), (len(mine), len(names))
            last = max(r["finished_at"] for r in mine)
            bad = [r for r in mine if r["status"] != "done"]
            assert not bad, bad[:2]
            out["jobs_per_s"] = len(names) / (last - first)
            # Where a GPU slot's time goes: a job's own run (supervisor start to its end being
            # reported), the end-report-to-next-assignment gap (commit, plan, commit), and the
            # assignment-to-start delay (job dir, fork server, supervisor).
            jobs = sorted((j for r in mine for j in r["jobs"]), key=lambda j: j["assigned_at"])
            by_gpu: dict[int, list[dict]] = {}
            for j in jobs:
                by_gpu.setdefault(j["gpus"][0], []).append(j)
            run_ms = [(j["finished_at"] - j["started_at"]) * 1000 for j in jobs]
            start_ms = [(j["started_at"] - j["assigned_at"]) * 1000 for j in jobs]
            gap_ms = [
                (b["assigned_at"] - a["finished_at"]) * 1000
                for js in by_gpu.values()
                for a, b in zip(js, js[1:], strict=False)
                if b["submitted_at"] < a["finished_at"]  # the next one was already waiting
            ]
            if gap_ms:
                print(
                    f"per GPU slot (p50): assigned->started {pct(start_ms, 50):.1f} ms, "
                    f"started->end reported {pct(run_ms, 50):.1f} ms, "
                    f"end reported->next assigned {pct(gap_ms, 50):.1f} ms"
                )
            out["agent_cpu_ms_per_job"] = (cpu_s(proc.pid) - cpu0) * 1000 / len(names)
            print(
                f"throughput: {len(names)} one-GPU true tasks on 8 fake GPUs: submitted in "
                f"{submitted - first:.1f} s, all done after {last - first:.1f} s = {out['jobs_per_s']:.1f} jobs/s; agent CPU {out['agent_cpu_ms_per_job']:.2f} ms per job"
            )
        out["agent_rss_mb"] = rss_mb(proc.pid)
        print(f"agent RSS after the run: {out['agent_rss_mb']:.0f} MB")
        # Each request's token check (the API guard's ``principal``), among 1,000 live user
        # tokens: measured in this process on the same code (scripts/bench_tokens.py).
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from bench_tokens import measure

        tok = measure(100, 10, 5000)
        out["token_check_p50_us"] = tok["user_token_p50_us"]
        print(
            f"token check per request (1,000 live user tokens): p50 "
            f"{tok['user_token_p50_us']} us, founding admin token {tok['admin_token_p50_us']} us"
        )
    finally:
        agent.stop()
        agent.kill_jobs()
        shutil.rmtree(root, ignore_errors=True)
        if ws is not None:
            shutil.rmtree(ws, ignore_errors=True)
        if made_user:
            subprocess.run(["userdel", args.job_user], check=False, capture_output=True)
    return out


async def compare(args: argparse.Namespace) -> dict[str, float]:
    """submit->running p50 without and with the sandbox, in alternating rounds (see above)."""
    import pwd

    root = Path(tempfile.mkdtemp(prefix="bench-submit-"))
    ws = Path(tempfile.mkdtemp(prefix="bench-submit-ws-", dir="/tmp"))
    os.chmod(ws, 0o711)
    user = args.job_user or "meshgpu-bench"
    try:
        pwd.getpwnam(user)
        made_user = False
    except KeyError:
        made_user = True
    agents = {
        "off": AgentProcess(root, "plain", fake_gpus="8xH100:80GB", extra=["--no-sandbox"]),
        "on": AgentProcess(root, "boxed", fake_gpus="8xH100:80GB", job_user=user, workspace_dir=ws),
    }
    lat: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for a in agents.values():
            a.start()
        clients = {
            k: httpx.AsyncClient(
                base_url=a.url,
                headers={"Authorization": f"Bearer {a.token}"},
                timeout=60,
                verify=a.verify,
            )
            for k, a in agents.items()
        }

        async def one(c: httpx.AsyncClient) -> float:
            t0 = time.time()
            r = await c.post(
                "/api/v1/runs", json={"config": TRIVIAL, "request_id": uuid.uuid4().hex}
            )
            r.raise_for_status()
            name = r.json()["name"]
            while True:
                run = (await c.get(f"/api/v1/runs/{name}")).json()
                if run["status"] in ("done", "failed", "terminated"):
                    break
                await trio.sleep(0.005)
            assert run["status"] == "done", run
            text = (await c.get(f"/api/v1/runs/{name}/logs")).text
            return float(text.split()[0]) - t0

        for c in clients.values():
            for _ in range(5):  # warm up
                await one(c)
        rounds = max(1, args.sequential // 10)
        for _ in range(rounds):
            for k, c in clients.items():
                for _ in range(10):
                    lat[k].append(await one(c))
        for c in clients.values():
            await c.aclose()
    finally:
        for a in agents.values():
            a.stop()
            a.kill_jobs()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ws, ignore_errors=True)
        if made_user:
            subprocess.run(["userdel", user], check=False, capture_output=True)
    off, on = pct(lat["off"], 50) * 1000, pct(lat["on"], 50) * 1000
    print(
        f"submit->running p50 over {len(lat['on'])} jobs each, alternating rounds: "
        f"no sandbox {off:.1f} ms, sandbox (user {user}, mount and PID namespaces, cgroups) {on:.1f} ms"
    )
    return {
        "no_sandbox_p50_ms": off,
        "sandbox_p50_ms": on,
        "sandbox_added_p50_ms": on - off,
        "no_sandbox_p99_ms": pct(lat["off"], 99) * 1000,
        "sandbox_p99_ms": pct(lat["on"], 99) * 1000,
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--sequential", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--job-user", default="", help="run the jobs as this OS user (root only)")
    p.add_argument(
        "--compare", action="store_true", help="the sandbox's cost: no sandbox vs sandbox"
    )
    a = p.parse_args()
    res = trio.run(compare if a.compare else main, a)
    print(json.dumps({k: round(v, 2) for k, v in res.items()}))
    os._exit(0)
