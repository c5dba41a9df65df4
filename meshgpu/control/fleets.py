"""The SSH fleets' controller, on the leader (``terms.leader_controllers``): brings each host of
each fleet to the state the replicated record asks for (``meshgpu/state/fleets.py``) --

* ``provisioning``: connect over SSH (through ``proxy_jump`` when given), check the host,
  copy the agent file, start the agent with a single-use join token and the fleet's labels,
  wait until it has joined (as a learner) and registered -> ``active``;
* a failure -> ``failed`` with the reason, retried with backoff (each host on its own: one
  host never holds up another);
* ``terminating``: drain (no new work, running jobs stopped gracefully), take the member out of
  Raft while it still answers, stop the agent and remove what was installed -> forgotten.

Restartable and idempotent: each step is recorded before it is relied on (the token id before
the agent is started with it), so a new leader continues: a host whose token was used has
joined; a host whose agent still runs with an unused token is waited for, not started again.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from cryptography.hazmat.primitives import serialization

from consensus.core import ProposalDropped
from consensus.node import NotLeader, Timeout
from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.state.cluster import ForgetNode, RemoveMember, SetNodeStatus, encode_cluster
from meshgpu.state.codec import encode
from meshgpu.state.commands import StopRun
from meshgpu.state.fleets import ForgetFleetHost, UpdateFleetHost

if TYPE_CHECKING:
    from meshgpu.devenv.aio import AsyncioThread
    from meshgpu.replica.proposer import Proposer
    from meshgpu.state import StateMachine
    from meshgpu.state.cluster import ClusterState
    from meshgpu.state.fleets import Fleet, FleetHost

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 120.0
TOKEN_TTL_S = 900.0
DRAIN_TIMEOUT_S = 60.0


def backoff_s(attempts: int) -> float:
    return float(min(60, 2 ** max(1, attempts)))


class FleetController:
    def __init__(
        self,
        node: Any,  # RaftNode
        cluster: ClusterState,
        state: StateMachine,
        proposer: Proposer,
        create_token: Callable[..., Any],  # Tokens.create
        ca_key_path: Path,
        agent_file: Callable[[], Path],
        bridge: Callable[[], AsyncioThread],
        clock: Clock = SYSTEM_CLOCK,
        interval_s: float = 0.3,
    ) -> None:
        self.node, self.cluster, self.state, self.proposer = node, cluster, state, proposer
        self.create_token = create_token
        self.ca_key_path = ca_key_path
        self.agent_file, self.bridge = agent_file, bridge
        self.clock, self.interval_s = clock, interval_s
        self.busy: set[tuple[str, str]] = set()
        # The last bootstrap's steps per host (name, seconds), for the log.
        self.steps: dict[tuple[str, str], list[tuple[str, float]]] = {}
        self._file_cache: tuple[tuple[str, int, int], dict[str, str], str] | None = None

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                self.tick(nursery)
                await self.clock.sleep(self.interval_s)

    def tick(self, nursery: trio.Nursery) -> None:
        now = self.clock.wall()
        for f in list(self.cluster.fleets.fleets.values()):
            for h in list(f.hosts.values()):
                key = (f.name, h.hostname)
                if key in self.busy:
                    continue
                if h.state == "provisioning" or (h.state == "failed" and h.retry_at <= now):
                    self.busy.add(key)
                    nursery.start_soon(self._guarded, key, self.provision)
                elif h.state == "terminating":
                    self.busy.add(key)
                    nursery.start_soon(self._guarded, key, self.terminate)

    async def _guarded(self, key: tuple[str, str], step: Callable[[str, str], Any]) -> None:
        try:
            await step(*key)
        except (NotLeader, Timeout, ProposalDropped, StorageFull) as e:
            log.info("fleet %s host %s: deferred (%s)", key[0], key[1], e)
        finally:
            self.busy.discard(key)

    def _host(self, fleet: str, hostname: str) -> tuple[Fleet, FleetHost] | None:
        f = self.cluster.fleets.fleets.get(fleet)
        h = f.hosts.get(hostname) if f else None
        return (f, h) if f is not None and h is not None else None

    async def _update(self, fleet: str, hostname: str, **fields: Any) -> bool:
        cmd = UpdateFleetHost(at=self.clock.wall(), name=fleet, hostname=hostname, **fields)
        result = await self.proposer.propose(encode_cluster(cmd))
        return bool(result.ok)

    # -- provisioning ----------------------------------------------------------------------

    async def provision(self, fleet: str, hostname: str) -> None:
        found = self._host(fleet, hostname)
        if found is None:
            return
        f, h = found
        if h.state == "failed":
            await self._update(
                fleet,
                hostname,
                state="provisioning",
                reason=f"retrying (attempt {h.attempts + 1}) after: {h.reason}",
                if_state="failed",
            )
        t0 = self.clock.now()
        try:
            node_id = await self._bootstrap(f, h)
            started = self.clock.now() - t0
            rid = await self._wait_joined(fleet, hostname, node_id)
        except Exception as e:  # noqa: BLE001 - every failure is this host's, shown and retried
            if isinstance(e, NotLeader | Timeout | ProposalDropped | StorageFull):
                raise
            found = self._host(fleet, hostname)
            attempts = (found[1].attempts if found else 0) + 1
            reason = str(e) or type(e).__name__
            log.warning("fleet %s host %s failed: %s", fleet, hostname, reason)
            await self._update(
                fleet,
                hostname,
                state="failed",
                reason=reason,
                attempts=attempts,
                retry_at=self.clock.wall() + backoff_s(attempts),
                if_state="provisioning",
            )
            return
        await self._update(
            fleet,
            hostname,
            state="active",
            reason="",
            attempts=0,
            node_id=node_id,
            raft_id=rid,
            if_state="provisioning",
        )
        steps = ", ".join(f"{n} {s:.2f}" for n, s in self.steps.pop((fleet, hostname), []))
        log.info(
            "fleet %s host %s joined as %s (agent started in %.2f s [%s], joined %.2f s later)",
            fleet,
            hostname,
            node_id or self._joined_node(self._host(fleet, hostname)[1].token_id),  # type: ignore[index]
            started,
            steps,
            self.clock.now() - t0 - started,
        )

    def _joined_node(self, token_id: str) -> str:
        tok = self.cluster.tokens.get(token_id) if token_id else None
        used = tok.get("used_by", []) if tok else []
        return used[0] if used else ""

    def _token_usable(self, token_id: str) -> bool:
        tok = self.cluster.tokens.get(token_id) if token_id else None
        return bool(
            tok
            and not tok.get("revoked")
            and (tok["expires_at"] is None or tok["expires_at"] > time.time() + 60)
        )

    async def _bootstrap(self, f: Fleet, h: FleetHost) -> str:
        """Start the agent on the host (unless it already joined); the node id, or '' while
        unknown (the join is awaited by token)."""
        joined = self._joined_node(h.token_id)
        if joined:
            return joined  # a previous leader started it, and it joined
        from meshgpu.fleets import ssh

        spec = f.spec
        cfg = spec.get("ssh_config") or {}
        host_cfg = next(
            (x for x in cfg.get("hosts", []) if x.get("hostname") == h.hostname),
            {"hostname": h.hostname},
        )
        target = self._target(f, cfg, host_cfg)
        steps = self.steps[(f.name, h.hostname)] = []
        t = self.clock.now()

        def step(name: str) -> None:
            nonlocal t
            now = self.clock.now()
            steps.append((name, now - t))
            t = now

        path = await trio.to_thread.run_sync(self.agent_file)
        info, local_sha = await trio.to_thread.run_sync(self._file_facts, path)
        bridge = self.bridge()
        step("file")

        # Connect and look (asyncio side): the facts decide the rest.
        async def look() -> tuple[Any, str, Any]:
            conn, fp = await ssh.connect(target, h.host_key)
            try:
                facts = ssh.parse_facts(await ssh.run(conn, ssh.facts_script(f.name)))
            except BaseException:
                conn.close()
                raise
            return conn, fp, facts

        conn, fp, facts = await bridge.run(look())
        step("connect+check")
        try:
            if not h.host_key:
                await self._update(f.name, h.hostname, host_key=fp)
            ssh.check_facts(facts, info.get("python", ""))
            token_id = h.token_id
            reuse = facts.running and self._token_usable(token_id) and facts.pyz_sha == local_sha
            if reuse:
                return ""  # started by a previous leader with a token still unused: wait for it
            token = await self.create_token(TOKEN_TTL_S)
            token_id = _token_id(token)
            # Recorded before the agent gets it: a new leader knows which token to watch.
            await self._update(f.name, h.hostname, token_id=token_id, if_state="provisioning")
            step("token")
            args = self._agent_args(f, h, host_cfg, facts)
            env = self._env(f)
            env["MESHGPU_FLEET_ENV"] = ",".join(sorted(env))  # passed on to every job here
            env["MESHGPU_JOIN_TOKEN"] = token
            script = ssh.install_script(
                f.name, facts.home, args, env, facts.systemd, restart=facts.running
            )

            if facts.pyz_sha != local_sha:
                await bridge.run(ssh.put_file(conn, path, f"{facts.home}/meshgpu.pyz"))
                step("copy")
            await bridge.run(ssh.run(conn, script))
            step("start")
        finally:
            conn.close()
        return ""

    def _file_facts(self, path: Path) -> tuple[dict[str, str], str]:
        """What the agent file says about itself, and its SHA-256 (hashed once per file
        version, not per host: it is 15 MB)."""
        from meshgpu.fleets import pyz, ssh

        st = path.stat()
        key = (str(path), st.st_size, st.st_mtime_ns)
        if self._file_cache is None or self._file_cache[0] != key:
            self._file_cache = (key, pyz.file_info(path), ssh.sha256(path))
        return self._file_cache[1], self._file_cache[2]

    def _target(self, f: Fleet, cfg: dict[str, Any], host: dict[str, Any]) -> Any:
        from meshgpu.fleets.ssh import HostError, Target

        def key(ref: str | None) -> str:
            if not ref:
                raise HostError("no identity_file for this host (give ssh_config.identity_file)")
            sealed = f.keys.get(ref)
            if sealed is None:
                raise HostError(f"the fleet has no key {ref}: apply the fleet again")
            return self._unseal(sealed)

        user = host.get("user") or cfg.get("user") or "root"
        ident = host.get("identity_file") or cfg.get("identity_file")
        proxy_cfg = host.get("proxy_jump") or cfg.get("proxy_jump")
        proxy = None
        if proxy_cfg:
            proxy = Target(
                hostname=proxy_cfg["hostname"],
                port=int(proxy_cfg.get("port") or 22),
                user=proxy_cfg.get("user") or user,
                key=key(proxy_cfg.get("identity_file") or ident),
            )
        return Target(
            hostname=host["hostname"],
            port=int(host.get("port") or cfg.get("port") or 22),
            user=user,
            key=key(ident),
            proxy=proxy,
        )

    def _env(self, f: Fleet) -> dict[str, str]:
        """The fleet's env, its values unsealed (plaintext in fleets applied before they were
        sealed)."""
        from meshgpu.fleets.ssh import HostError

        if not f.env_sealed:
            env = f.spec.get("env") or {}
            return {str(k): str(v) for k, v in env.items() if v is not None}
        try:
            doc = json.loads(self._unseal(f.env_sealed))
        except ValueError as e:
            raise HostError(f"the fleet's sealed env is unreadable ({e}): apply it again") from None
        return {str(k): str(v) for k, v in doc.items()}

    def _unseal(self, sealed_hex: str) -> str:
        from meshgpu.fleets.ssh import HostError
        from meshgpu.security import unseal

        try:
            ca_key = serialization.load_pem_private_key(
                self.ca_key_path.read_bytes(), password=None
            )
            return unseal(bytes.fromhex(sealed_hex), ca_key).decode()  # type: ignore[arg-type]
        except (OSError, ValueError) as e:
            raise HostError(f"this leader cannot open the fleet's key: {e}") from None

    def _agent_args(
        self, f: Fleet, h: FleetHost, host_cfg: dict[str, Any], facts: Any
    ) -> list[str]:
        from ipaddress import ip_address, ip_network

        spec, cfg = f.spec, f.spec.get("ssh_config") or {}
        labels = {"fleet": f.name, "instance": str(h.num)}
        if spec.get("placement") == "cluster":
            labels["cluster"] = f.name
        advertise = host_cfg.get("internal_ip")
        if not advertise and cfg.get("network"):
            net = ip_network(cfg["network"])
            advertise = next((a for a in facts.addresses if ip_address(a) in net), None)
        advertise = advertise or h.hostname
        members = [m.peer_address for m in self.cluster.members.values() if not m.removed]
        blocks = host_cfg.get("blocks", spec.get("blocks", 1))
        args = [
            "agent",
            "--data-dir",
            f"{facts.home}/data",
            "--name",
            f"{f.name}-{h.num}",
            "--bind",
            "0.0.0.0",
            "--advertise",
            advertise,
            "--labels",
            ",".join(f"{k}={v}" for k, v in labels.items()),
            "--join",
            ",".join(members),
            "--no-mdns",
        ]
        if blocks not in (None, 1):
            args += ["--blocks", str(blocks)]
        return args

    async def _wait_joined(self, fleet: str, hostname: str, node_id: str) -> int | None:
        """Wait until the host joined (its token used) and registered; its Raft id."""
        from meshgpu.fleets.ssh import HostError

        deadline = self.clock.now() + JOIN_TIMEOUT_S
        while True:
            found = self._host(fleet, hostname)
            if found is None or found[1].state != "provisioning":
                raise HostError("no longer provisioning")
            node_id = node_id or self._joined_node(found[1].token_id)
            if node_id and node_id in self.state.nodes:
                m = self.cluster.member_by_node(node_id)
                return m.raft_id if m else None
            if self.clock.now() > deadline:
                raise HostError(
                    f"the agent was started but did not join within {JOIN_TIMEOUT_S:g} s "
                    f"(its log: {found[0].name}'s host, agent.log in the install dir)"
                )
            await self.clock.sleep(0.1)

    # -- terminating -----------------------------------------------------------------------

    async def terminate(self, fleet: str, hostname: str) -> None:
        found = self._host(fleet, hostname)
        if found is None:
            return
        f, h = found
        node_id = h.node_id or self._joined_node(h.token_id)
        if node_id:
            await self._drain(node_id)
            m = self.cluster.member_by_node(node_id)
            if m is not None:
                st = self.node.status()
                if m.raft_id in st["voters"] or m.raft_id in st["learners"]:
                    await self.node.remove(m.raft_id)
                await self.proposer.propose(
                    encode_cluster(RemoveMember(at=self.clock.wall(), raft_id=m.raft_id))
                )
        note = ""
        try:
            await self._uninstall(f, h)
        except Exception as e:  # noqa: BLE001 - an unreachable host must not stay forever
            from meshgpu.fleets.ssh import HostError

            if not isinstance(e, HostError | OSError):
                raise
            note = str(e)
            log.warning("fleet %s host %s: not cleaned up: %s", fleet, hostname, note)
        if node_id and node_id in self.state.nodes:  # gone from the mesh: its record goes too
            await self.proposer.propose(
                encode_cluster(ForgetNode(at=self.clock.wall(), node_id=node_id))
            )
        await self.proposer.propose(
            encode_cluster(ForgetFleetHost(at=self.clock.wall(), name=fleet, hostname=hostname))
        )
        log.info("fleet %s host %s removed%s", fleet, hostname, f" ({note})" if note else "")

    async def _drain(self, node_id: str) -> None:
        await drain_node(self.state, self.proposer, self.clock, node_id)

    async def _uninstall(self, f: Fleet, h: FleetHost) -> None:
        from meshgpu.fleets import ssh

        if not h.host_key:
            return  # never reached: nothing was installed
        cfg = f.spec.get("ssh_config") or {}
        host_cfg = next(
            (x for x in cfg.get("hosts", []) if x.get("hostname") == h.hostname),
            {"hostname": h.hostname},
        )
        target = self._target(f, cfg, host_cfg)

        async def go() -> None:
            conn, _ = await ssh.connect(target, h.host_key)
            try:
                await ssh.run(conn, ssh.uninstall_script(f.name), timeout=60)
            finally:
                conn.close()

        await self.bridge().run(go())


def _token_id(token: str) -> str:
    from meshgpu.security import JoinToken

    return JoinToken.parse(token).token_id


async def drain_node(
    state: Any, proposer: Any, clock: Clock, node_id: str, timeout_s: float = DRAIN_TIMEOUT_S
) -> None:
    """A fleet host leaving (SSH or backend fleet): no new work for it (``draining``), its runs
    asked to stop gracefully, then wait (bounded) until none is left there."""
    node = state.nodes.get(node_id)
    if node is not None and node.status != "draining":
        await proposer.propose(
            encode_cluster(SetNodeStatus(at=clock.wall(), node_id=node_id, status="draining"))
        )

    def running() -> set[str]:
        return {
            j.run_name
            for j in state.jobs.values()
            if j.node_id == node_id and not j.status.is_finished()
        }

    for run in running():
        await proposer.propose(encode(StopRun(at=clock.wall(), run_name=run)))
    deadline = clock.now() + timeout_s
    while running() and clock.now() < deadline:
        await clock.sleep(0.2)
