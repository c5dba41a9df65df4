"""The agent's gossip: a :class:`~meshgpu.mesh.gossip.shell.GossipShell` on the UDP side of the
peer port, fed with this host's metadata and read by the API and the leader.

Lifecycle (one task under the agent's nursery, started once the node has its identity and the
Raft log has caught up far enough to hold the cluster's gossip key):

1. wait for a gossip key in the replicated cluster state; the leader installs one when there is
   none (a new cluster, or one created before gossip existed) and rotates them
   (``meshgpu/control/gossip_keys.py``);
2. bind UDP on ``--bind``:``--peer-port`` (the number Raft uses for TCP) and start the shell;
   streams (push/pull, fallback pings) are ``APP`` requests on the Raft transport;
3. join through the Raft members' peer addresses (retried while this member is alone);
4. sample GPU telemetry every ``telemetry_interval_s`` and publish metadata
   (:mod:`meshgpu.mesh.node_meta`), with this node's ingress counters of autoscaled services
   (looked at every ``services_check_s``: requests waiting for a replica go out at once, the
   counts at most every ``services_refresh_s``); follow key rotations.

Member ids are node ids (the ids of the replicated node records), so the gossip view and the
records line up one to one. The incarnation starts from the wall clock in milliseconds, so a
restarted agent always comes back above anything its previous run said (memberlist#311).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from consensus.transport import parse_address
from meshgpu.mesh.gossip import (
    Addr,
    Gossip,
    GossipConfig,
    Keyring,
    MemberInfo,
    MemberState,
    MetaTooLarge,
)
from meshgpu.mesh.gossip.shell import GossipShell, TransportStreams
from meshgpu.mesh.join import answer_api_query
from meshgpu.mesh.node_meta import build_meta, decisive, parse_meta, variants

if TYPE_CHECKING:
    from consensus.transport import Transport
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState

log = logging.getLogger(__name__)

KEY_WAIT_S = 0.2  # how often a member without a gossip key looks for the first one


@dataclass
class GossipHost:
    """What gossip needs of its host: who it is, where it listens, what it publishes."""

    node_id: str
    raft_id: int
    name: str
    api_url: str
    labels: dict[str, str]
    bind: str
    peer_port: int  # the real number (the transport bound it)
    peer_address: str  # where peers reach this host (advertised address, peer port)
    transport: Transport  # streams (push/pull, fallback pings) ride its APP requests
    cluster: ClusterState  # members (seeds, the address book) and the gossip keys
    state: StateMachine  # this host's record and jobs (busy GPUs)
    local_jobs: Callable[[], Iterable[str]]  # job ids running here
    cut_off: Callable[[], bool]  # no leader heard for the fencing period
    telemetry: Callable[[], Any]  # a blocking GPU sample (run in a worker thread)
    # This node's ingress counters, run id -> (completed, waiting) (``ServiceCounters.snapshot``)
    service_counters: Callable[[], Mapping[str, tuple[int, int]]] = dict
    # Handed each GPU sample as it is taken (the host's auto-stop keeps a window of them).
    on_telemetry: Callable[[Any], None] = lambda _samples: None


class MeshGossip:
    """Gossip for one agent; see the module docstring."""

    def __init__(
        self,
        host: GossipHost,
        config: GossipConfig | None = None,
        *,
        telemetry_interval_s: float = 2.0,
        telemetry_refresh_s: float = 10.0,
        join_retry_s: float = 3.0,
        key_check_s: float = 1.0,
        services_check_s: float = 0.25,
        services_refresh_s: float = 2.0,
    ) -> None:
        self.host = host
        self.config = config if config is not None else GossipConfig.lan()
        self.telemetry_interval_s = telemetry_interval_s
        self.telemetry_refresh_s = telemetry_refresh_s
        self.join_retry_s = join_retry_s
        self.key_check_s = key_check_s  # how often the replicated keys are looked at
        self.services_check_s = services_check_s  # how often the service counters are read
        self.services_refresh_s = services_refresh_s  # how often changed counts go out
        self.shell: GossipShell | None = None
        self._keys: tuple[str, ...] = ()
        self._book: dict[Addr, int] = {}
        self._book_version = -1
        self._rng = random.Random()

    # ------------------------------------------------------------------ what others read

    @property
    def running_since(self) -> float | None:
        """When this member's gossip started (trio clock); ``None`` while it is not running."""
        return self.shell.started_at if self.shell is not None else None

    def member(self, node_id: str) -> MemberInfo | None:
        """This member's view of ``node_id`` (``None``: unknown, or gossip not running)."""
        return self.shell.member(node_id) if self.shell is not None else None

    def node_view(self, node_id: str) -> dict[str, Any] | None:
        """The gossip part of ``GET /api/v1/nodes`` for one node."""
        info = self.member(node_id)
        if info is None:
            return None
        meta = parse_meta(info.meta)
        return {
            "state": info.state.name.lower(),
            "incarnation": info.incarnation,
            "for_s": round(max(0.0, trio.current_time() - info.state_since), 1),
            "busy": list(meta.busy),
            "unhealthy": {str(k): v for k, v in (meta.unhealthy or {}).items()},
            "cut_off": meta.cut_off,
        }

    def telemetry(self, node_id: str) -> list[dict[str, Any]] | None:
        """A peer's last published per-GPU telemetry (``None``: none known)."""
        info = self.member(node_id)
        if info is None or info.state not in (MemberState.ALIVE, MemberState.SUSPECT):
            return None
        return [dict(row) for row in parse_meta(info.meta).telemetry]

    def service_counters(self) -> dict[str, dict[str, tuple[int, int]]]:
        """Every live member's published ingress counters (this one's included, as last
        published): node id -> service key (``node_meta.service_key``) -> (completed,
        waiting)."""
        shell = self.shell
        if shell is None:
            return {}
        out = {}
        for info in shell.members():
            if info.state in (MemberState.ALIVE, MemberState.SUSPECT):
                counts = parse_meta(info.meta).services
                if counts:
                    out[info.id] = counts
        return out

    def summary(self, registered: set[str]) -> dict[str, Any]:
        """This member's gossip status; ``registered``: node ids with a replicated record (gossip
        members without one are listed, e.g. a host that joined gossip but not yet Raft)."""
        shell = self.shell
        if shell is None:
            return {"running": False}
        members = shell.members()
        states = {s.name.lower(): 0 for s in MemberState}
        for m in members:
            states[m.state.name.lower()] += 1
        return {
            "running": True,
            "member": shell.core.id,
            "port": shell.port,
            "members": states,
            "health_score": shell.core.health_score,
            "unregistered": [
                {"node_id": m.id, "name": parse_meta(m.meta).name, "state": m.state.name.lower()}
                for m in members
                if m.id not in registered
            ],
            "stats": dict(shell.stats) | {f"core_{k}": v for k, v in shell.core.stats.items()},
        }

    async def handle_request(self, peer_id: int, body: bytes) -> bytes:
        """The Raft transport's ``on_request``: a gossip stream from an authenticated peer."""
        shell = self.shell
        return shell.handle_stream(body) if shell is not None else b""

    # ------------------------------------------------------------------ running

    async def run(self) -> None:
        host = self.host
        keys = await self._wait_for_keys()
        addr = parse_address(host.peer_address)
        core = Gossip(
            host.node_id,
            addr,
            self._meta(None),
            self.config,
            incarnation=int(time.time() * 1000),
        )
        shell = GossipShell(
            core,
            self._keyring(keys),
            TransportStreams(host.transport, self._resolve),  # type: ignore[arg-type]
            host=host.bind,
            port=host.peer_port,
            on_plain=lambda data: answer_api_query(data, host.api_url),
        )
        async with trio.open_nursery() as nursery:
            failures = 0
            while True:
                try:
                    await nursery.start(shell.run)
                    break
                except OSError as e:
                    # Not fatal: liveness falls back to Raft alone until the port frees up.
                    log.log(
                        logging.ERROR if failures == 0 else logging.DEBUG,
                        "gossip cannot bind UDP %s:%d (%s); retrying, Raft alone says who is up",
                        host.bind,
                        host.peer_port,
                        e,
                    )
                    failures += 1
                    await trio.sleep(5.0)
            self.shell = shell
            try:
                nursery.start_soon(self._join_loop, shell)
                nursery.start_soon(self._meta_loop, shell)
                nursery.start_soon(self._key_loop, shell)
                await trio.sleep_forever()
            finally:
                self.shell = None

    async def _wait_for_keys(self) -> list[str]:
        """Until the replicated state has a gossip key (the leader installs one)."""
        cluster = self.host.cluster
        while not cluster.gossip_keys:
            await trio.sleep(KEY_WAIT_S)
        return list(cluster.gossip_keys)

    def _keyring(self, keys: list[str]) -> Keyring:
        self._keys = tuple(keys)
        return Keyring([bytes.fromhex(k) for k in keys], self.host.cluster.cluster_id)

    async def _key_loop(self, shell: GossipShell) -> None:
        """Follow the keys in the replicated state (the leader rotates them)."""
        while True:
            await trio.sleep(self.key_check_s)
            keys = self.host.cluster.gossip_keys
            if keys and tuple(keys) != self._keys:
                shell.set_keyring(self._keyring(list(keys)))
                log.info("gossip keys rotated (%d in the ring)", len(keys))

    def _seeds(self) -> list[Addr]:
        me = self.host.raft_id
        seeds = []
        for m in self.host.cluster.members.values():
            if m.removed or m.raft_id == me or not m.peer_address:
                continue
            try:
                seeds.append(parse_address(m.peer_address))
            except ValueError:
                continue
        return seeds

    async def _join_loop(self, shell: GossipShell) -> None:
        """Join while alone (at start, or after every other member was lost); once in, SWIM's
        push/pull and reconnects keep the view whole."""
        attempts = 0
        while True:
            seeds = self._seeds()
            if seeds and shell.core.live_count() <= 1:
                picked = self._rng.sample(seeds, min(3, len(seeds)))
                log.log(
                    logging.INFO if attempts == 0 else logging.DEBUG,
                    "gossip joining through %s",
                    ", ".join(f"{h}:{p}" for h, p in picked),
                )
                shell.join(picked)
                attempts += 1
            else:
                attempts = 0
            await trio.sleep(self.join_retry_s)

    def _resolve(self, addr: Addr) -> int | None:
        """The Raft id at a gossip address: the transport dials (and authenticates) by id."""
        cluster = self.host.cluster
        if self._book_version != cluster.version:
            book = {}
            for m in cluster.members.values():
                if not m.removed and m.peer_address:
                    try:
                        book[parse_address(m.peer_address)] = m.raft_id
                    except ValueError:
                        continue
            self._book, self._book_version = book, cluster.version
        rid = self._book.get(addr)
        if rid is None and self.shell is not None:  # admitted, but not applied here yet
            for info in self.shell.members():
                if info.addr == addr:
                    return parse_meta(info.meta).raft_id
        return rid

    # ------------------------------------------------------------------ metadata

    def _meta(self, telemetry: Any) -> dict[str, Any]:
        host = self.host
        state = host.state
        record = state.nodes.get(host.node_id)
        busy = set()
        for job_id in list(host.local_jobs()):
            job = state.jobs.get(job_id)
            if job is not None and job.node_id == host.node_id:
                busy.update(job.gpu_indices)
        return build_meta(
            raft_id=host.raft_id,
            name=host.name,
            api_url=host.api_url,
            labels=host.labels,
            gpus=record.gpus if record is not None else [],
            telemetry=telemetry,
            busy=busy,
            cut_off=host.cut_off(),
            services=self._services(),
        )

    def _services(self) -> dict[str, tuple[int, int]]:
        """The counters worth publishing: active services (the leader's autoscaler and every
        node's ``ps`` read them), and any that hold requests (``encode_services`` keeps the
        waiting and the busiest when there are too many)."""
        counts = self.host.service_counters()
        if not counts:
            return {}
        active = {
            run.run_id
            for run in self.host.state.runs.values()
            if run.spec.service is not None and not run.status.is_finished()
        }
        return {r: c for r, c in counts.items() if r in active or c[1] > 0}

    async def _meta_loop(self, shell: GossipShell) -> None:
        published: dict[str, Any] | None = None
        published_at = services_at = sampled_at = -float("inf")
        too_large = False
        samples: Any = None
        while True:
            if trio.current_time() - sampled_at >= self.telemetry_interval_s:
                try:
                    samples = await trio.to_thread.run_sync(self.host.telemetry)
                    self.host.on_telemetry(samples)
                except Exception as e:  # a driver hiccup: publish no health rather than stop
                    log.warning("GPU telemetry failed: %s", e)
                    samples = None
                sampled_at = trio.current_time()
            meta = self._meta(samples)
            now = trio.current_time()
            services_due = (
                published is not None
                and meta.get("s") != published.get("s")
                and now - services_at >= self.services_refresh_s
            )
            if (
                published is None
                or services_due
                or decisive(meta) != decisive(published)
                or (meta != published and now - published_at >= self.telemetry_refresh_s)
            ):
                if published is None or meta.get("s") != published.get("s"):
                    services_at = now
                for candidate in variants(meta):
                    try:
                        shell.update_meta(candidate)
                        break
                    except MetaTooLarge:
                        continue
                else:
                    if not too_large:
                        log.warning("gossip metadata does not fit even trimmed; not updated")
                    too_large = True
                published, published_at = meta, now
            await trio.sleep(min(self.services_check_s, self.telemetry_interval_s))
