"""A real PyTorch distributed job across two hosts: ``torchrun`` (gloo, CPU build of torch) on two
agents in network namespaces, launched from a ``nodes: 2`` task whose command line is built from
the job environment alone (``$MESHGPU_NODES_NUM``, ``$MESHGPU_NODE_RANK``,
``$MESHGPU_MASTER_NODE_IP``). Each rank joins the process group, all-reduces, gathers the address
its peer traffic leaves from, and prints what it saw; the test reads both ranks' output through
``meshgpu logs`` and checks the run ends ``done``.

torch comes from the project's ``torch`` extra (scripts/test installs it). Under CI this test must
run; elsewhere it is skipped, with the reason, when torch or namespaces are missing."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshgpu.testing import AgentProcess
from tests.e2e.agents import ns_agent, wait_for
from tests.e2e.netns import Net, available

REASON = available()
if not REASON and importlib.util.find_spec("torch") is None:
    REASON = "torch is not installed: pip install -e '.[torch]' (scripts/test does)"
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI this test must run: {REASON}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(REASON), reason=REASON or "ok")]

# torch's import is slow on a small machine, twice at once (both ranks, plus torchrun itself).
RUN_DEADLINE_S = 240

SCRIPT = textwrap.dedent(
    """\
    import json
    import os
    import socket

    import torch
    import torch.distributed as dist

    dist.init_process_group(backend="gloo")  # env:// from torchrun
    rank, world = dist.get_rank(), dist.get_world_size()
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    # The address this host's traffic to the master leaves from: both ranks gather both.
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.connect((os.environ["MASTER_ADDR"], 9))
    mine = torch.tensor(list(socket.inet_aton(probe.getsockname()[0])))
    gathered = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine)  # tensors, not objects: the object path needs numpy
    addrs = [socket.inet_ntoa(bytes(t.tolist())) for t in gathered]
    keys = ["NODE_RANK", "NODES_NUM", "MASTER_NODE_IP", "NODES_IPS", "GPUS_PER_NODE", "GPUS_NUM"]
    report = {
        "rank": rank,
        "world_size": world,
        "backend": dist.get_backend(),
        "all_reduce": total.item(),
        "addrs": addrs,
        "env": {k: os.environ[f"MESHGPU_{k}"] for k in keys},
        "dstack_env": {k: os.environ[f"DSTACK_{k}"] for k in keys},
        "hostfile": open(os.environ["MESHGPU_MPI_HOSTFILE"]).read(),
    }
    print("DDP " + json.dumps(report), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    """
)


def task_yaml(script: Path) -> str:
    return textwrap.dedent(
        f"""\
        type: task
        name: torch-ddp
        nodes: 2
        env:
          # gloo takes its address from the hostname, which resolves to loopback in these
          # namespaces: name the interface that joins the hosts (eth0 on each).
          - GLOO_SOCKET_IFNAME=eth0
        commands:
          - torchrun --nnodes=$MESHGPU_NODES_NUM --node_rank=$MESHGPU_NODE_RANK --nproc_per_node=1 --master_addr=$MESHGPU_MASTER_NODE_IP --master_port=29500 {script}
        resources:
          gpu: 1
        max_duration: {RUN_DEADLINE_S + 60}
        """
    )


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Net, list[AgentProcess]]]:
    net = Net.create(2)
    agents: list[AgentProcess] = []
    # The jobs run ``torchrun`` from this interpreter's environment, as a user's activated venv.
    env = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    try:
        agents.append(ns_agent(net.hosts[0], tmp_path, "h1", env=env))
        agents[0].start()
        agents.append(ns_agent(net.hosts[1], tmp_path, "h2", env=env))
        agents[1].start(agents[0].join_token())
        yield net, agents
    finally:
        for a in agents:
            a.close()
        net.delete()


def meshgpu_logs(agent: AgentProcess, run: str, job: int) -> str:
    """``meshgpu logs RUN --job N`` against the agent's API, as a user would."""
    out = agent.cli("logs", run, "--job", str(job))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_torchrun_gloo_across_two_hosts(
    two_hosts: tuple[Net, list[AgentProcess]], tmp_path: Path
) -> None:
    net, agents = two_hosts
    script = tmp_path / "ddp_check.py"
    script.write_text(SCRIPT)
    c = agents[0].client()
    wait_for(lambda: len(c.nodes()) == 2, timeout=60)
    wait_for(lambda: c.submit(task_yaml(script), request_id="torch-ddp"), timeout=30)
    run = wait_for(
        lambda: (r := c.run("torch-ddp")) and r["status"] in ("done", "failed", "terminated") and r,
        timeout=RUN_DEADLINE_S,
        interval=0.5,
    )
    logs = {job: meshgpu_logs(agents[1], "torch-ddp", job) for job in (0, 1)}
    assert run["status"] == "done", (run, logs)

    # One job per host (gang): job N runs rank N, on its own namespace's address.
    ip_of = {a.name: h.ip for a, h in zip(agents, net.hosts, strict=True)}
    hosts = [ip_of[j["node"]] for j in sorted(run["jobs"], key=lambda j: j["job_num"])]
    assert sorted(hosts) == sorted(h.ip for h in net.hosts), run
    for job in (0, 1):
        lines = [ln for ln in logs[job].splitlines() if ln.startswith("DDP ")]
        assert len(lines) == 1, logs[job]
        report = json.loads(lines[0].removeprefix("DDP "))
        assert report["rank"] == job and report["world_size"] == 2, report
        assert report["backend"] == "gloo"
        assert report["all_reduce"] == 3.0  # 1 + 2: both ranks took part
        assert report["addrs"] == hosts, report  # the traffic crossed between the namespaces
        expected_env = {
            "NODE_RANK": str(job),
            "NODES_NUM": "2",
            "MASTER_NODE_IP": hosts[0],
            "NODES_IPS": "\n".join(hosts),
            "GPUS_PER_NODE": "1",
            "GPUS_NUM": "2",
        }
        assert report["env"] == report["dstack_env"] == expected_env, report
        assert report["hostfile"] == "".join(f"{ip} slots=1\n" for ip in hosts)
