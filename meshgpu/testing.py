"""Real agent processes for tests and benchmarks: start one, wait until it serves, stop or kill
it, and clean up what its jobs left running. One place for what every multi-process check needs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from meshgpu.state import GPURecord, RegisterNode


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far: a process's cost, which unlike wall time
    hardly moves when other work shares the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cluster_ca_context(data_dir: Path) -> ssl.SSLContext:
    """What a test's HTTP client verifies an agent's API with: the cluster CA in ``data_dir``
    (host names unchecked, as meshgpu's own clients do)."""
    ctx = ssl.create_default_context(cafile=str(data_dir / "tls" / "ca.crt"))
    ctx.check_hostname = False
    return ctx


async def list_all(client: Any, path: str, key: str, **params: Any) -> list[dict[str, Any]]:
    """Every item of a paginated list (``GET /api/v1/runs``, ``/api/v1/nodes``) through an
    ``httpx.AsyncClient``: the largest pages, following ``next_cursor`` to the end."""
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = params | {"limit": 1000} | ({"cursor": cursor} if cursor else {})
        r = await client.get(path, params=query)
        r.raise_for_status()
        doc = r.json()
        items += doc[key]
        cursor = doc.get("next_cursor")
        if not cursor:
            return items


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AgentProcess:
    """``meshgpu agent`` in its own process with its own data directory under ``root``.

    ``start()`` returns once the agent has written its client profile (it serves its API then);
    ``url``/``token`` come from that profile. A restarted agent keeps its ports and data dir, so
    it rejoins as the same node.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        fake_gpus: str = "1xH100:80GB",
        extra: list[str] | None = None,
        log_level: str = "warning",
    ) -> None:
        self.name = name
        self.data = root / name
        self.data.mkdir(parents=True, exist_ok=True)
        self.log_path = root / f"{name}.log"
        self.api_port, self.peer_port = free_port(), free_port()
        self.url = f"https://127.0.0.1:{self.api_port}"
        self.token = ""
        self.fake_gpus = fake_gpus
        self.extra = list(extra or [])
        self.log_level = log_level
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, token: str | None = None, join: str | None = None) -> list[str]:
        args = [
            sys.executable,
            "-m",
            "meshgpu",
            "agent",
            "--data-dir",
            str(self.data),
            "--api-port",
            str(self.api_port),
            "--peer-port",
            str(self.peer_port),
            "--fake-gpus",
            self.fake_gpus,
            "--name",
            self.name,
            "--no-mdns",
            "--log-level",
            self.log_level,
            *self.extra,
        ]
        if token:
            args += ["--token", token]
        if join:
            args += ["--join", join]
        return args

    def start(self, token: str | None = None, join: str | None = None, timeout: float = 60) -> None:
        (self.data / "client.toml").unlink(missing_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(token, join), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        profile = self.data / "client.toml"
        while not profile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"agent {self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        doc = tomllib.loads(profile.read_text())
        self.url, self.token = doc["url"], doc["token"]

    @property
    def verify(self) -> ssl.SSLContext:
        """For ``httpx``'s ``verify=``: this agent's cluster CA."""
        return cluster_ca_context(self.data)

    def join_token(self) -> str:
        """The join token a founding agent wrote to its data dir."""
        return json.loads((self.data / "join-token.json").read_text())["token"]

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill_jobs(self) -> None:
        """Kill what outlives an agent on purpose (job supervisors, the fork server)."""
        kill_job_processes(self.data)


def kill_job_processes(data_dir: Path) -> None:
    """SIGKILL the fork server and every job supervisor (with its job's process group) recorded
    under ``data_dir/jobs``: they run in their own sessions so they survive the agent."""
    jobs = data_dir / "jobs"
    if not jobs.is_dir():
        return
    pids: list[tuple[int, bool]] = []
    for f in jobs.glob("*/job.pid"):
        try:
            info = json.loads(f.read_text())
            pids.append((int(info.get("pgid", info.get("pid"))), True))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for f in [*jobs.glob("*/shim.pid"), jobs / "launcher.pid"]:
        try:
            pids.append((int(json.loads(f.read_text())["pid"]), False))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    for pid, group in pids:
        try:
            if group:
                os.killpg(pid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def host(
    node_id: str,
    gpus: int = 8,
    name: str = "H100",
    mem_gb: int = 80,
    *,
    labels: dict[str, str] | None = None,
    blocks: int | str | None = None,
    cpus: int = 64,
    memory_gb: int = 512,
    unhealthy: tuple[int, ...] = (),
    numa: int = 2,
    links: list[list[int]] | None = None,
    runtime: str | None = None,
    vendor: str = "nvidia",
    disk_gb: float = 2000,
    at: float = 1.0,
) -> RegisterNode:
    """The registration of a host with ``gpus`` identical GPUs spread over ``numa`` NUMA
    nodes, for the scheduler's tests and simulators."""
    per_numa = max(1, gpus // numa)
    return RegisterNode(
        at=at,
        node_id=node_id,
        name=node_id,
        gpus=[
            GPURecord(
                index=i,
                uuid=f"{node_id}-{i}",
                name=name,
                vendor=vendor,
                memory_mib=mem_gb * 1024,
                compute_capability="9.0" if name == "H100" else "8.0",
                numa_node=i // per_numa,
                healthy=i not in unhealthy,
            )
            for i in range(gpus)
        ],
        gpu_links=links or [],
        cpu_count=cpus,
        memory_mib=memory_gb * 1024,
        disk_gb=disk_gb,
        labels=labels or {},
        blocks=blocks,
        container_runtime=runtime,
    )
