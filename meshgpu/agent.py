"""One meshgpu agent: wires the consensus node, the state machine, the scheduler loop, the
executor, GPU inventory and the REST API into one trio nursery (every service a child task).

This milestone runs a single-member mesh; peers join in the mesh milestone, which only adds
members to the same node (the voter set, the transport and discovery) -- nothing here assumes one
host except the founding configuration.
"""

from __future__ import annotations

import dataclasses
import hmac
import itertools
import json
import logging
import os
import random
import secrets
import socket
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import httpx
import hypercorn.config
import hypercorn.trio
import trio

from consensus.core import Role
from consensus.node import Duplicate, NodeOptions, RaftNode, bootstrap_storage
from consensus.storage import DiskStorage, StorageFull
from consensus.transport import TLSConfig, Transport, parse_address
from meshgpu.api import create_app
from meshgpu.api.problems import Problem, parse_run_config_async
from meshgpu.client.archive import DEFAULT_CODE_LIMIT, ArchiveLimits, ArchiveRefused
from meshgpu.client.http import write_profile
from meshgpu.clock import SYSTEM_CLOCK
from meshgpu.config.interpolation import references
from meshgpu.config.render import to_json
from meshgpu.config.resources import GPUSpec
from meshgpu.datadir import open_private, private_dir, secure_data_dir, write_private
from meshgpu.gpu import FakeProvider, collect_inventory, detect
from meshgpu.mesh.address import choose_address, host_port, is_unspecified
from meshgpu.mesh.admission import JoinRefused, check_join
from meshgpu.mesh.discovery import Advertiser, browse
from meshgpu.mesh.gossip import GossipConfig
from meshgpu.mesh.join import (
    JoinError,
    normalize_member_url,
    pinned_context,
    request_join,
    resolve_join_urls,
)
from meshgpu.mesh.membership import MembershipManager, MembershipPolicy
from meshgpu.mesh.node_gossip import MeshGossip
from meshgpu.runner import ProcessRunner
from meshgpu.runner.code import CodeDigestError, CodeStore, push_targets
from meshgpu.runner.container import detect_runtime
from meshgpu.runner.executor import Executor
from meshgpu.runner.fencing import Fence
from meshgpu.scheduler import plan
from meshgpu.security import (
    JoinToken,
    NodeIdentity,
    PKIError,
    create_cluster,
    fingerprint,
    hash_api_token,
    seal,
    sign_csr,
    unseal,
)
from meshgpu.state import (
    AssignJobs,
    CodeRef,
    GPURecord,
    NodeRecord,
    PreemptJobs,
    PruneRuns,
    RegisterNode,
    Result,
    RunRecord,
    SetPendingReasons,
    SetRunPriority,
    StopRun,
    SubmitRun,
    encode,
)
from meshgpu.state.cluster import (
    AdmitNode,
    CreateToken,
    InitCluster,
    Replicated,
    RevokeToken,
    encode_cluster,
)
from meshgpu.state.retention import prune_due

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


RETENTION_INTERVAL_S = 10.0  # how often the leader applies the retention policy
MAX_REASONS = 2000  # why-pending reasons per Raft entry
# The founding agent's join token (join-token.json): many hosts may join with it, for a day.
STARTUP_TOKEN_TTL_S = 86400.0
_NAME_RNG = random.Random()  # seeded once from the OS (seeding per name cost 5% of a submit)


