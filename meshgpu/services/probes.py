"""Replica readiness, probed by the host that runs the replica.

For every service replica this node runs (job 0 of the replica, RUNNING in the replicated
state on this node), the prober runs the service's ``probes`` against
``http://127.0.0.1:<port><url>``: a probe is "ready" once ``ready_after`` consecutive attempts
answered 2xx, "probing" while it has a shorter streak, "failing" with none (dstack's ``✓``,
``~``, ``×``). A probe with ``until_ready`` is not run again once ready. The replica is ready
when every probe is. A service without probes (none configured, or ``probes: []``) gets a TCP
connect check instead: ready once the port accepts a connection (checked every
``tcp_interval_s`` until then, every ``tcp_ready_interval_s`` after), so traffic never reaches
a replica that is not listening yet.

Attempts that find nothing listening (connection refused) are retried within
``refused_retry_s`` rather than after the probe's full interval: they never count as a
success, so ``ready_after`` means what it says, and a replica that just started listening is
found ready within a fraction of a second (what a request held for activation waits for).

Each replica's state is reported through Raft (``ReplicaProbes``) only when it changes, the
changes piling up while one report commits going out in one entry, fenced by the job's epoch
and retried until they commit (as the executor's job reports are). After an agent restart a
probe starts from what the state says of it, so a ready replica does not blink unready.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import trio

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.config.spec import Probe, ServiceSpec
from meshgpu.state import JobRecord, JobStatus, ProbeReport, ReplicaProbes, StateMachine, encode

log = logging.getLogger(__name__)

Propose = Callable[..., Awaitable[Any]]

FAILING, PROBING, READY = "failing", "probing", "ready"
TCP_INTERVAL_S = 0.5  # the connect check of a service without probes, until it is ready
TCP_READY_INTERVAL_S = 5.0  # ... and once it is
TCP_TIMEOUT_S = 2.0
REFUSED_RETRY_S = 0.5  # an HTTP probe that found nothing listening tries again this soon
MAX_BATCH = 500  # reports per Raft entry
RETRY_FIRST_S, RETRY_MAX_S = 0.5, 5.0


@dataclass
class ProbeTracker:
    """One probe's streak of consecutive successes, and what it says (pure)."""

    ready_after: int = 1
    streak: int = 0

    @property
    def status(self) -> str:
        if self.streak >= max(1, self.ready_after):
            return READY
        return PROBING if self.streak > 0 else FAILING

    def record(self, ok: bool) -> str:
        self.streak = self.streak + 1 if ok else 0
        return self.status


@dataclass
class _Replica:
    job_id: str
    epoch: int
    trackers: list[ProbeTracker]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    heard: list[bool] = field(default_factory=list)  # has each probe had a first result

    def report(self) -> tuple[bool, list[str]]:
        states = [t.status for t in self.trackers]
        return all(s == READY for s in states), states


def probed_job(state: StateMachine, job: JobRecord) -> ServiceSpec | None:
    """The service spec if ``job`` is a service replica's job the prober looks after (job 0
    of its replica: the one the ingress routes to, as in dstack), else None."""
    run = state.runs.get(job.run_name)
    if run is None or run.spec.service is None or job.job_num != 0:
        return None
    return run.spec.service


