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
                raise RuntimeError(
                    f"agent did not start: {(self.data_dir.parent / f'{self.data_dir.name}.log').read_text()[-2000:]}"
                )
            time.sleep(0.02)
        doc = tomllib.loads(profile.read_text())
        self.url, self.token = doc["url"], doc["token"]
        return self

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
        c = Client(Profile(self.url, self.token))
        self.clients.append(c)
        return c

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def cli(
        self, *args: str, cwd: Path | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ) | {"MESHGPU_URL": self.url, "MESHGPU_TOKEN": self.token}
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
        for pidfile in (self.data_dir / "jobs").glob("*/job.pid"):
            try:
                os.killpg(json.loads(pidfile.read_text())["pgid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError, KeyError):
                pass
        for pidfile in [
            *(self.data_dir / "jobs").glob("*/shim.pid"),
            self.data_dir / "jobs" / "launcher.pid",
        ]:
            if not pidfile.exists():
                continue
            try:
                os.kill(json.loads(pidfile.read_text())["pid"], signal.SIGKILL)
            except (ProcessLookupError, PermissionError, ValueError, KeyError):
                pass


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProc]:
    a = AgentProc(tmp_path / "agent", "8xH100:80GB", extra_env={"MESHGPU_CODE_LIMIT_MB": "1"})
    a.data_dir.mkdir()
    a.start()
    try:
        yield a
    finally:
        a.close_clients()
        a.stop()
        a.kill_jobs()


def wait_for(predicate, timeout: float = 30, interval: float = 0.05):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)