@dataclass
class AgentSettings:
    data_dir: Path = field(default_factory=lambda: Path.home() / ".meshgpu")
    name: str = field(default_factory=socket.gethostname)
    bind: str = "127.0.0.1"
    api_port: int = 7480
    peer_port: int = 7481
    advertise: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # dstack's blocks: split this host into N equal shares (or "auto"); None: GPU by GPU.
    blocks: int | Literal["auto"] | None = None
    fake_gpus: str | None = None
    code_limit: int = DEFAULT_CODE_LIMIT
    # What an archive may expand to (None: 16 x code_limit) and hold (docs/operations.md).
    code_expanded_limit: int | None = None
    code_max_files: int | None = None
    # Free space kept on the data dir's disk: writes are refused (507) below it.
    min_free: int = 64 << 20
    # Other members an upload is copied to before it is acknowledged (docs/operations.md).
    code_copies: int = 2
    tick_s: float = 0.1
    # Serve the REST API over TLS with this node's certificate from the cluster CA (off only
    # behind a proxy that terminates TLS).
    api_tls: bool = True
    write_client_profile: bool = True
    token: str | None = None
    join: list[str] = field(default_factory=list)
    mdns: bool = True
    membership: MembershipPolicy = field(default_factory=MembershipPolicy)
    gossip: GossipConfig = field(default_factory=GossipConfig.lan)
    keep_runs: int = 1000  # finished runs kept in the state (newest first) ...
    keep_runs_for_s: float = 7 * 86400  # ... and for at most this long


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.clock = SYSTEM_CLOCK  # time for the executor, fencing, membership, retention
        d = settings.data_dir
        # Private to this user (0700/0600), whatever an older version or a hand left behind.
        private_dir(d)
        secure_data_dir(d)
        self.identity_path = d / "node.json"
        self.identity = self._load_identity()
        self.node_id: str = self.identity["node_id"]
        self.node_name = settings.name
        self.tls = NodeIdentity(private_dir(d / "tls"))
        token_file = d / "admin.token"
        self.admin_token = token_file.read_text().strip() if token_file.exists() else ""
        self.code_dir = d / "code"
        self.code = CodeStore(
            self.code_dir,
            lambda: self.admin_token,
            limit=settings.code_limit,
            verify=self.client_ssl,
            archive_limits=ArchiveLimits.for_upload_limit(
                settings.code_limit, settings.code_expanded_limit, settings.code_max_files
            ),
            min_free=settings.min_free,
        )
        self.replicated = Replicated()
        self.state = self.replicated.jobs
        self._members, self._members_at = b"", -1e9
        self.cluster = self.replicated.cluster
        self.node: RaftNode = None  # type: ignore[assignment]  # created in run()
        self.transport: Transport | None = None
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
            code=self.code,
            clock=self.clock,
        )
        self.container_runtime: str | None = None
        self._demand = trio.Event()
        self._cluster_version = -1
        self.api_url = ""
        self._bound_api_port = settings.api_port
        # The address peers and jobs reach this host at: --advertise, else --bind, else (bound
        # to every address) the one on the route to the mesh, chosen in ``run``.
        self.host = settings.advertise or settings.bind
        self.join_token: str | None = None
        self.gossip = MeshGossip(self, settings.gossip)
        self._client_ssl: ssl.SSLContext | None = None
        self._join_nonces: dict[str, float] = {}  # nonces of join requests checked lately
        self._fence: Fence | None = None  # started in run()

    @property
    def cut_off(self) -> bool:
        """No leader heard for the fencing period (meshgpu/runner/fencing.py)."""
        return self._fence is not None and self._fence.cut_off

    # -- identity and secrets on disk ---------------------------------------------------------
    def _load_identity(self) -> dict[str, Any]:
        if self.identity_path.exists():
            return json.loads(self.identity_path.read_text())
        return {"node_id": uuid.uuid4().hex[:12]}

    def _save_identity(self) -> None:
        write_private(self.identity_path, json.dumps(self.identity))

    def _save_admin_token(self, token: str) -> None:
        path = self.settings.data_dir / "admin.token"
        with os.fdopen(open_private(path), "w") as f:
            f.write(token)
        self.admin_token = token

    def _gpu_vendor(self) -> str | None:
        inv = self.gpus.inventory()
        return inv[0].vendor if inv else None

    @property
    def peer_address(self) -> str:
        return host_port(self.host, self.settings.peer_port)

    def api_token_ok(self, token: str) -> bool:
        expected = self.cluster.api_token_hash
        if expected:
            return hmac.compare_digest(hash_api_token(token), expected)
        return bool(self.admin_token) and hmac.compare_digest(token, self.admin_token)

    # -- wiring ---------------------------------------------------------------------------------
    def _follow_applied(self, nursery: trio.Nursery) -> None:
        """What reacts to the applied state, each in its own task (the Raft owner task only
        publishes the applied index): the executor, the scheduler's demand, the cluster sync."""

        async def follow(react: Callable[[int], object]) -> None:
            index = 0  # whatever is applied already counts as news
            while True:
                index = await self.node.wait_applied(after=index)
                react(index)

        nursery.start_soon(follow, self.executor.notify)
        nursery.start_soon(follow, lambda _: self._demand.set())
        nursery.start_soon(self._cluster_sync_loop)

    async def _cluster_sync_loop(self) -> None:
        index = self.node.applied
        while True:
            index = await self.node.wait_applied(after=index)
            if self.cluster.version != self._cluster_version:
                self._cluster_version = self.cluster.version
                await self._sync_cluster()

    async def _sync_cluster(self) -> None:
        """Peer addresses from the replicated member list; our CA key if a grant names us
        (file writes and unsealing in worker threads)."""
        rid = self.identity.get("raft_id")
        if self.transport is not None:
            for m in self.cluster.members.values():
                if m.raft_id != rid and not m.removed and m.peer_address:
                    self.transport.set_peer_address(m.raft_id, m.peer_address)
                    self.node.addresses[m.raft_id] = m.peer_address
        peers = {
            str(m.raft_id): m.peer_address for m in self.cluster.members.values() if not m.removed
        }
        if peers and peers != self.identity.get("peers"):
            old, self.identity["peers"] = self.identity.get("peers"), peers  # for restarts
            text = json.dumps(self.identity)
            try:
                await trio.to_thread.run_sync(write_private, self.identity_path, text)
            except OSError as e:  # a full disk: tried again at the next membership change
                self.identity["peers"] = old
                log.warning("cannot save the member list to %s: %s", self.identity_path, e)
        sealed = self.cluster.ca_grants.get(rid) if rid else None
        if sealed and not self.tls.ca_key_path.exists():
            try:
                await trio.to_thread.run_sync(self._store_ca_key, sealed)
                log.info("received the cluster CA key (this node is a voter)")
            except Exception as e:  # a grant we cannot open is someone else's problem to fix
                log.error("cannot open the CA key granted to this node: %s", e)

    def _store_ca_key(self, sealed: str) -> None:
        self.tls.store_ca_key(unseal(bytes.fromhex(sealed), self.tls.private_key()))

    async def _propose(
        self, data: bytes, request_id: bytes | None = None, timeout: float = 30.0
    ) -> Any:
        result = await self.node.propose(data, request_id=request_id, timeout=timeout)
        if isinstance(result, Duplicate):
            # Applied once already. Its result is forgotten after a restart of this node: then
            # the caller reads the outcome from the state (a submission: by its request id).
            return result.result if result.known else Result(True, None, code="duplicate")
        return result

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        s = self.settings
        async with trio.open_nursery() as nursery:
            # Bound first (the API URL names the real port), served once this node has its
            # certificate: a joiner gets it from the join, a founder makes it.
            api_socket = _listen(s.bind, s.api_port)
            self._bound_api_port = api_socket.getsockname()[1]
            await self._choose_host(self._known_member_hosts())
            founding = await self._establish_identity()
            await self._serve_api(nursery, api_socket)
            await self._start_consensus(nursery)
            if founding:
                await self._init_cluster()
            await self._register()
            await nursery.start(self.executor.run)
            nursery.start_soon(self._scheduler_loop)
            self.membership = MembershipManager(
                self.node,
                self.cluster,
                self.tls,
                self._zones,
                self._propose,
                s.membership,
                jobs=self.state,
                gossip=self.gossip,
                clock=self.clock,
            )
            nursery.start_soon(self.gossip.run)
            nursery.start_soon(self.membership.run)
            policy = s.membership
            self._fence = Fence(
                self.node,
                self.executor,
                policy.dead_grace_s * policy.fence_fraction,
                clock=self.clock,
            )
            nursery.start_soon(self._fence.run)
            nursery.start_soon(self._reactivate_loop)
            nursery.start_soon(self._retention_loop)
            if s.mdns:
                adv = Advertiser(
                    self.node_name,
                    self.cluster.cluster_id or self.identity["cluster_id"],
                    self.api_url,
                    self.peer_address,
                    self.host,
                )
                nursery.start_soon(adv.run)
            if s.write_client_profile:
                write_profile(
                    s.data_dir / "client.toml",
                    self.api_url,
                    self.admin_token,
                    ca=self.tls.files.ca_cert.read_text() if s.api_tls else None,
                )
            log.info(
                "agent node=%s raft_id=%s api=%s ready", self.node_name, self.node.id, self.api_url
            )
            task_status.started(self.api_url)

    async def _serve_api(self, nursery: trio.Nursery, sock: socket.socket) -> None:
        s = self.settings
        cfg = hypercorn.config.Config()
        cfg.bind = [f"fd://{sock.detach()}"]
        if s.api_tls:
            cfg.certfile = str(self.tls.files.cert)
            cfg.keyfile = str(self.tls.files.key)
        cfg.accesslog = None
        cfg.errorlog = logging.getLogger("hypercorn.error")
        cfg.graceful_timeout = 1.0
        await nursery.start(partial(hypercorn.trio.serve, create_app(self), cfg))

    def client_ssl(self) -> ssl.SSLContext:
        """For this agent's calls to other members' APIs: trusts the cluster CA only, and
        presents this node's certificate."""
        if self._client_ssl is None:
            files = self.tls.files
            ctx = pinned_context(files.ca_cert.read_bytes())
            ctx.load_cert_chain(str(files.cert), str(files.key))
            self._client_ssl = ctx
        return self._client_ssl

    def http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An HTTP client for other members' APIs (https with the cluster CA, or plain http
        where a member serves it so)."""
        return httpx.AsyncClient(verify=self.client_ssl(), **kwargs)

    def _known_member_hosts(self) -> list[str]:
        """Hosts of the mesh known before joining it: --join targets, and (after a restart)
        the peers remembered from last time."""
        hosts = [httpx.URL(normalize_member_url(a)).host for a in self.settings.join]
        rid = str(self.identity.get("raft_id"))
        for k, address in (self.identity.get("peers") or {}).items():
            if k != rid and address:
                hosts.append(parse_address(address)[0])
        return hosts

    async def _choose_host(self, targets: list[str]) -> None:
        """Bound to every address, with no --advertise: advertise the one on the route towards
        ``targets`` (meshgpu/mesh/address.py), and the API URL with it."""
        s = self.settings
        if not s.advertise and is_unspecified(s.bind):
            self.host = await trio.to_thread.run_sync(choose_address, s.bind, targets)
            log.info("bound to %s: advertising %s", s.bind or "every address", self.host)
        scheme = "https" if s.api_tls else "http"
        self.api_url = f"{scheme}://{host_port(self.host, self._bound_api_port)}"

    async def _establish_identity(self) -> bool:
        """Restart as ourselves, join with a token, or found a new mesh. True when founding."""
        s = self.settings
        if self.identity.get("raft_id") and self.tls.exists():
            return False  # a restart: same node, same certificate, same Raft id
        if s.token:
            token = JoinToken.parse(s.token)
            urls = [u for a in s.join for u in await resolve_join_urls(a)]
            if not urls and s.mdns:
                found = await trio.to_thread.run_sync(
                    browse, token.cluster_id, s.advertise or s.bind, 10.0
                )
                urls = [m.api_url for m in found]
                await self._choose_host([httpx.URL(u).host for u in urls])
                log.info("mDNS: found %d member(s) of cluster %s", len(urls), token.cluster_id[:8])
            if not urls:
                raise JoinError(
                    "no member to join: none answered on mDNS for this cluster; pass --join host:port"
                )
            if s.peer_port == 0:  # the members must learn a real port: pick a free one now
                family = socket.AF_INET6 if ":" in s.bind else socket.AF_INET
                with socket.socket(family) as probe:
                    probe.bind((s.bind.strip("[]") if not is_unspecified(s.bind) else "", 0))
                    s.peer_port = probe.getsockname()[1]
            result = await request_join(
                urls,
                token,
                self.tls,
                name=self.node_name,
                node_id=self.node_id,
                peer_address=self.peer_address,
                api_url=self.api_url,
            )
            self.identity.update(
                raft_id=result.raft_id,
                cluster_id=result.cluster_id,
                peers={str(k): v for k, v in result.members.items()},
            )
            self._save_identity()
            self._save_admin_token(result.api_token)
            return False
        self.identity.update(raft_id=1, cluster_id=uuid.uuid4().hex, peers={"1": self.peer_address})
        create_cluster(self.tls, 1, hosts=(self.host, "127.0.0.1", "localhost"))
        if not self.admin_token:
            self._save_admin_token(secrets.token_urlsafe(32))
        self._save_identity()
        return True

    async def _start_consensus(self, nursery: trio.Nursery) -> None:
        s = self.settings
        rid = int(self.identity["raft_id"])
        raft_dir = str(s.data_dir / "raft")
        storage = bootstrap_storage(raft_dir, [rid]) if rid == 1 else DiskStorage(raft_dir)
        peers = {int(k): v for k, v in (self.identity.get("peers") or {}).items()}
        self.node = RaftNode(
            rid,
            storage,
            self.replicated,
            peers=peers,
            options=NodeOptions(tick_s=s.tick_s, min_free_bytes=s.min_free),
        )
        node = self.node

        async def deliver(msgs: list[Any]) -> None:
            for m in msgs:
                node.deliver(m)

        self.transport = Transport(
            rid,
            on_messages=deliver,
            on_unreachable=node.report_unreachable,
            on_snapshot_status=node.report_snapshot,
            on_request=self.gossip.handle_request,  # gossip streams share the peer port
            peers={k: parse_address(v) for k, v in peers.items() if k != rid and v},
            tls=TLSConfig.from_files(self.tls.files),
            host=s.bind,
            port=s.peer_port,
        )
        await nursery.start(self.transport.run)
        if s.peer_port == 0:  # bound to a free port: advertise the real one
            s.peer_port = self.transport.port
            self.identity.setdefault("peers", {})[str(rid)] = self.peer_address
            self._save_identity()
        node.attach(self.transport)
        await nursery.start(node.run)
        if node.status()["voters"] == [rid]:
            node.campaign()  # alone: no one to wait for
        await self._sync_cluster()
        self._follow_applied(nursery)
        await self._wait_leader()

    async def _init_cluster(self) -> None:
        ca_pem = self.tls.files.ca_cert.read_bytes()
        await self._propose(
            encode_cluster(
                InitCluster(
                    at=time.time(),
                    cluster_id=self.identity["cluster_id"],
                    ca_cert_pem=ca_pem.decode(),
                    api_token_hash=hash_api_token(self.admin_token),
                    founder_raft_id=1,
                    founder_node_id=self.node_id,
                    founder_name=self.node_name,
                    founder_peer_address=self.peer_address,
                    founder_api_url=self.api_url,
                )
            )
        )
        self.join_token = await self.create_join_token(STARTUP_TOKEN_TTL_S, reusable=True)
        path = self.settings.data_dir / "join-token.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(
                {
                    "token": self.join_token,
                    "join": self.peer_address,
                    "api_url": self.api_url,
                    "expires_at": time.time() + STARTUP_TOKEN_TTL_S,
                    "reusable": True,
                },
                f,
            )

    async def create_join_token(self, ttl_s: float | None, reusable: bool = False) -> str:
        """A new join token; ``ttl_s`` None: it never expires. Only its verifier (a public
        key) enters the replicated state."""
        token = JoinToken.create(
            self.identity["cluster_id"], fingerprint(self.tls.files.ca_cert.read_bytes())
        )
        await self._propose(
            encode_cluster(
                CreateToken(
                    at=time.time(),
                    token_id=token.token_id,
                    verifier=token.verifier(),
                    expires_at=time.time() + ttl_s if ttl_s else None,
                    reusable=reusable,
                )
            )
        )
        return str(token)

    async def revoke_join_token(self, token_id: str) -> Result:
        return await self._propose(encode_cluster(RevokeToken(at=time.time(), token_id=token_id)))

    async def _retention_loop(self) -> None:
        """On the leader: forget finished runs beyond the retention policy (count and age), so
        the state -- and every snapshot -- stays bounded; every host then deletes the files of
        jobs the state no longer knows (``Executor.collect``)."""
        s = self.settings
        while True:
            await self.clock.sleep(RETENTION_INTERVAL_S)
            if self.node.role is Role.LEADER:
                now = self.clock.wall()
                if prune_due(self.state.runs.values(), now, s.keep_runs, s.keep_runs_for_s):
                    cmd = PruneRuns(at=now, keep=s.keep_runs, max_age_s=s.keep_runs_for_s)
                    try:
                        await self._propose(encode(cmd))
                    except Exception as e:  # no quorum now: the next round tries again
                        log.info("pruning deferred: %s", e)
            await trio.to_thread.run_sync(self.executor.collect, self.executor.known_jobs())
            referenced = {r.code.sha256 for r in self.state.runs.values() if r.code is not None}
            await trio.to_thread.run_sync(self.code.collect, referenced)

    async def _reactivate_loop(self) -> None:
        """Declared dead while cut off, and back: register again so the scheduler uses us."""
        while True:
            await trio.sleep(1.0)
            me = self.state.nodes.get(self.node_id)
            if me is not None and me.status == "dead" and self.node.leader:
                log.info("this host was declared dead while unreachable; registering again")
                try:
                    await self._register()
                except Exception as e:  # no quorum yet: try again on the next round
                    log.info("re-registration deferred: %s", e)

    def _zones(self) -> dict[int, str]:
        by_node = {n.node_id: n.labels.get("zone", "") for n in self.state.nodes.values()}
        return {m.raft_id: by_node.get(m.node_id, "") for m in self.cluster.members.values()}

    async def admit(self, body: dict[str, Any]) -> dict[str, Any]:
        """``POST /api/v1/join`` on the leader (a follower forwards it there). The request is
        checked completely before anything is proposed (``meshgpu/mesh/admission.py``)."""
        if self.node is None or not self.node.leader:
            raise Problem(503, "no leader right now", "retry in a few seconds", "unavailable")
        if self.node.role is not Role.LEADER:
            leader = self.cluster.members.get(self.node.leader)
            if leader is None:
                raise Problem(503, "leader unknown", "retry in a few seconds", "unavailable")
            try:
                async with self.http_client(timeout=30) as c:
                    r = await c.post(f"{leader.api_url}/api/v1/join", json=body)
                doc = r.json()
            except (httpx.HTTPError, ValueError) as e:
                raise Problem(
                    503, "the leader did not answer", f"retry shortly ({e})", "unavailable"
                ) from None
            if r.status_code >= 400:
                raise Problem(
                    r.status_code,
                    doc.get("title", "join failed"),
                    doc.get("detail", ""),
                    doc.get("code", ""),
                )
            return doc
        try:
            req = check_join(body, self.cluster, time.time(), self._join_nonces)
        except JoinRefused as e:
            raise Problem(e.status, e.title, e.detail, e.code) from None
        ca = self.tls.ca()
        if ca is None:
            raise Problem(
                503, "this leader cannot sign certificates yet", "retry shortly", "unavailable"
            )
        cmd = AdmitNode(
            at=time.time(),
            token_id=req.token_id,
            nonce=req.nonce,
            csr_pem=req.csr_pem,
            name=req.name,
            node_id=req.node_id,
            peer_address=req.peer_address,
            api_url=req.api_url,
        )
        result: Result = await self._propose(encode_cluster(cmd))
        if result.code == "duplicate":  # applied before, its answer forgotten: ask again
            raise Problem(503, "join in progress", "retry the join shortly", "unavailable")
        if not result.ok:
            status = 409 if result.code == "member_conflict" else 403
            raise Problem(status, "join refused", result.error, result.code)
        rid = int(result.value)
        host = cmd.peer_address.rpartition(":")[0].strip("[]")
        try:
            cert = sign_csr(ca, cmd.csr_pem.encode(), rid, hosts=(host, "127.0.0.1", "localhost"))
        except PKIError as e:
            raise Problem(400, "bad certificate request", str(e), "invalid_csr") from None
        st = self.node.status()
        if rid not in st["voters"] and rid not in st["learners"]:
            await self.node.add_learner(rid, cmd.peer_address)
        return {
            "raft_id": rid,
            "cert_pem": cert.decode(),
            "ca_pem": self.tls.files.ca_cert.read_text(),
            "cluster_id": self.cluster.cluster_id,
            "members": {
                str(m.raft_id): m.peer_address
                for m in self.cluster.members.values()
                if not m.removed
            },
            # Sealed to the key of the CSR: only the host that holds that key (the one whose
            # signed request was checked) can read the token, even where the join travels
            # over plain HTTP (--api-tls off).
            "api_token_sealed": seal(self.admin_token.encode(), cmd.csr_pem.encode()).hex(),
        }

    async def aclose(self) -> None:
        """After ``run`` is cancelled: release what outlives the nursery. Jobs keep running."""
        with trio.CancelScope(shield=True):
            await self.runner.aclose()
        if self.node is not None:
            self.node.storage.close()

    async def _wait_leader(self) -> None:
        """Until a leader is known. A restart that cannot reach a quorum (peers down, a
        partition) keeps waiting -- it is not an error, and the API answers meanwhile -- and
        says so, less and less often."""
        start = trio.current_time()
        say_at = start + 5.0
        while self.node.leader == 0:
            await trio.sleep(0.01)
            now = trio.current_time()
            if now >= say_at:
                st = self.node.status()
                peers = ", ".join(
                    f"{k}={v}" for k, v in sorted(self.node.addresses.items()) if k != self.node.id
                )
                log.warning(
                    "no leader after %.0fs: waiting for a quorum of voters %s to answer "
                    "(peers: %s); still trying",
                    now - start,
                    st["voters"],
                    peers or "none known",
                )
                say_at = now + min(60.0, 2 * (say_at - start))

    async def _register(self) -> None:
        inv = await trio.to_thread.run_sync(collect_inventory, self.gpus, self.settings.data_dir)
        self.container_runtime = await trio.to_thread.run_sync(detect_runtime)
        self.executor.container_runtime = self.container_runtime
        cmd = RegisterNode(
            at=time.time(),
            node_id=self.node_id,
            name=self.node_name,
            api_url=self.api_url,
            internal_ip=self.host,
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
            blocks=self.settings.blocks,
        )
        if cmd.blocks is not None:
            split = NodeRecord(**cmd.model_dump(exclude={"kind", "at"})).block_count()
            lowered = cmd.blocks != "auto" and split != cmd.blocks
            (log.warning if lowered else log.info)(
                "blocks=%s: %d GPUs and %d CPUs split into %s block(s)%s",
                cmd.blocks,
                len(cmd.gpus),
                cmd.cpu_count,
                split,
                " (blocks must divide both evenly)" if lowered else "",
            )
        await self._propose(encode(cmd))

    async def _scheduler_loop(self) -> None:
        """On the leader: place waiting jobs whenever demand or capacity changes."""
        seen = -1
        self._reasons: dict[str, str] = {}  # why-pending reasons this leader last proposed
        wake = float("inf")  # trio time to plan again unasked: a retry backoff ends
        reasons_since = -1.0
        while True:
            with trio.move_on_at(wake) as timer:
                await self._demand.wait()
            self._demand = trio.Event()
            due = timer.cancelled_caught
            if due:
                wake = float("inf")
            if self.node.role is not Role.LEADER or self.node.leader_since != reasons_since:
                self._reasons = {}  # another leader may have set reasons meanwhile
                reasons_since = self.node.leader_since
            if self.node.role is not Role.LEADER:
                continue
            if self.state.demand_version == seen and not due:
                continue
            # A new leader first learns which hosts answer, so nothing new is placed on a host
            # that died with the old leader: it waits until every active host has been heard
            # since it took over, or was marked unreachable by the membership manager (after one
            # election timeout); never longer than two.
            o = self.node.options
            cap = self.node.leader_since + 2 * 2 * o.tick_s * o.election_tick
            if trio.current_time() < cap and not self._hosts_heard():
                wake = min(wake, trio.current_time() + o.tick_s)
                continue
            seen = self.state.demand_version
            now = time.time()
            p = plan(self.state, now)
            wake = float("inf")
            if p.wake_at is not None:
                wake = trio.current_time() + max(0.0, p.wake_at - now) + 0.01
            # Only reasons that differ from what the state holds; the set difference runs in C
            # (a deep queue makes this the scheduler's hottest line otherwise). At most
            # MAX_REASONS per entry: the rest go with the next plan, which comes at once.
            diff = {
                j: why
                for j, why in dict(p.pending.items() - self._reasons.items()).items()
                if j in self.state.jobs and self.state.jobs[j].why_pending != why
            }
            changed = dict(itertools.islice(diff.items(), MAX_REASONS))
            if len(changed) < len(diff):
                self._reasons = {
                    j: w for j, w in p.pending.items() if j not in diff or j in changed
                }
                seen, wake = -1, min(wake, trio.current_time())
            else:
                self._reasons = p.pending
            try:
                if p.preemptions:
                    await self._propose(encode(PreemptJobs(at=now, preemptions=p.preemptions)))
                if p.assignments:
                    cmd = AssignJobs(at=now, assignments=p.assignments, pending_reasons=changed)
                    res = await self._propose(encode(cmd))
                    if isinstance(res, Result) and res.ok and (res.value or {}).get("refused"):
                        # Stale: the state bumped demand, so the next plan comes at once; a
                        # tick's pause keeps a decision refused again and again from
                        # flooding the log.
                        await trio.sleep(o.tick_s)
                elif changed:
                    await self._propose(encode(SetPendingReasons(at=now, reasons=changed)))
            except Exception as e:  # lost leadership or quorum meanwhile: plan again later
                log.warning("scheduler decisions not committed (%s); will plan again", e)
                self._reasons, seen = {}, -1
                await trio.sleep(1.0 if isinstance(e, StorageFull) else o.tick_s)  # disk full
                self._demand.set()

    def members_header(self) -> bytes:
        """API URLs of the live members, for clients to fall back on (cached for a second)."""
        now = time.monotonic()
        if now - self._members_at > 1.0:
            self._members_at = now
            self._members = ",".join(
                n.api_url
                for n in self.state.nodes.values()
                if n.api_url and n.status != "dead" and n.node_id != self.node_id
            ).encode()
        return self._members

    def _hosts_heard(self) -> bool:
        """Has this leader heard from every host the state calls active since it took over?"""
        since = self.node.leader_since
        for m in self.cluster.members.values():
            if m.removed or m.raft_id == self.node.id:
                continue
            node = self.state.nodes.get(m.node_id)
            if node is None or node.status != "active":
                continue
            heard = self.node.last_heard.get(m.raft_id)
            if heard is None or heard < since:
                return False
        return True

    # -- API operations -------------------------------------------------------------------------
    def cluster_status(self) -> dict[str, Any]:
        st = self.node.status()
        return {
            "cluster_id": self.cluster.cluster_id or self.identity.get("cluster_id"),
            "node_id": self.node_id,
            "node": self.node_name,
            "raft_id": self.node.id,
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
        """node id -> leader | voter | learner (members of the Raft configuration)."""
        st = self.node.status()
        out = {}
        for m in self.cluster.members.values():
            if m.removed:
                continue
            if m.raft_id == st["leader"]:
                out[m.node_id] = "leader"
            elif m.raft_id in st["voters"]:
                out[m.node_id] = "voter"
            elif m.raft_id in st["learners"]:
                out[m.node_id] = "learner"
        return out

    async def store_code(self, data: bytes, claimed_sha: str | None) -> tuple[str, list[str]]:
        """``POST /api/v1/code``: store the archive, then copy it to up to ``code_copies`` other
        active members before answering, so the run outlives this host. Returns the SHA-256 and
        the names of the members that hold a copy."""
        sha = await self.put_code(data, claimed_sha)
        holders = await self.code.push(
            sha, data, push_targets(self.state.nodes, self.node_id), self.settings.code_copies
        )
        return sha, [self.state.nodes[h].name for h in holders if h in self.state.nodes]

    async def put_code(self, data: bytes, claimed_sha: str | None) -> str:
        """Store an archive here only (a copy pushed by the member that accepted it)."""
        try:
            return await self.code.put(data, claimed_sha)
        except CodeDigestError as e:
            raise Problem(400, "code archive corrupted in transit", str(e), "bad_digest") from None
        except ArchiveRefused as e:
            raise Problem(e.status, "code archive refused", str(e), e.code) from None

    async def submit(self, body: SubmitBody) -> tuple[RunRecord, bool]:
        """Submit a run; returns it and whether an active run was updated in place instead."""
        config = await parse_run_config_async(
            body.config,
            body.filename,
            400,
            "submit a task, service or dev-environment; {type}s are applied with their own command",
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
            if not self.code.has(body.code_sha256):
                raise Problem(
                    400,
                    "unknown code archive",
                    "upload it first (POST /api/v1/code) to the node you submit to",
                    "unknown_code",
                )
            code = CodeRef(
                sha256=body.code_sha256,
                size=self.code.path(body.code_sha256).stat().st_size,
                node_id=self.node_id,
                holders=self.code.holders(body.code_sha256),
            )
        config_json = to_json(config)
        if body.in_place and chosen:
            updated = await self._update_in_place(chosen, config_json, body.run_args)
            if updated is not None:
                return updated, True
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
            if result.code == "duplicate":  # this request was applied before: find its run
                name = self.state.requests.get(rid)
                result = (
                    Result(True, name)
                    if name is not None
                    else Result(
                        False,
                        error="this request id was already used by a submission that was "
                        "refused; submit again with a new request id",
                        code="request_id_used",
                    )
                )
            if result.ok or chosen or result.code != "name_in_use":
                break
        if not result.ok:
            raise Problem(
                409 if result.code == "name_in_use" else 400,
                "run not submitted",
                result.error,
                result.code,
            )
        return self.state.runs[result.value], False

    async def _update_in_place(
        self, name: str, config: dict[str, Any], run_args: list[str]
    ) -> RunRecord | None:
        """dstack's in-place update: an active run whose configuration differs from ``config``
        only in ``priority`` takes the new priority rather than a new submission. None when the
        run is not such a run (a name in use is then refused as ever). The working directory is
        not compared: the configuration file usually lives in it."""
        run = self.state.runs.get(name)
        if run is None or run.status.is_finished() or run.termination_reason is not None:
            return None
        priority = int(config.get("priority") or 0)
        rest = {k: v for k, v in config.items() if k != "priority"}
        if (
            priority == run.priority
            or run.run_args != run_args
            or rest != {k: v for k, v in run.config.items() if k != "priority"}
        ):
            return None
        return await self.set_priority(name, priority)

    def _generate_name(self) -> str:
        rng = _NAME_RNG
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

    async def set_priority(self, name: str, priority: int) -> RunRecord:
        if name not in self.state.runs:
            raise Problem(
                404, "run not found", f"no run named {name!r}; see meshgpu ps -a", "not_found"
            )
        cmd = SetRunPriority(at=time.time(), run_name=name, priority=priority)
        result: Result = await self._propose(encode(cmd))
        if not result.ok:
            status = 404 if result.code == "not_found" else 409
            raise Problem(status, "priority not changed", result.error, result.code)
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

    async def proxy_logs(self, api_url: str, run: str, job: int, follow: bool, auth: str) -> Any:
        params = {"job": job, "follow": str(follow).lower()}
        async with self.http_client(timeout=httpx.Timeout(30, read=None)) as c:
            try:
                async with c.stream(
                    "GET",
                    f"{api_url}/api/v1/runs/{run}/logs",
                    params=params,
                    headers={"Authorization": auth},
                ) as r:
                    async for chunk in r.aiter_bytes():
                        yield chunk
            except httpx.TransportError as e:
                yield f"\n[meshgpu: the log stream from {api_url} broke: {e}]\n".encode()

    def _ended_on_disk(self, job_id: str) -> bool:
        """Nothing more will be written to the job's log here: its supervisor recorded the end,
        or the job never started on this host (it failed before launch: no record, no log)."""
        if self.runner.result(job_id) is not None:
            return True
        try:
            return not (self.runner.job_dir(job_id) / "job.json").exists()
        except ValueError:
            return True


def _listen(bind: str, port: int) -> socket.socket:
    """A listening TCP socket for the API (``bind`` empty or unspecified: every address)."""
    host = bind.strip("[]") or None
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and is_unspecified(bind):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(address)
        sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock
