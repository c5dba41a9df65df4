"""One meshgpu agent: the composition root. It builds the parts in order and runs them in one
trio nursery, serving no request before the parts it needs exist:

1. identity (``host/identity.py``): restart as ourselves, join with a token, or found a mesh;
2. the replicated state (``replica/``): the Raft node over the state machine, on the peer port
   (which also carries gossip and the members' calls to each other, ``peer/``);
3. host duties (``host/``, ``runner/``, ``mesh/``): the executor, gossip, fencing, registration,
   housekeeping;
4. the use cases (``ops/``) and the API over them (``api/``);
5. the leader's controllers (``control/``), in a nursery per term of leadership.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING, Any

import trio

from consensus.transport import TLSConfig, Transport
from meshgpu.api.server import listen, serve_front
from meshgpu.client.archive import ArchiveLimits
from meshgpu.client.http import write_profile
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.control import Demand
from meshgpu.control.fleet_parts import fleet_controllers
from meshgpu.control.secret_keys import SecretKeys
from meshgpu.control.terms import leader_controllers
from meshgpu.devenv.monitor import AutoStop
from meshgpu.devenv.sessions import SessionTracker
from meshgpu.devenv.sshd import start_ssh_server
from meshgpu.gpu import FakeProvider, detect
from meshgpu.gpu.health import HealthTracker
from meshgpu.host.fencing import Fencing
from meshgpu.host.founding import found_cluster
from meshgpu.host.housekeeping import Housekeeping
from meshgpu.host.identity import HostIdentity
from meshgpu.host.registration import Registration
from meshgpu.mesh.discovery import Advertiser
from meshgpu.mesh.membership import MembershipManager
from meshgpu.mesh.node_gossip import GossipHost, MeshGossip
from meshgpu.ops import Services
from meshgpu.ops.assembly import Parts, assemble
from meshgpu.ops.peers import answers
from meshgpu.peer import PeerClient, PeerCodeLink, PeerServer, members_of
from meshgpu.replica import Leadership, RaftProposer, follow_applied, follow_version
from meshgpu.replica.raft import open_replica, start_replica, wait_leader
from meshgpu.runner import ProcessRunner
from meshgpu.runner.code import CodeStore
from meshgpu.runner.confine import Confinement
from meshgpu.runner.executor import Executor
from meshgpu.services.nginx import MISSING, NginxError, NginxPlane, find_nginx
from meshgpu.services.probes import Prober
from meshgpu.services.stats import ServiceCounters
from meshgpu.settings import AgentSettings
from meshgpu.state.cluster import Replicated

if TYPE_CHECKING:
    from consensus.node import RaftNode

log = logging.getLogger(__name__)

__all__ = ["Agent", "AgentSettings"]


class Agent:
    def __init__(self, settings: AgentSettings, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = s = settings
        self.clock = clock  # the executor's, fencing's, the controllers' (meshgpu/clock.py)
        self.identity = HostIdentity(settings)  # the data dir made private first
        self.node_name = s.name
        self.replicated = Replicated()
        # The process jobs' sandbox here (meshgpu/runner/confine.py): detected now, the job
        # user created once (not per job).
        self.confine = Confinement(s.job_user) if s.sandbox else None
        if self.confine is not None:
            self.confine.prepare_host()
        self.runner = ProcessRunner(s.data_dir / "jobs", workspace_dir=s.workspace_dir)
        self.gpus = detect(
            s.fake_gpus, seed=self.identity.node_id, state_file=s.data_dir / "fake-gpu-state.json"
        )
        # Calls to other members ride the mutual-TLS peer port, once the transport runs.
        self.transport: Transport | None = None
        self.peer = PeerClient(lambda: self.transport, members_of(self.replicated.cluster))
        self.code = CodeStore(
            s.data_dir / "code",
            PeerCodeLink(self.peer),
            limit=s.code_limit,
            archive_limits=ArchiveLimits.for_upload_limit(
                s.code_limit, s.code_expanded_limit, s.code_max_files
            ),
            min_free=s.min_free,
        )
        self.join_token: str | None = None  # a founder's startup token (join-token.json)
        self.node: RaftNode | None = None  # opened in run()
        # This node's ingress counters: the ingress counts, gossip publishes them for the
        # leader's autoscaler, /metrics reads them (the one instance).
        self.counters = ServiceCounters()
        # Who is attached to which job here: the SSH server opens and closes sessions, the
        # auto-stop monitor reads them (the one instance).
        self.sessions = SessionTracker(clock)
        self.autostop: AutoStop | None = None  # built in run(), beside the executor
        self.ssh_address: str | None = None  # host:port of the SSH server, once it listens

    @property
    def peer_address(self) -> str:
        return self.identity.peer_address

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        s, ident, clock = self.settings, self.identity, self.clock
        state, cluster = self.replicated.jobs, self.replicated.cluster
        async with trio.open_nursery() as nursery:
            # 1. Identity. The API socket is bound first (the API URL names its real port);
            # it is served once the use cases it calls exist (by nginx with --data-plane
            # nginx: a stale one a crashed agent left holding the port is stopped first).
            nginx = self._nginx_binary()
            if nginx is not None:
                nginx_prefix = s.data_dir / "nginx"
                NginxPlane.prepare_dir(nginx_prefix)
            api_socket = listen(s.bind, s.api_port)
            ident.api_port = api_socket.getsockname()[1]
            await ident.choose_host(ident.known_member_hosts())
            founding = await ident.establish()

            # 2. The replicated state, and what reacts to its applied entries.
            peers = ident.peers()
            self.node = node = open_replica(
                ident.raft_id,
                str(s.data_dir / "raft"),
                peers,
                self.replicated,
                tick_s=s.tick_s,
                min_free=s.min_free,
            )
            proposer = RaftProposer(node)
            executor = Executor(
                ident.node_id,
                state,
                self.runner,
                proposer.propose,
                s.data_dir / "code",
                self._gpu_vendor,
                on_busy=self.gpus.set_busy
                if isinstance(self.gpus, FakeProvider)
                else lambda _: None,
                code=self.code,
                clock=clock,
                confine=self.confine,
            )
            prober = Prober(ident.node_id, state, proposer.propose, clock=clock)
            self.autostop = autostop = AutoStop(
                ident.node_id,
                state,
                executor,
                self.sessions,
                proposer.propose,
                clock=clock,
                interval_s=s.autostop_interval_s,
                window_scale=s.utilization_window_scale,
            )
            demand = Demand()
            peer_server = PeerServer()  # gossip and peer calls; answers once the use cases exist
            tls = TLSConfig.from_files(ident.tls.files)
            self.transport = transport = await start_replica(
                nursery, node, peers, tls, s.bind, s.peer_port, peer_server.handle
            )
            if s.peer_port == 0:  # bound to a free port: advertise the real one
                ident.bound_peer_port(transport.port)
            # What reacts to applied entries, each in its own task (the Raft owner task only
            # says how far it applied): the executor, the scheduler's demand, the member list.
            seen = cluster.version
            await ident.follow_members(cluster, node, transport)
            nursery.start_soon(follow_applied, node, executor.notify)
            nursery.start_soon(follow_applied, node, lambda _: demand.notify())
            nursery.start_soon(follow_applied, node, prober.notify)
            nursery.start_soon(follow_applied, node, autostop.notify)
            members = partial(ident.follow_members, cluster, node, transport)
            nursery.start_soon(follow_version, node, lambda: cluster.version, members, seen)

            # 3. Host duties.
            fence_s = s.membership.dead_grace_s * s.membership.fence_fraction
            fencing = Fencing(node, executor, fence_s, clock=clock)
            health = HealthTracker(s.gpu_healthy_checks)  # fed by gossip's samples only
            gossip = MeshGossip(
                GossipHost(
                    node_id=ident.node_id,
                    raft_id=ident.raft_id,
                    name=self.node_name,
                    api_url=ident.api_url,
                    labels=s.labels,
                    bind=s.bind,
                    peer_port=s.peer_port,
                    peer_address=ident.peer_address,
                    transport=transport,
                    cluster=cluster,
                    state=state,
                    local_jobs=lambda: executor.local,
                    cut_off=lambda: fencing.cut_off,
                    telemetry=lambda: health.apply(self.gpus.telemetry()),
                    service_counters=self.counters.snapshot,
                    on_telemetry=autostop.record_telemetry,
                ),
                s.gossip,
            )

            # 4. The use cases and the API over them (it answers while a restart waits for a
            # quorum: reads are local, writes wait for a leader up to their deadline).
            services = self._services(node, proposer, gossip)
            nursery.start_soon(services.metrics.sample_forever, s.history_interval_s)
            if services.rates is not None:
                nursery.start_soon(services.rates.run)
            if services.ingress is not None:  # held requests wake on applied entries
                nursery.start_soon(follow_applied, node, services.ingress.notify)
                nursery.start_soon(services.ingress.run)
            peer_server.serve(answers(services, cluster, gossip.handle_request))
            executor.secrets = partial(
                fetch_job_secrets, services, cluster, self.peer, ident.node_id, ident.tls
            )
            await serve_front(
                nursery,
                api_socket,
                services,
                ident.tls if s.api_tls else None,
                (nginx, nginx_prefix) if nginx is not None else None,
                lambda notify: nursery.start_soon(follow_applied, node, notify),
                s.ingress_domain,
                s.nginx_workers,
            )
            # The SSH server into this host's jobs (its address and host key go in our record).
            self.ssh_address, host_pub = await start_ssh_server(
                nursery,
                s.data_dir,
                ident.node_id,
                state,
                cluster,
                self.sessions,
                s.bind,
                s.ssh_port,
                ident.host,
                lambda notify: nursery.start_soon(follow_applied, node, notify),
                secret_env=executor.session_secrets,
            )
            await wait_leader(node)
            if founding:
                self.join_token = await found_cluster(ident, proposer, services.tokens)
            registration = Registration(
                ident,
                s,
                self.gpus,
                executor,
                state,
                node,
                proposer,
                clock=clock,
                ssh=(self.ssh_address, host_pub),
            )
            await registration.register()
            await nursery.start(executor.run)
            housekeeping = Housekeeping(state, executor, self.code, s.retention_interval_s, clock)
            for duty in (gossip, fencing, registration, housekeeping, prober, autostop):
                nursery.start_soon(duty.run)

            # 5. The leader's controllers, for each term this node leads.
            membership = MembershipManager(
                node,
                cluster,
                ident.tls,
                None,
                proposer.propose,
                s.membership,
                jobs=state,
                gossip=gossip,
                clock=clock,
            )
            leadership = Leadership(
                node,
                leader_controllers(
                    node,
                    state,
                    cluster,
                    proposer,
                    demand,
                    membership.run,
                    gossip.service_counters,
                    ident.node_id,
                    self.counters.snapshot,
                    s,
                    clock,
                    *fleet_controllers(
                        node,
                        self.replicated,
                        proposer,
                        services.tokens.create,
                        ident.tls.ca_key_path,
                        s.data_dir,
                        clock,
                    ),
                    SecretKeys(services.access, clock=clock).run if services.access else None,
                ),
            )
            nursery.start_soon(leadership.run)

            if s.mdns:
                cluster_id = cluster.cluster_id or ident.cluster_id
                adv = Advertiser(
                    self.node_name, cluster_id, ident.api_url, ident.peer_address, ident.host
                )
                nursery.start_soon(adv.run)
            if s.write_client_profile:
                write_profile(
                    s.data_dir / "client.toml",
                    ident.api_url,
                    ident.admin_token,
                    ca=ident.tls.files.ca_cert.read_text() if s.api_tls else None,
                )
            log.info(
                "agent node=%s raft_id=%s api=%s ready", self.node_name, node.id, ident.api_url
            )
            task_status.started(ident.api_url)

    def _services(self, node: RaftNode, proposer: RaftProposer, gossip: MeshGossip) -> Services:
        return assemble(
            self.settings,
            self.identity,
            self.node_name,
            node,
            proposer,
            self.replicated,
            gossip,
            Parts(self.code, self.runner, self.gpus, self.peer, self.counters),
        )

    def _nginx_binary(self) -> str | None:
        if self.settings.data_plane != "nginx":
            return None
        found = find_nginx()
        if found is None:
            raise NginxError(MISSING)
        return found

    def _gpu_vendor(self) -> str | None:
        inv = self.gpus.inventory()
        return inv[0].vendor if inv else None

    async def aclose(self) -> None:
        """After ``run`` is cancelled: release what outlives the nursery. Jobs keep running."""
        with trio.CancelScope(shield=True):
            await self.runner.aclose()
        if self.node is not None:
            self.node.storage.close()


async def fetch_job_secrets(
    services: Any, cluster: Any, peer: Any, node_id: str, tls: Any, job_id: str
) -> dict[str, str]:
    """A job's project secrets for this host: opened here if this host is a voter (it holds
    the CA key), else from the leader or another voter over the peer port (mutual TLS; the
    callee checks the job is this host's)."""
    from meshgpu.errors import MeshError

    if services.access is not None and tls.ca_key_path.exists():
        return await services.access.resolve_for_job(node_id, job_id)  # type: ignore[no-any-return]
    holders = [
        m
        for m in cluster.members.values()
        if not m.removed
        and m.node_id != node_id
        and (m.raft_id in cluster.ca_grants or not m.csr_pem)
    ]
    last: Exception | None = None
    for m in holders:
        try:
            return await peer.secrets(m.node_id, job_id, timeout=10.0)  # type: ignore[no-any-return]
        except MeshError as e:
            last = e
    raise RuntimeError(f"no voter could give this job its secrets: {last or 'no voter known'}")
