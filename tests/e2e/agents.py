"""Agents as separate processes inside the test's network namespaces (tests/e2e/netns.py), and
the polling helper the end-to-end tests wait with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

from meshgpu.client import APIError, Client
from meshgpu.client.http import Profile
from meshgpu.testing import kill_job_processes
from tests.e2e.netns import Host


class NsAgent:
    def __init__(
        self,
        host: Host,
        root: Path,
        name: str,
        token: str | None = None,
        fake_gpus: str = "1xH100:80GB",
        env: dict[str, str] | None = None,
        bind: str | None = None,
        extra: list[str] | None = None,
    ) -> None:
        self.host, self.name, self.token = host, name, token
        self.fake_gpus, self.env = fake_gpus, env or {}
        self.bind = bind or host.ip  # e.g. 0.0.0.0: the agent must find host.ip itself
        self.extra = list(extra or [])
        self.data = root / name
        self.data.mkdir()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"https://{host.ip}:7480"
        self._client: Client | None = None

    def start(self, timeout: float = 60) -> NsAgent:
        args = [
            "ip",
            "netns",
            "exec",
            self.host.ns,
            sys.executable,
            "-m",
            "meshgpu",
            "agent",
            "--data-dir",
            str(self.data),
            "--bind",
            self.bind,
            "--api-port",
            "7480",
            "--peer-port",
            "7481",
            "--fake-gpus",
            self.fake_gpus,
            "--name",
            self.name,
            "--tick-ms",
            "50",
            "--dead-grace",
            "2s",
            *self.extra,
        ]
        if self.token:
            args += ["--token", self.token]
        (self.data / "client.toml").unlink(missing_ok=True)
        log = open(self.data.parent / f"{self.name}.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[2])} | self.env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not (self.data / "client.toml").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name} did not start: "
                    + (self.data.parent / f"{self.name}.log").read_text()[-3000:]
                )
            time.sleep(0.05)
        return self

    def client(self) -> Client:
        if self._client is None:
            doc = tomllib.loads((self.data / "client.toml").read_text())
            self._client = Client(Profile(self.url, doc["token"], ca=doc.get("ca")), timeout=10)
        return self._client

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def cleanup(self) -> None:
        if self._client is not None:
            self._client.close()
        self.kill()
        kill_job_processes(self.data)


def wait_for(pred, timeout: float = 30, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (APIError, OSError) as e:
            last = e
        time.sleep(interval)
    raise AssertionError(f"condition not met in time (last error: {last})")
