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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from meshgpu.state import GPURecord, RegisterNode

if TYPE_CHECKING:  # the scheduler's benches import this module for host(): no httpx for them
    from meshgpu.client import Client


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


def this_meshgpu_env() -> dict[str, str]:
    """This process's environment, with ``PYTHONPATH`` led by the source tree this module is
    in: a ``python -m meshgpu`` child runs the meshgpu under test, whatever its working
    directory (or network namespace) and whatever else the interpreter has installed."""
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([src, *filter(None, [env.get("PYTHONPATH")])])
    return env


class AgentProcess:
    """``meshgpu agent`` in its own process, for tests and benchmarks: the one way they start one.

    Its data dir is ``root/name`` (created by the agent itself, as a user's is) and its log
    ``root/name.log``. ``start()`` returns once the agent has written its client profile (it
    serves its API then); ``url``/``token`` come from that profile.

    Options, each defaulting to what a loopback test wants:

    - ``api_port``/``peer_port``: ``None`` picks a free port now (fixed for the object's life);
      ``0`` lets the agent bind any port: the API port it got is kept for later starts, the peer
      port is not (the agent does not say which it took), so such an agent rejoins as a new peer.
    - ``bind``: the address the agent listens on (``--bind``); unset, the agent's default.
    - ``netns``: run it inside that network namespace (``ip netns exec``: root only).
    - ``mdns``: leave mDNS discovery on (off by default: tests join explicitly).
    - ``env``: added to this process's environment; ``extra``: more ``meshgpu agent`` options.
    - ``log_level``: ``--log-level``; ``None`` keeps the agent's default (info).
    - ``client_timeout``: the request timeout of ``client()``'s clients.
    - ``job_user``: ``--job-user`` (default ``''``: jobs run as the test's own user, so tests
      create no OS user; the sandbox's tests name one); ``workspace_dir``: ``--workspace-dir``
      (default ``root/<name>-workspaces``, removed with ``root``).

    ``restart()`` stops it and starts it again with the same ports, data dir and join
    arguments, so it comes back as the same node. ``close()`` cleans up everything a test made:
    its clients, the process (woken first if it was SIGSTOPped) and the jobs it left running.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        *,
        node_name: str | None = None,
        fake_gpus: str = "1xH100:80GB",
        api_port: int | None = None,
        peer_port: int | None = None,
        ssh_port: int | None = None,
        bind: str | None = None,
        netns: str | None = None,
        mdns: bool = False,
        env: Mapping[str, str] | None = None,
        extra: Sequence[str] = (),
        log_level: str | None = "warning",
        client_timeout: float = 30.0,
        job_user: str = "",
        workspace_dir: Path | None = None,
    ) -> None:
        self.job_user = job_user
        self.workspace_dir = workspace_dir or root / f"{name}-workspaces"
        self.name = node_name or name
        self.data = root / name
        self.log_path = root / f"{name}.log"
        self.api_port = free_port() if api_port is None else api_port
        self.peer_port = free_port() if peer_port is None else peer_port
        self.ssh_port = free_port() if ssh_port is None else ssh_port
        self.bind, self.netns, self.mdns = bind, netns, mdns
        self.env = dict(env or {})
        self.fake_gpus = fake_gpus
        self.extra = list(extra)
        self.log_level = log_level
        self.client_timeout = client_timeout
        self.url = ""
        self.token = ""
        self.proc: subprocess.Popen[bytes] | None = None
        self.clients: list[Client] = []
        self._client_cache: dict[float, Client] = {}
        self._joining: tuple[str | None, str | None] = (None, None)

    def argv(self, token: str | None = None, join: str | None = None) -> list[str]:
        """The command line ``start(token, join)`` runs."""
        args = [] if self.netns is None else ["ip", "netns", "exec", self.netns]
        args += [sys.executable, "-m", "meshgpu", "agent", "--data-dir", str(self.data)]
        if self.bind is not None:
            args += ["--bind", self.bind]
        args += ["--api-port", str(self.api_port), "--peer-port", str(self.peer_port)]
        args += ["--ssh-port", str(self.ssh_port)]
        args += ["--fake-gpus", self.fake_gpus, "--name", self.name]
        if not self.mdns:
            args.append("--no-mdns")
        if self.log_level is not None:
            args += ["--log-level", self.log_level]
        args += ["--job-user", self.job_user, "--workspace-dir", str(self.workspace_dir)]
        args += self.extra
        if token:
            args += ["--token", token]
        if join:
            args += ["--join", join]
        return args

    def start(
        self, token: str | None = None, join: str | None = None, timeout: float = 60
    ) -> AgentProcess:
        """Start it, joining with join token ``token`` through ``join`` (an API URL or a peer
        ``host:port``) when given; raises ``RuntimeError`` with the log's tail if it exits or
        has not written its profile within ``timeout`` seconds (and is then killed)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        profile = self.data / "client.toml"
        profile.unlink(missing_ok=True)
        self._joining = (token, join)
        self._client_cache.clear()  # its URL or token may change: new clients from here on
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.argv(token, join),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=this_meshgpu_env() | self.env,
            )
        deadline = time.monotonic() + timeout
        while not profile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"agent {self.name} did not start:\n{self.log_tail()}")
            time.sleep(0.02)
        doc = tomllib.loads(profile.read_text())
        self.url, self.token = doc["url"], doc["token"]
        if self.api_port == 0:  # keep the port it got: a restart serves the same URL
            self.api_port = urlsplit(self.url).port or 0
        return self

    def restart(self, timeout: float = 60) -> AgentProcess:
        """Stop it (if running) and start it again as the same node, same ports."""
        self.stop()
        return self.start(*self._joining, timeout=timeout)

    def work_dir(self, job_id: str) -> Path:
        """A job's workspace on this agent (``ProcessRunner.work_dir``)."""
        return self.workspace_dir / job_id / "work"

    @property
    def ca_file(self) -> Path:
        """The cluster CA certificate in its data dir."""
        return self.data / "tls" / "ca.crt"

    @property
    def verify(self) -> ssl.SSLContext:
        """For ``httpx``'s ``verify=``: this agent's cluster CA."""
        return cluster_ca_context(self.data)

    def join_token(self) -> str:
        """The join token a founding agent wrote to its data dir."""
        return json.loads((self.data / "join-token.json").read_text())["token"]

    def client(self, timeout: float | None = None) -> Client:
        """A ``meshgpu.client.Client`` on its API as its admin: one per timeout until the next
        start, so polling loops may call this freely; all closed by ``close()``."""
        timeout = self.client_timeout if timeout is None else timeout
        c = self._client_cache.get(timeout)
        if c is None:
            from meshgpu.client import Client
            from meshgpu.client.http import Profile

            profile = Profile(self.url, self.token, ca=self.ca_file.read_text())
            c = self._client_cache[timeout] = Client(profile, timeout=timeout)
            self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()
        self._client_cache.clear()

    def cli_env(self) -> dict[str, str]:
        """The environment a ``meshgpu`` CLI talks to this agent with (its URL, token, CA)."""
        return this_meshgpu_env() | {
            "MESHGPU_URL": self.url,
            "MESHGPU_TOKEN": self.token,
            "MESHGPU_CA": str(self.ca_file),
        }

    def cli(
        self,
        *args: str,
        cwd: Path | None = None,
        timeout: float = 60,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """``meshgpu ARGS`` against this agent, output captured as text (``env``: variables
        over ``cli_env()``, e.g. another HOME)."""
        return subprocess.run(
            [sys.executable, "-m", "meshgpu", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=self.cli_env() | dict(env or {}),
            timeout=timeout,
            check=False,
        )

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
        """SIGKILL: no goodbye, its jobs keep running."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
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

    def close(self) -> None:
        """Clients, the agent (woken first if a test stopped it), its jobs."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)
        self.close_clients()
        self.stop()
        self.kill_jobs()


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
    # Their supervisors cannot remove the jobs' cgroups now: what is left there goes too.
    for f in jobs.glob("*/job.json"):
        remove_job_cgroups(f)


def remove_job_cgroups(job_json: Path) -> None:
    from meshgpu.runner import sandbox

    try:
        cg = (json.loads(job_json.read_text()).get("sandbox") or {}).get("cgroup")
    except (OSError, ValueError, AttributeError):
        return
    if cg:
        sandbox.cgroup_remove(cg)


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