class Prober:
    """Probes this node's service replicas; see the module docstring."""

    def __init__(
        self,
        node_id: str,
        state: StateMachine,
        propose: Propose,
        *,
        clock: Clock = SYSTEM_CLOCK,
        host: str = "127.0.0.1",
        tcp_interval_s: float = TCP_INTERVAL_S,
        tcp_ready_interval_s: float = TCP_READY_INTERVAL_S,
        refused_retry_s: float = REFUSED_RETRY_S,
    ) -> None:
        self.node_id, self.state, self.propose = node_id, state, propose
        self.clock = clock
        self.host = host
        self.tcp_interval_s = tcp_interval_s
        self.tcp_ready_interval_s = tcp_ready_interval_s
        self.refused_retry_s = refused_retry_s
        self.replicas: dict[str, _Replica] = {}
        self._sent: dict[tuple[str, int], tuple[bool, list[str]]] = {}
        self._pending: dict[str, ProbeReport] = {}
        self._pending_ready = trio.Event()
        self._changed = trio.Event()
        self._client: httpx.AsyncClient | None = None

    def notify(self, _index: int = 0) -> None:
        """Applied entries: the replicas this node runs may have changed."""
        self._changed.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # One client for every probe, no pooled connections: a probe is a fresh request, as a
        # client's would be. No proxy from the environment: the replica is on this host.
        limits = httpx.Limits(max_keepalive_connections=0)
        async with (
            httpx.AsyncClient(limits=limits, trust_env=False) as self._client,
            trio.open_nursery() as nursery,
        ):
            self._nursery = nursery
            nursery.start_soon(self._reporter)
            self._reconcile()
            task_status.started()
            while True:
                await self._changed.wait()
                self._changed = trio.Event()
                self._reconcile()

    # ------------------------------------------------------------------ which replicas

    def _reconcile(self) -> None:
        wanted: dict[str, tuple[JobRecord, ServiceSpec]] = {}
        for job in self.state.jobs_on_node(self.node_id):
            if job.status is not JobStatus.RUNNING:
                continue
            service = probed_job(self.state, job)
            if service is not None:
                wanted[job.job_id] = (job, service)
        for job_id, rep in list(self.replicas.items()):
            now = wanted.get(job_id)
            if now is None or now[0].epoch != rep.epoch:
                rep.scope.cancel()
                del self.replicas[job_id]
                self._pending.pop(job_id, None)
                self._sent.pop((job_id, rep.epoch), None)
        for job_id, (job, service) in wanted.items():
            if job_id not in self.replicas:
                self._start(job, service)

    def _start(self, job: JobRecord, service: ServiceSpec) -> None:
        probes = service.probes
        ready_after = [p.ready_after for p in probes] if probes else [1]
        trackers = [ProbeTracker(ready_after=n) for n in ready_after]
        # What the state says already (an agent restart): a probe the state has as ready
        # starts ready, so a serving replica does not drop out while it is probed again.
        if len(job.probes) == len(trackers):
            for t, s in zip(trackers, job.probes, strict=True):
                if s == READY:
                    t.streak = max(1, t.ready_after)
        rep = _Replica(job.job_id, job.epoch, trackers, heard=[False] * len(trackers))
        self._sent[(job.job_id, job.epoch)] = (job.ready, list(job.probes))
        self.replicas[job.job_id] = rep
        self._nursery.start_soon(self._probe_replica, rep, service)

    async def _probe_replica(self, rep: _Replica, service: ServiceSpec) -> None:
        with rep.scope:  # cancelled once the replica no longer runs here
            async with trio.open_nursery() as nursery:
                if service.probes:
                    for i, probe in enumerate(service.probes):
                        nursery.start_soon(self._http_loop, rep, i, probe, service.port)
                else:
                    nursery.start_soon(self._tcp_loop, rep, service.port)

    # ------------------------------------------------------------------ probing

    async def _http_loop(self, rep: _Replica, i: int, probe: Probe, port: int) -> None:
        tracker = rep.trackers[i]
        while True:
            ok, refused = await self._http_attempt(probe, port)
            tracker.record(ok)
            rep.heard[i] = True
            self._changed_probe(rep)
            if ok and probe.until_ready and tracker.status == READY:
                return  # stays ready: not run again
            delay = probe.interval_s
            if refused:
                delay = min(delay, self.refused_retry_s)
            await self.clock.sleep(delay)

    async def _http_attempt(self, probe: Probe, port: int) -> tuple[bool, bool]:
        """(2xx?, nothing listening?)"""
        assert self._client is not None
        path = probe.url if probe.url.startswith("/") else "/" + probe.url
        url = f"http://{self.host}:{port}{path}"
        try:
            with trio.move_on_after(probe.timeout_s + 1.0):
                resp = await self._client.request(
                    probe.method.upper(),
                    url,
                    headers=dict(probe.headers),
                    content=probe.body.encode() if probe.body is not None else None,
                    timeout=probe.timeout_s,
                )
                return 200 <= resp.status_code < 300, False
            return False, False
        except httpx.ConnectError:
            return False, True
        except (httpx.HTTPError, OSError, ValueError) as e:
            log.debug("probe %s %s: %s", probe.method, url, e)
            return False, False

    async def _tcp_loop(self, rep: _Replica, port: int) -> None:
        tracker = rep.trackers[0]
        while True:
            ok = await self._tcp_attempt(port)
            tracker.record(ok)
            rep.heard[0] = True
            self._changed_probe(rep)
            await self.clock.sleep(self.tcp_ready_interval_s if ok else self.tcp_interval_s)

    async def _tcp_attempt(self, port: int) -> bool:
        with trio.move_on_after(TCP_TIMEOUT_S):
            try:
                stream = await trio.open_tcp_stream(self.host, port)
            except OSError:
                return False
            await stream.aclose()
            return True
        return False

    # ------------------------------------------------------------------ reporting

    def _changed_probe(self, rep: _Replica) -> None:
        if not all(rep.heard) or self.replicas.get(rep.job_id) is not rep:
            return  # every probe's first result first: no report of a state nobody measured
        now = rep.report()
        key = (rep.job_id, rep.epoch)
        if self._sent.get(key) == now:  # what was last queued (or what the state says)
            return
        self._sent[key] = now
        ready, probes = now
        log.info("job=%s ready=%s probes=%s", rep.job_id, ready, ",".join(probes))
        self._pending[rep.job_id] = ProbeReport(
            job_id=rep.job_id, epoch=rep.epoch, ready=ready, probes=probes
        )
        self._pending_ready.set()

    async def _reporter(self) -> None:
        """Propose what changed, all that piled up in one entry, retrying until it commits."""
        while True:
            await self._pending_ready.wait()
            self._pending_ready = trio.Event()
            reports = list(self._pending.values())[:MAX_BATCH]
            for r in reports:
                del self._pending[r.job_id]
            if self._pending:
                self._pending_ready.set()
            if reports:
                await self._propose_retrying(
                    encode(ReplicaProbes(at=self.clock.wall(), reports=reports))
                )

    async def _propose_retrying(self, data: bytes) -> None:
        rid = os.urandom(16)
        delay = RETRY_FIRST_S
        while True:
            try:
                await self.propose(data, request_id=rid)
                return
            except Exception as e:  # no leader for a while: keep the report, try again
                log.warning("probe report not committed yet (%s); retrying", e)
                await self.clock.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_S)
