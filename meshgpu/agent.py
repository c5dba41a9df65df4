"""One meshgpu agent: wires the consensus node, the state machine, the scheduler loop, the
executor, GPU inventory and the REST API into one trio nursery (every service a child task).

This milestone runs a single-member mesh; peers join in the mesh milestone, which only adds
members to the same node (the voter set, the transport and discovery) -- nothing here assumes one
host except the founding configuration.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import random
import secrets
import socket
import time
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hypercorn.config
import hypercorn.trio
import trio

from consensus.core import Role
from consensus.node import Duplicate, NodeOptions, RaftNode, bootstrap_storage
from meshgpu.api import create_app
from meshgpu.api.problems import Problem
from meshgpu.client.archive import DEFAULT_CODE_LIMIT
from meshgpu.client.http import write_profile
from meshgpu.config import ConfigError, parse_config
from meshgpu.config.interpolation import references
from meshgpu.config.render import to_json
from meshgpu.config.resources import GPUSpec
from meshgpu.config.runs import BaseRunConfiguration
from meshgpu.gpu import FakeProvider, collect_inventory, detect
from meshgpu.runner import ProcessRunner
from meshgpu.runner.container import detect_runtime
from meshgpu.runner.executor import Executor
from meshgpu.scheduler import plan
from meshgpu.state import (
    AssignJobs,
    CodeRef,
    GPURecord,
    RegisterNode,
    Result,
    RunRecord,
    SetPendingReasons,
    StateMachine,
    StopRun,
    SubmitRun,
    encode,
)

if TYPE_CHECKING:
    from meshgpu.api.app import SubmitBody

log = logging.getLogger(__name__)

_ADJECTIVES = [
    "brave",
    "calm",
    "eager",
    "fancy",
    "gentle",
    "happy",
    "jolly",
    "keen",
    "lively",
    "merry",
    "nimble",
    "proud",
    "quick",
    "sharp",
    "swift",
    "witty",
]
_NOUNS = [
    "otter",
    "falcon",
    "lynx",
    "panda",
    "heron",
    "koala",
    "raven",
    "tiger",
    "whale",
    "zebra",
    "bison",
    "crane",
    "gecko",
    "llama",
    "moose",
]


@dataclass
class AgentSettings:
    data_dir: Path = field(default_factory=lambda: Path.home() / ".meshgpu")
    name: str = field(default_factory=socket.gethostname)
    bind: str = "127.0.0.1"
    api_port: int = 7480
    peer_port: int = 7481
    advertise: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    fake_gpus: str | None = None
    code_limit: int = DEFAULT_CODE_LIMIT
    tick_s: float = 0.1
    write_client_profile: bool = True


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        d = settings.data_dir
        d.mkdir(parents=True, exist_ok=True)
        self.identity = self._identity(d / "node.json")
        self.node_id: str = self.identity["node_id"]
        self.node_name = settings.name
        self.admin_token = self._token(d / "admin.token")
        self.code_dir = d / "code"
        self.code_dir.mkdir(exist_ok=True)
        self.state = StateMachine()
        storage = bootstrap_storage(str(d / "raft"), [self.identity["raft_id"]])
        self.node = RaftNode(
            self.identity["raft_id"],
            storage,
            self.state,
            options=NodeOptions(tick_s=settings.tick_s),
        )
        self.runner = ProcessRunner(d / "jobs")
        self.gpus = detect(
            settings.fake_gpus, seed=self.node_id, state_file=d / "fake-gpu-state.json"
        )
        self.executor = Executor(
            self.node_id,
            self.state,
            self.runner,
            self._propose,
            self.code_dir,
            self._gpu_vendor,
            on_busy=self.gpus.set_busy if isinstance(self.gpus, FakeProvider) else lambda _: None,
        )
        self.container_runtime: str | None = None
        self._demand = trio.Event()
        self.node.on_apply.append(self._on_apply)
        self.api_url = ""

    # -- identity and secrets on disk ---------------------------------------------------------
    @staticmethod
    def _identity(path: Path) -> dict[str, Any]:
        if path.exists():
            return json.loads(path.read_text())
        ident = {"node_id": uuid.uuid4().hex[:12], "raft_id": 1, "cluster_id": uuid.uuid4().hex}
        path.write_text(json.dumps(ident))
        return ident

    @staticmethod
    def _token(path: Path) -> str:
        if path.exists():
            return path.read_text().strip()
        token = secrets.token_urlsafe(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        return token

    def _gpu_vendor(self) -> str | None:
        inv = self.gpus.inventory()
        return inv[0].vendor if inv else None

    # -- wiring ---------------------------------------------------------------------------------
    def _on_apply(self, index: int) -> None:
        self.executor.notify(index)
        self._demand.set()

    async def _propose(
        self, data: bytes, request_id: bytes | None = None, timeout: float = 30.0
    ) -> Any:
        result = await self.node.propose(data, request_id=request_id, timeout=timeout)
        if isinstance(result, Duplicate):
            return result.result
        return result

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            await nursery.start(self.node.run)
            if self.node.status()["voters"] == [self.node.id]:
                self.node.campaign()  # alone: no one to wait for
            cfg = hypercorn.config.Config()
            cfg.bind = [f"{s.bind}:{s.api_port}"]
            cfg.accesslog = None
            cfg.errorlog = logging.getLogger("hypercorn.error")
            cfg.graceful_timeout = 1.0
            binds = await nursery.start(partial(hypercorn.trio.serve, create_app(self), cfg))
            self.api_url = binds[0]
            await self._wait_leader()
            await self._register()
            await nursery.start(self.executor.run)
            nursery.start_soon(self._scheduler_loop)
            if s.write_client_profile:
                write_profile(s.data_dir / "client.toml", self.api_url, self.admin_token)
            log.info("agent node=%s api=%s ready", self.node_name, self.api_url)
            task_status.started(self.api_url)

    async def aclose(self) -> None:
        """After ``run`` is cancelled: release what outlives the nursery. Jobs keep running."""
        with trio.CancelScope(shield=True):
            await self.runner.aclose()
        self.node.storage.close()

    async def _wait_leader(self) -> None:
        with trio.fail_after(30):
            while self.node.leader == 0:
                await trio.sleep(0.01)

    async def _register(self) -> None:
        inv = await trio.to_thread.run_sync(collect_inventory, self.gpus, self.settings.data_dir)
        self.container_runtime = await trio.to_thread.run_sync(detect_runtime)
        self.executor.container_runtime = self.container_runtime
        cmd = RegisterNode(
            at=time.time(),
            node_id=self.node_id,
            name=self.node_name,
            api_url=self.api_url,
            internal_ip=self.settings.advertise or self.settings.bind,
            labels=self.settings.labels,
            gpus=[
                GPURecord(
                    index=g.index,
                    uuid=g.uuid,
                    name=g.name,
                    vendor=g.vendor,
                    memory_mib=g.memory_mib,
                    compute_capability=g.compute_capability,
                    numa_node=g.numa_node,
                )
                for g in inv.gpus
            ],
            gpu_links=[list(r) for r in inv.links],
            cpu_count=inv.host.cpu_count,
            cpu_arch=inv.host.cpu_arch,
            memory_mib=inv.host.memory_mib,
            disk_gb=inv.host.disk_total_gb,  # like an offer's disk size (dstack matches totals)
            container_runtime=self.container_runtime.rsplit("/", 1)[-1]
            if self.container_runtime
            else None,
        )
        await self._propose(encode(cmd))

    async def _scheduler_loop(self) -> None:
        """On the leader: place waiting jobs whenever demand or capacity changes."""
        seen = -1
        while True:
            await self._demand.wait()
            self._demand = trio.Event()
            if self.node.role is not Role.LEADER or self.state.demand_version == seen:
                continue
            seen = self.state.demand_version
            p = plan(self.state)
            now = time.time()
            if p.assignments:
                await self._propose(encode(AssignJobs(at=now, assignments=p.assignments)))
            changed = {
                j: why for j, why in p.pending.items() if self.state.jobs[j].why_pending != why
            }
            if changed:
                await self._propose(encode(SetPendingReasons(at=now, reasons=changed)))

    # -- API operations -------------------------------------------------------------------------
    def cluster_status(self) -> dict[str, Any]:
        st = self.node.status()
        return {
            "cluster_id": self.identity["cluster_id"],
            "node_id": self.node_id,
            "node": self.node_name,
            "leader": st["leader"],
            "role": st["role"],
            "term": st["term"],
            "commit_index": st["commit"],
            "applied_index": st["applied"],
            "voters": st["voters"],
            "learners": st["learners"],
            "active_runs": sum(1 for r in self.state.runs.values() if not r.status.is_finished()),
            "waiting_jobs": len(self.state.waiting_jobs()),
        }

    async def local_telemetry(self) -> list[dict[str, Any]]:
        """A fresh sample of this host's GPUs (a blocking driver call: in a worker thread)."""
        samples = await trio.to_thread.run_sync(self.gpus.telemetry)
        return [dataclasses.asdict(t) for t in samples]

    def roles(self) -> dict[str, str]:
        return {
            self.node_id: self.node.role.name.lower() if self.node.role is Role.LEADER else "voter"
        }

    async def store_code(self, data: bytes, claimed_sha: str | None) -> str:
        sha = hashlib.sha256(data).hexdigest()
        if claimed_sha and claimed_sha != sha:
            raise Problem(
                400,
                "code archive corrupted in transit",
                f"sha256 {sha} != {claimed_sha}",
                "bad_digest",
            )
        path = self.code_dir / f"{sha}.tar.gz"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            await trio.to_thread.run_sync(tmp.write_bytes, data)
            tmp.replace(path)
        return sha

    async def submit(self, body: SubmitBody) -> RunRecord:
        try:
            config = parse_config(body.config, body.filename)
        except ConfigError as e:
            raise Problem(
                400,
                "invalid configuration",
                str(e),
                "invalid_config",
                issues=[i.to_dict() for i in e.issues],
            ) from None
        if not isinstance(config, BaseRunConfiguration):
            raise Problem(
                400,
                f"{config.type} configurations are not runs",
                f"submit a task, service or dev-environment; {config.type}s are applied with their own command",
                "not_a_run",
            )
        updates: dict[str, Any] = {}
        if body.env:
            updates["env"] = {**config.env, **body.env}
        if body.gpu:
            try:
                gpu = GPUSpec.model_validate(body.gpu)
            except ValueError as e:
                raise Problem(400, "invalid --gpu", str(e), "invalid_gpu") from None
            updates["resources"] = config.resources.model_copy(update={"gpu": gpu})
        if updates:
            config = config.model_copy(update=updates)
        missing = [k for k, v in config.env.items() if v is None]
        if missing:
            raise Problem(
                400,
                "environment variables without values",
                f"{', '.join(missing)}: export them where you run meshgpu apply (the CLI passes them on) "
                "or write KEY=VALUE",
                "missing_env",
            )
        for text in config.env.values():
            if text and any(r.namespace == "secrets" for r in references(text)):
                raise Problem(
                    400,
                    "secrets are not available yet",
                    "this mesh has no secret store yet; pass the value through the environment",
                    "no_secrets",
                )
        chosen = body.name or config.name
        code = None
        if body.code_sha256:
            path = self.code_dir / f"{body.code_sha256}.tar.gz"
            if not path.exists():
                raise Problem(
                    400,
                    "unknown code archive",
                    "upload it first (POST /api/v1/code)",
                    "unknown_code",
                )
            code = CodeRef(sha256=body.code_sha256, size=path.stat().st_size, node_id=self.node_id)
        config_json = to_json(config)
        for attempt in range(5):
            name = chosen or self._generate_name()
            # A generated name can collide with a concurrent submission: pick another. The
            # request id stays tied to the client's id, so a client retry still matches.
            rid = body.request_id if attempt == 0 else f"{body.request_id}/{attempt}"
            cmd = SubmitRun(
                at=time.time(),
                request_id=rid,
                run_id=uuid.uuid4().hex,
                run_name=name,
                config=config_json,
                run_args=body.run_args,
                code=code,
            )
            result: Result = await self._propose(encode(cmd), request_id=rid.encode())
            if result.ok or chosen or result.code != "name_in_use":
                break
        if not result.ok:
            raise Problem(
                409 if result.code == "name_in_use" else 400,
                "run not submitted",
                result.error,
                result.code,
            )
        return self.state.runs[result.value]

    def _generate_name(self) -> str:
        rng = random.Random()
        for _ in range(100):
            name = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}-{rng.randint(1, 9999)}"
            if name not in self.state.runs:
                return name
        return f"run-{uuid.uuid4().hex[:8]}"

    async def stop(self, name: str, abort: bool) -> RunRecord:
        if name not in self.state.runs:
            raise Problem(
                404, "run not found", f"no run named {name!r}; see meshgpu ps -a", "not_found"
            )
        await self._propose(encode(StopRun(at=time.time(), run_name=name, abort=abort)))
        return self.state.runs[name]

    async def stream_logs(self, job_id: str, follow: bool) -> Any:
        path = self.runner.log_path(job_id)
        pos = 0
        while True:
            job = self.state.jobs.get(job_id)
            finished = job is None or job.status.is_finished()
            if path.exists():
                with open(path, "rb") as f:
                    f.seek(pos)
                    chunk = f.read(1 << 20)
                if chunk:
                    pos += len(chunk)
                    yield chunk
                    continue
            if not follow or (
                finished
                and (job is None or job.node_id != self.node_id or self._ended_on_disk(job_id))
            ):
                return
            await trio.sleep(0.1)

    def _ended_on_disk(self, job_id: str) -> bool:
        return self.runner.result(job_id) is not None
