"""The agent's executor: makes this host's processes follow the replicated state.

Whenever the applied state changes it compares what the state says this node must run with what
it is running: new assignments are launched (and ``JobStarted`` proposed), jobs the state marks
TERMINATING are stopped (gracefully, or at once for an abort), and a job whose assignment moved on
(a newer epoch, or finished by the leader) is stopped here -- fencing, so a job never runs twice.
Every ended job is reported with ``JobFinished``; after an agent restart, jobs found on disk are
re-adopted and reported the same way. A job whose uploaded code this host lacks starts only
once the archive has been fetched from a member that holds it (meshgpu/runner/code.py). Reports
go through one queue, in order: whatever piles up while the previous report commits goes out as
one ``JobReports`` entry.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from meshgpu.client.archive import ArchiveLimits, ArchiveRefused, extract_archive
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.config.interpolation import group_ips, interpolate, secret_names
from meshgpu.config.spec import NO_SPEC, RunSpec
from meshgpu.runner.code import CodeStore, fetch_sources
from meshgpu.runner.confine import Confinement, JobSandbox, host_volumes
from meshgpu.runner.container import container_argv
from meshgpu.runner.drain import drain
from meshgpu.runner.jobenv import ClusterInfo, JobEnvInputs, JobIdentity, job_environment
from meshgpu.runner.process import JobLaunch, JobResult, ProcessRunner
from meshgpu.runner.prologue import Layout, layout, needs_prologue, prologue
from meshgpu.runner.registry_auth import remove_auth, write_auth
from meshgpu.runner.toolchain import Toolchain, discover
from meshgpu.state import (
    CodeRef,
    JobFinished,
    JobRecord,
    JobReports,
    JobStarted,
    JobStatus,
    JobTerminationReason,
    StateMachine,
    encode,
)

log = logging.getLogger(__name__)
MAX_BATCH = 500  # reports per Raft entry
MAX_MESSAGE = 2000  # characters of a report's message
SESSION_SECRETS_TIMEOUT_S = 15.0  # an SSH session waits this long for a voter to give them
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0  # a report that did not commit is retried, backing off


def _read_started(job_dir: Path) -> float | None:
    """When the job's process started, from its supervisor's ``job.pid`` (None: not yet)."""
    try:
        return float(json.loads((job_dir / "job.pid").read_text())["started_at"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


Propose = Callable[[bytes], Awaitable[Any]]


def _shell(spec: RunSpec) -> str:
    shell = spec.shell
    if shell in ("sh", "bash"):
        return shutil.which(shell) or f"/bin/{shell}"
    if shell:
        return shell
    return shutil.which("bash") or "/bin/sh"


def _needs_toolchain(spec: RunSpec) -> bool:
    """Does a job of ``spec`` need this host's interpreters or git (a process job's)?"""
    return not spec.image and bool(spec.python or (spec.repo is not None and spec.repo.url))


def startup_waits_for(state: StateMachine, job: JobRecord) -> str | None:
    """dstack's ``startup_order`` for the jobs of one replica: ``master-first`` starts the
    workers once the master (its first job) runs, ``workers-first`` the master once every worker
    runs; ``any`` (the default) starts each job as soon as it is placed. Returns what the job
    waits for (None: launch it now). Checked on every state change, so a waiting job stays
    provisioning until the jobs it follows are RUNNING in the replicated state."""
    run = state.runs.get(job.run_name)
    order = run.spec.startup_order if run is not None else None
    if order not in ("master-first", "workers-first"):
        return None
    replica = [j for j in (state.jobs[i] for i in run.job_ids) if j.replica_num == job.replica_num]
    master = min(j.job_num for j in replica)
    if order == "master-first":
        follows = [j for j in replica if j.job_num == master and j.job_id != job.job_id]
    elif job.job_num == master:
        follows = [j for j in replica if j.job_id != job.job_id]
    else:
        follows = []
    # Started is enough: a short job may start and end in one committed entry (its host
    # batches reports), so this host may never see it RUNNING.
    late = [j for j in follows if j.started_at is None and j.status is not JobStatus.RUNNING]
    if not late:
        return None
    return f"{order}: waiting for job(s) {', '.join(str(j.job_num) for j in late)} to run"


class Executor:
    def __init__(
        self,
        node_id: str,
        state: StateMachine,
        runner: ProcessRunner,
        propose: Propose,
        code_dir: Path,
        gpu_vendor: Callable[[], str | None],
        on_busy: Callable[[set[int]], None] = lambda _: None,
        container_runtime: str | None = None,
        code: CodeStore | None = None,
        clock: Clock = SYSTEM_CLOCK,
        confine: Confinement | None = None,
    ) -> None:
        self.clock = clock
        # The process jobs' sandbox here (meshgpu/runner/confine.py); None: none at all.
        self.confine = confine
        self._sandboxes: dict[str, JobSandbox] = {}  # job -> its sandbox, until it starts
        self.container_runtime = container_runtime
        # What process jobs' environments are made with (interpreters, uv, git): set by the
        # registration (which registers it); found on first need otherwise.
        self.toolchain: Toolchain | None = None
        self.code = code  # fetches archives this host lacks (None: only local ones)
        self.node_id = node_id
        self.state = state
        self.runner = runner
        self.propose = propose
        self.code_dir = code_dir
        self.gpu_vendor = gpu_vendor
        self.on_busy = on_busy
        self.local: dict[str, int] = {}  # job_id -> epoch launched here
        self.stopping: set[str] = set()
        self._stop_args: dict[str, tuple[float, str]] = {}  # job -> (grace, reason) of its stop
        self._fetching: dict[str, trio.CancelScope] = {}  # job_id -> its code fetch
        self._draining: dict[str, trio.CancelScope] = {}  # service replicas draining to stop
        self.drain_min_s: float | None = None  # None: meshgpu/runner/drain.py's (tests set it)
        self._changed = trio.Event()
        # Why a job this host stopped on its own (auto-stop) ended, for its finish report.
        self._stop_messages: dict[str, str] = {}
        # Reports waiting to be proposed, in order (see _reporter).
        self._reports: list[JobStarted | JobFinished] = []
        self._reports_ready = trio.Event()
        # A job's project secrets, from a voter (job id -> name -> value; set by the agent once
        # its peer client and use cases exist). None: a job that names secrets fails to start.
        self.secrets: Callable[[str], Awaitable[dict[str, str]]] | None = None
        # The variables of jobs running here whose values are project secrets (job -> name ->
        # value): in memory only, for SSH sessions into the job (``session_secrets``); a
        # restarted agent asks a voter again when a session needs them.
        self._secret_env: dict[str, dict[str, str]] = {}

    def notify(self, _index: int = 0) -> None:
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for job_id in self.runner.adopt():
                d = self.runner.job_dir(job_id)
                record = json.loads((d / "job.json").read_text())
                self.local[job_id] = int(record.get("epoch", 0))
                # Its start may not have been committed before the restart (reports queue in
                # memory): report it again; a JobStarted for a running job changes nothing.
                started = _read_started(d)
                if started is not None:
                    self._enqueue(
                        JobStarted(
                            at=self.clock.wall(),
                            job_id=job_id,
                            epoch=self.local[job_id],
                            started_at=started,
                        )
                    )
                nursery.start_soon(self._watch, job_id, self.local[job_id])
                log.info("job=%s re-adopted epoch=%s", job_id, self.local[job_id])
            nursery.start_soon(self._reporter)
            task_status.started()
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                self._reconcile()

    def _reconcile(self) -> None:
        mine = {j.job_id: j for j in self.state.jobs_on_node(self.node_id)}
        for job in mine.values():
            if job.job_id not in self.local and job.status is JobStatus.PROVISIONING:
                if startup_waits_for(self.state, job) is None:
                    self.local[job.job_id] = job.epoch
                    self._nursery.start_soon(self._launch, job.job_id, job.epoch)
            elif (
                job.job_id not in self.local
                and not (self.runner.job_dir(job.job_id) / "job.json").exists()
            ):
                # The state says it runs here, but this host has no trace of it (its files
                # were deleted, or the host was rebuilt): report it lost rather than wait forever.
                self.local[job.job_id] = job.epoch
                lost = JobResult(
                    job.job_id,
                    None,
                    "executor_error",
                    message="the job's files are gone from this host",
                )
                if job.status is JobStatus.TERMINATING:
                    # Stopped while it waited for its turn (startup_order): it never started.
                    lost = JobResult(
                        job.job_id,
                        None,
                        "terminated_by_server",
                        message="stopped before it started",
                    )
                self._nursery.start_soon(self._report, job.job_id, job.epoch, lost)
            elif job.status is JobStatus.TERMINATING and job.job_id in self.local:
                self._stop(job.job_id, abort=job.stop_requested == "abort", spec=self._spec(job))
        for job_id, epoch in list(self.local.items()):
            job = self.state.jobs.get(job_id)
            moved = job is None or job.node_id != self.node_id or job.epoch != epoch
            if moved or job.status.is_finished():
                self._stop(job_id, abort=True, spec=NO_SPEC, reason="terminated_by_server")
        self.on_busy({i for j in mine.values() for i in j.gpu_indices})

    def known_jobs(self) -> set[str]:
        """Jobs whose files must stay: those the state knows and those running here."""
        return {*self.state.jobs, *self.local}

    def collect(self, known: set[str]) -> int:
        """Delete the files (logs included) of jobs that ended, were reported, and are not
        ``known`` (``known_jobs()``, taken on the event loop: this runs in a worker thread,
        away from the state). Returns how many job directories went."""
        gone = 0
        for d in self.runner.jobs_dir.iterdir():
            if d.name in known or not (d / "reported").exists():
                continue
            if self.runner.result(d.name) is None:
                continue  # still running (it should not be): never delete a live job's files
            self.runner.delete_files(d.name)
            gone += 1
        return gone

    def fence(self) -> None:
        """Stop every local job now: this host is cut off, and the leader will run them
        elsewhere. Their end is reported when the host reconnects."""
        for job_id in list(self.local):
            self._stop(job_id, abort=True, spec=NO_SPEC, reason="instance_unreachable")

    def autostop(self, job_id: str, reason: str, message: str = "") -> bool:
        """End a job running here for a reason of this host's own (``inactivity_duration``,
        ``utilization_policy``: meshgpu/devenv/monitor.py): stopped gracefully like a user's
        stop, and reported with ``reason`` through the normal finish report. False when the job
        is not running here or is already stopping."""
        job = self.state.jobs.get(job_id)
        if job is None or job_id not in self.local or job_id in self.stopping:
            return False
        self._stop_messages[job_id] = message
        self._stop(job_id, abort=False, spec=self._spec(job), reason=reason)
        return True

    def _spec(self, job: JobRecord) -> RunSpec:
        run = self.state.runs.get(job.run_name)
        return run.spec.for_group(job.group) if run else NO_SPEC

    def _stop(
        self, job_id: str, abort: bool, spec: RunSpec, reason: str = "terminated_by_user"
    ) -> None:
        if job_id in self.stopping:
            # Already stopping: only an abort during a graceful stop changes anything (it
            # must not wait out the grace period; the supervisor takes the shorter deadline).
            grace, why = self._stop_args.get(job_id, (0.0, reason))
            if abort and grace > 0:
                self._stop_args[job_id] = (0.0, why)
                if job_id in self._draining:
                    self._draining.pop(job_id).cancel()
                self.runner.stop(job_id, grace_s=0.0, reason=why)
            return
        self.stopping.add(job_id)
        if job_id in self._fetching:  # its code is still on the way: it never starts
            self._fetching[job_id].cancel()
        self._stop_args[job_id] = (
            0.0 if abort else spec.stop_grace_s,
            "aborted_by_user" if abort else reason,
        )
        grace, why = self._stop_args[job_id]
        if spec.service is not None and grace > 0:
            # A service replica stopped gracefully: drained first (see runner/drain.py).
            scope = self._draining[job_id] = trio.CancelScope()
            self._nursery.start_soon(self._drain_then_stop, job_id, spec.service.port, scope)
            return
        self.runner.stop(job_id, grace_s=grace, reason=why)

    async def _drain_then_stop(self, job_id: str, port: int, scope: trio.CancelScope) -> None:
        """Wait (up to the stop grace) until no connection to the replica's port is
        established, then stop it as any graceful stop. An abort meanwhile cancels the wait
        (and stops the job at once itself)."""
        grace, _ = self._stop_args.get(job_id, (0.0, ""))
        with scope:
            extra = {} if self.drain_min_s is None else {"min_s": self.drain_min_s}
            drained = await drain(port, grace, clock=self.clock, **extra)
            log.info("job=%s %s; stopping it", job_id, "drained" if drained else "not drained")
        if self._draining.get(job_id) is not scope:
            return  # aborted meanwhile
        del self._draining[job_id]
        grace, why = self._stop_args.get(job_id, (grace, "terminated_by_user"))
        self.runner.stop(job_id, grace_s=grace, reason=why)

    async def _launch(self, job_id: str, epoch: int) -> None:
        job = self.state.jobs[job_id]
        run = self.state.runs[job.run_name]
        try:
            if run.code is not None:
                try:
                    with trio.CancelScope() as self._fetching[job_id]:  # _stop cancels it
                        await self._ensure_code(run.code)
                finally:
                    del self._fetching[job_id]
            if job_id in self.stopping:  # stopped, or moved away, before it could start
                await self._report(job_id, epoch, JobResult(job_id, None, "terminated_by_server"))
                return
            spec = run.spec.for_group(
                job.group
            )  # a replica group's image/python/... over the run's
            if self.toolchain is None and _needs_toolchain(spec):
                self.toolchain = await trio.to_thread.run_sync(discover)
            values = await self._secrets(job_id, run.config)
            launch = self._prepare(job, run.run_args, spec, epoch, values)
            place = self._layout(job_id, spec)
            if run.code is not None:
                await self._unpack(run.code.sha256, Path(place.host_code_root))
            await self.runner.start(launch)
            if launch.secret_env:
                self._secret_env[job_id] = dict(launch.secret_env)
            if job_id in self.stopping and job_id not in self._draining:
                # Stopped while its supervisor was being started: ask again now that its pid is
                # known (the first request may have come before the supervisor could see it).
                grace, why = self._stop_args[job_id]
                self.runner.stop(job_id, grace_s=grace, reason=why)
        except Exception as e:  # any failure to start is the job's, not the agent's
            self._sandboxes.pop(job_id, None)
            self._secret_env.pop(job_id, None)
            log.exception("job=%s failed to start", job_id)
            remove_auth(self.runner.job_dir(job_id))
            await self._report(
                job_id, epoch, JobResult(job_id, None, "executor_error", message=str(e))
            )
            return
        now = self.clock.wall()
        # Where its commands run (and SSH sessions open): the job's working directory (the
        # container's, for an image job).
        where = place.working_dir
        box = self._sandboxes.pop(job_id, None)
        self._enqueue(
            JobStarted(
                at=now,
                job_id=job_id,
                epoch=epoch,
                started_at=now,
                working_dir=where,
                user=box.user if box is not None else None,
                limits=box.limits if box is not None else None,
            )
        )
        await self._watch(job_id, epoch)

    async def _ensure_code(self, code: CodeRef) -> None:
        """The run's archive on this host before ``_prepare`` unpacks it: only the node that
        accepted the upload and the holders it copied it to start with it; any other host
        fetches it (verified, once per host) or fails the job saying from whom it could not."""
        if self.code is None or self.code.has(code.sha256):
            return
        await self.code.fetch(
            code.sha256, code.size, lambda: fetch_sources(code, self.state.nodes, self.node_id)
        )

    async def _unpack(self, sha: str, work: Path) -> None:
        """The run's archive into the job's working directory, in a worker thread (an archive
        may be large: the event loop must keep serving), within the archive limits: one that
        expands too far or holds an unsafe entry (a copy from a member that never checked it)
        fails the job, saying why."""
        limits = self.code.archive_limits if self.code is not None else ArchiveLimits()
        archive = self.code_dir / f"{sha}.tar.gz"
        try:
            await trio.to_thread.run_sync(extract_archive, archive, work, limits)
        except ArchiveRefused as e:
            raise RuntimeError(f"the code archive {sha[:12]} was not unpacked: {e}") from None

    def _prepare(
        self,
        job: JobRecord,
        run_args: list[str],
        spec: RunSpec,
        epoch: int,
        secrets: dict[str, str] | None = None,
    ) -> JobLaunch:
        spec = spec.for_group(job.group)  # a replica group's own environment (idempotent)
        jobs = [self.state.jobs[j] for j in self.state.runs[job.run_name].job_ids]
        # The job's cluster is its replica: every node of a task, one replica of a service.
        nodes = [n for n in jobs if n.replica_num == job.replica_num]
        cluster = ClusterInfo(
            node_rank=[n.job_id for n in nodes].index(job.job_id),
            nodes_ips=tuple(self._ip(n) for n in nodes),
            gpus_per_node=tuple(len(n.gpu_indices) for n in nodes),
        )
        work = self.runner.prepare(job.job_id, hostfile=cluster.hostfile())
        hostfile = str(self.runner.hostfile_path(job.job_id))
        user_env = dict(spec.env)
        secret_keys = _secret_keys(user_env) if secrets else []
        if secrets:
            # ``${{ secrets.X }}`` (dstack: env and registry_auth), resolved here at start: the
            # values never enter the replicated state, only this job's environment.
            user_env = {k: interpolate(v, {"secrets": secrets}) for k, v in user_env.items()}
        # The agent's own basics, and an SSH fleet's ``env`` (dstack: passed to every job on the
        # fleet): the fleet controller starts the agent with it and names its keys in
        # MESHGPU_FLEET_ENV. The run's own env wins over both.
        fleet_keys = [k for k in os.environ.get("MESHGPU_FLEET_ENV", "").split(",") if k]
        base = {
            k: os.environ[k]
            for k in ("PATH", "HOME", "LANG", "USER", "TMPDIR", *fleet_keys)
            if k in os.environ
        }
        place = self._layout(job.job_id, spec)
        interpreter = self._interpreter(spec) if not spec.image else None
        inputs = JobEnvInputs(
            identity=JobIdentity(job.run_name, job.run_id, job.job_id),
            cluster=cluster,
            gpu_indices=tuple(job.gpu_indices),
            gpu_vendor=self.gpu_vendor() if job.gpu_indices else None,
            working_dir=place.working_dir,
            hostfile_path=hostfile,
            replica_num=job.replica_num if spec.service is not None else None,
            service_port=spec.service.port if spec.service is not None else None,
            repo_dir=place.repo_dir,
            venv_dir=place.venv_dir,
        )
        env = job_environment(inputs, user_env, base)
        box = None if spec.image else self._sandbox(job, spec, work)
        if box is not None:
            env.update({k: v for k, v in box.env.items() if k not in user_env})
        # Never on disk: the supervisor gets these in memory (JobLaunch.secret_env).
        secret_env = {k: env.pop(k) for k in secret_keys}
        commands = list(spec.job_spec(job.group, job.job_num).commands)
        namespaces = {
            "run": {"args": shlex.join(run_args)},
            "groups": self._groups_namespace(spec, jobs),
        }
        commands = [interpolate(c, namespaces, final=True) for c in commands]
        if needs_prologue(spec, place):
            if spec.image and not commands:
                raise RuntimeError(
                    "repos and files of an image job are placed by a prologue before its "
                    "commands: give the job commands (its image's entrypoint alone cannot run it)"
                )
            tc = self.toolchain or Toolchain()
            run = self.state.runs.get(job.run_name)
            setup = prologue(
                spec,
                place,
                interpreter=interpreter,
                uv=None if spec.image else tc.uv,
                git=None if spec.image else tc.git,  # a container uses its image's git
                has_code=run is not None and run.code is not None,
            )
            commands = [setup, *commands]
        argv = None
        if spec.image:
            if not self.container_runtime:
                raise RuntimeError("this host has no container runtime for image jobs")
            # ``registry_auth``: a per-job auth file in the job's record directory (0600),
            # removed when the job ends (``_watch``).
            auth_file = (
                str(
                    write_auth(
                        self.runner.job_dir(job.job_id),
                        spec.image,
                        _resolve_auth(spec.registry_auth, secrets or {}),
                    )
                )
                if spec.registry_auth is not None
                else None
            )
            argv = tuple(
                container_argv(
                    self.container_runtime,
                    job_id=job.job_id,
                    image=spec.image,
                    commands=commands,
                    env=env,
                    work_dir=str(work),
                    gpu_indices=job.gpu_indices,
                    gpu_vendor=inputs.gpu_vendor,
                    shell=spec.shell if spec.shell not in ("sh", "bash") else f"/bin/{spec.shell}",
                    working_dir=spec.working_dir,
                    shm_size_gb=spec.shm_size_gb,
                    privileged=spec.privileged,
                    user=spec.user,
                    entrypoint=spec.entrypoint,
                    auth_file=auth_file,
                    volumes=host_volumes(spec.volumes),
                    pass_env=sorted(secret_env),  # from the runtime's environment, not argv
                )
            )
        launch = JobLaunch(
            job_id=job.job_id,
            commands=tuple(commands),
            env=env,
            shell=_shell(spec),
            max_duration_s=spec.max_duration_s,
            stop_grace_s=spec.stop_grace_s,
            epoch=epoch,  # in the record, so a restarted agent knows which assignment it runs
            argv=argv,
            sandbox=box.spec if box is not None else None,
            mask=tuple(sorted(set((secrets or {}).values()))),
            secret_env=secret_env,
        )
        if box is not None:
            self._sandboxes[job.job_id] = box
        return launch

    async def session_secrets(self, job_id: str) -> dict[str, str]:
        """The secret variables of ``job_id`` (running here) for an SSH session into it: kept
        since its start, or -- this agent restarted and re-adopted the job, whose supervisor
        alone holds them -- fetched again from a voter (which checks the job is this host's)."""
        known = self._secret_env.get(job_id)
        if known is not None:
            return dict(known)
        job = self.state.jobs.get(job_id)
        run = self.state.runs.get(job.run_name) if job is not None else None
        if job is None or run is None or job_id not in self.local:
            raise RuntimeError("the job does not run on this host")
        spec = run.spec.for_group(job.group)
        templates = dict(spec.env)
        keys = _secret_keys(templates)
        if not keys:
            return {}
        with trio.fail_after(SESSION_SECRETS_TIMEOUT_S):
            values = await self._secrets(job_id, run.config)
        env = {k: interpolate(templates[k], {"secrets": values}) for k in keys}
        if job_id in self.local:
            self._secret_env[job_id] = env
        return dict(env)

    async def _secrets(self, job_id: str, config: dict[str, Any]) -> dict[str, str]:
        """The project secrets the job's configuration names, from a voter over the peer
        port (``{}`` when it names none)."""
        if not secret_names(config):
            return {}
        if self.secrets is None:
            raise RuntimeError("this host cannot fetch secrets (no peer client)")
        return await self.secrets(job_id)

    def _sandbox(self, job: JobRecord, spec: RunSpec, work: Path) -> JobSandbox | None:
        """A process job's sandbox here (None: this host makes none)."""
        if self.confine is None:
            if spec.user or spec.volumes:
                raise RuntimeError("user and volumes need the job sandbox, off here")
            return None
        node = self.state.nodes.get(self.node_id)
        total = node.block_count() if node is not None and job.blocks else None
        share = None
        if node is not None and total:
            share = (
                job.blocks * node.memory_mib / 1024 / total,
                job.blocks * node.cpu_count / total,
            )
        return self.confine.for_job(
            job.job_id,
            resources=job.resources,
            share=share,
            user=spec.user,
            volumes=spec.volumes,
            shm_size_gb=spec.shm_size_gb,
            gpu_indices=tuple(job.gpu_indices),
            workspace=work,
        )

    def _layout(self, job_id: str, spec: RunSpec) -> Layout:
        """Where the job's working directory, repo, code and venv are (runner/prologue.py);
        ``~`` in their paths is the agent's ``HOME``, which the job inherits."""
        job = self.state.jobs.get(job_id)
        run = self.state.runs.get(job.run_name) if job is not None else None
        has_code = run is not None and run.code is not None
        if spec.image:  # the container sees the workspace at /workflow (container.py)
            return layout(spec, self.runner.work_dir(job_id), None, has_code, mount="/workflow")
        return layout(spec, self.runner.work_dir(job_id), os.environ.get("HOME"), has_code)

    def _interpreter(self, spec: RunSpec) -> str | None:
        """The interpreter of ``python: X.Y`` on this host; the job fails saying so when the
        host has none (the scheduler placed it on a host that registered it: the host changed
        since). Also checks that a git URL repo can be cloned."""
        if self.toolchain is None and _needs_toolchain(spec):
            self.toolchain = discover()  # blocking; _launch finds it in a thread first
        tc = self.toolchain or Toolchain()
        if spec.repo is not None and spec.repo.url and not tc.git and not spec.image:
            raise RuntimeError(
                f"repos: {spec.repo.url} needs git, which this host does not have (install git)"
            )
        if not spec.python:
            return None
        interp = tc.pythons.get(spec.python)
        if interp is None:
            raise RuntimeError(
                f"this host has no Python {spec.python} its job user can run "
                f"(it has {', '.join(tc.versions()) or 'none'})"
            )
        return interp

    def _ip(self, job: JobRecord) -> str:
        """The address of the host a job is placed on ('' while it is not placed)."""
        node = self.state.nodes.get(job.node_id) if job.node_id else None
        return node.internal_ip if node is not None else ""

    def _groups_namespace(self, spec: RunSpec, jobs: list[JobRecord]) -> Callable[[str], str]:
        """``${{ groups[i].nodes[j].IP_ADDRESS }}`` (tasks) or ``groups[i].replicas[j]``
        (services): the address of the j-th job of the i-th group, in job order. A run without
        groups is one group (dstack's ``node_groups`` / ``replica_groups``)."""
        ips = [[self._ip(j) for j in jobs if j.group == name] for name in spec.group_names]
        return group_ips(ips, spec.group_kind)

    async def _watch(self, job_id: str, epoch: int) -> None:
        result = await self.runner.wait(job_id)
        self._secret_env.pop(job_id, None)
        remove_auth(self.runner.job_dir(job_id))  # the image was pulled long since
        await self._report(job_id, epoch, result)

    async def _report(self, job_id: str, epoch: int, result: JobResult) -> None:
        try:
            reason = JobTerminationReason(result.reason)
        except ValueError:
            reason = JobTerminationReason.EXECUTOR_ERROR
        self._enqueue(
            JobFinished(
                at=self.clock.wall(),
                job_id=job_id,
                epoch=epoch,
                reason=reason,
                exit_code=result.exit_code,
                message=(result.message or self._stop_messages.pop(job_id, ""))[:MAX_MESSAGE],
            )
        )

    def _enqueue(self, report: JobStarted | JobFinished) -> None:
        self._reports.append(report)
        self._reports_ready.set()

    async def _reporter(self) -> None:
        """Propose queued reports, oldest first, all that are waiting in one entry. A job's
        files are marked reported (and it is forgotten here) only once its end is committed."""
        while True:
            await self._reports_ready.wait()
            self._reports_ready = trio.Event()
            # Bounded entries: a backlog (no leader for a while) goes out in several.
            batch, self._reports = self._reports[:MAX_BATCH], self._reports[MAX_BATCH:]
            if self._reports:
                self._reports_ready.set()
            if not batch:
                continue
            cmd = batch[0] if len(batch) == 1 else JobReports(at=self.clock.wall(), reports=batch)
            await self._propose_retrying(encode(cmd))
            for r in batch:
                if isinstance(r, JobFinished):
                    try:
                        self.runner.mark_reported(r.job_id)
                    except OSError as e:  # a full disk: a restart reports the end again
                        log.warning("job=%s not marked reported: %s", r.job_id, e)
                    if self.local.get(r.job_id) == r.epoch:
                        self.local.pop(r.job_id, None)
                        self._secret_env.pop(r.job_id, None)
                    self.stopping.discard(r.job_id)
                    self._stop_args.pop(r.job_id, None)
                    self._stop_messages.pop(r.job_id, None)
            self.notify()

    async def _propose_retrying(self, data: bytes) -> None:
        """Reports must not be lost: retry (same request id, so once) until they commit."""
        rid = os.urandom(16)
        delay = RETRY_FIRST_S
        while True:
            try:
                await self.propose(data, request_id=rid)  # type: ignore[call-arg]
                return
            except Exception as e:  # no leader for a while: keep the report, try again
                log.warning("report not committed yet (%s); retrying", e)
                await self.clock.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)


def _secret_keys(env: dict[str, str]) -> list[str]:
    """The variables of a job's ``env`` whose values reference ``${{ secrets.X }}``."""
    return [k for k, v in env.items() if secret_names({"env": {k: v}})]


def _resolve_auth(auth: tuple[str, str], secrets: dict[str, str]) -> tuple[str, str]:
    """``registry_auth`` with its ``${{ secrets.X }}`` filled (``$${{`` stays escaped: the
    auth file's own final pass unescapes it)."""
    if not secrets:
        return auth
    user, password = auth
    return interpolate(user, {"secrets": secrets}), interpolate(password, {"secrets": secrets})
