"""Real agent processes on loopback, with fake GPUs, in a temporary data dir."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshgpu.client import Client
from meshgpu.client.http import Profile
from meshgpu.testing import cluster_ca_context, free_port, kill_job_processes


@dataclass
class AgentProc:
    data_dir: Path
    fake_gpus: str
    name: str = "test-node"
    proc: subprocess.Popen[bytes] | None = None
    url: str = ""
    token: str = ""
    extra_env: dict[str, str] | None = None
    clients: list[Client] = field(default_factory=list)
    extra_args: list[str] = field(default_factory=list)

    def start(self) -> AgentProc:
        profile = self.data_dir / "client.toml"
        profile.unlink(missing_ok=True)
        env = dict(os.environ) | (self.extra_env or {})
        self.log = open(self.data_dir.parent / f"{self.data_dir.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "meshgpu",
                "agent",
                "--data-dir",
                str(self.data_dir),
                "--api-port",
                "0",
                "--peer-port",
                "0",
                "--fake-gpus",
                self.fake_gpus,
                "--name",
                self.name,
                *self.extra_args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        deadline = time.monotonic() + 30
        while not profile.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                if self.proc.poll() is None:
                    self.proc.kill()
                    self.proc.wait()
                self.log.close()
                raise RuntimeError(
                    f"agent did not start: {(self.data_dir.parent / f'{self.data_dir.name}.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        doc = tomllib.loads(profile.read_text())
        self.url, self.token = doc["url"], doc["token"]
        return self

    @property
    def verify(self):  # type: ignore[no-untyped-def]
        """For ``httpx``'s ``verify=``: this agent's cluster CA."""
        return cluster_ca_context(self.data_dir)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.log.close()

    def client(self) -> Client:
        c = Client(Profile(self.url, self.token, ca=(self.data_dir / "tls" / "ca.crt").read_text()))
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ) | {
            "MESHGPU_URL": self.url,
            "MESHGPU_TOKEN": self.token,
            "MESHGPU_CA": str(self.data_dir / "tls" / "ca.crt"),
        }
        return subprocess.run(
            [sys.executable, "-m", "meshgpu", *args],
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=timeout,
            check=False,
        )

    def kill_jobs(self) -> None:
        """Jobs outlive agents by design; tests must not leave them behind."""
        kill_job_processes(self.data_dir)

    def close(self) -> None:
        """Clients, the agent (woken first if a test stopped it), its jobs."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.close_clients()
        self.stop()
        self.kill_jobs()


def start_mesh(
    root: Path, specs: dict[str, str], extra: list[str] | None = None
) -> list[AgentProc]:
    """Agents ``node-<name>`` with the fake GPUs of ``specs`` (in order): the first founds the
    cluster, the others join it with its token. Each gets a fixed peer port, so a restarted one
    rejoins as itself. On a failure to start, those started are stopped again."""
    agents: list[AgentProc] = []
    try:
        for name, gpus in specs.items():
            join: list[str] = []
            if agents:
                token = json.loads((agents[0].data_dir / "join-token.json").read_text())["token"]
                join = ["--token", token, "--join", agents[0].url]
            ag = AgentProc(
                root / name,
                gpus,
                name=f"node-{name}",
                extra_args=["--peer-port", str(free_port()), *join, *(extra or [])],
            )
            ag.data_dir.mkdir()
            agents.append(ag.start())
    except BaseException:
        stop_all(agents)
        raise
    return agents


def stop_all(agents: list[AgentProc]) -> None:
    for ag in agents:
        ag.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    yield from running(
        AgentProc(tmp_path / "agent", "8xH100:80GB", extra_env={"MESHGPU_CODE_LIMIT_MB": "1"})
    )


def running(a: AgentProc) -> Iterator[AgentProc]:
    """Start ``a`` for a fixture to yield; closed (with its jobs) afterwards."""
    a.data_dir.mkdir()
    a.start()
    try:
        yield a
    finally:
        a.close()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
