"""This host in the replicated state: its record (GPUs, CPUs, memory, labels, blocks) proposed
at start, and again when it comes back after being declared dead while cut off."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.gpu import collect_inventory
from meshgpu.runner.container import detect_runtime
from meshgpu.runner.toolchain import JobUser, Toolchain, discover
from meshgpu.state import GPURecord, NodeRecord, RegisterNode, encode

if TYPE_CHECKING:
    from consensus.node import RaftNode
    from meshgpu.gpu import GPUProvider
    from meshgpu.host.identity import HostIdentity
    from meshgpu.replica.proposer import Proposer
    from meshgpu.runner.executor import Executor
    from meshgpu.settings import AgentSettings
    from meshgpu.state import StateMachine

log = logging.getLogger(__name__)


class Registration:
    def __init__(
        self,
        identity: HostIdentity,
        settings: AgentSettings,
        gpus: GPUProvider,
        executor: Executor,
        state: StateMachine,
        node: RaftNode,
        proposer: Proposer,
        check_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
        ssh: tuple[str | None, str | None] = (None, None),
    ) -> None:
        self.clock = clock
        # This host's SSH server: "host:port" and its host key (OpenSSH public key line).
        self.ssh_address, self.ssh_host_key = ssh
        self.identity, self.settings, self.gpus = identity, settings, gpus
        self.executor, self.state, self.node, self.proposer = executor, state, node, proposer
        self.check_s = check_s  # how often a dead record of this host is looked for

    async def register(self) -> None:
        s, ident = self.settings, self.identity
        # What jobs' environments can be made with, as the job user sees the host (an
        # interpreter under a directory it cannot enter does not count): found once per agent
        # process, alongside the inventory.
        user = JobUser.named(getattr(s, "job_user", None))
        found: dict[str, Toolchain] = {}

        async def find_toolchain() -> None:
            found["tc"] = await trio.to_thread.run_sync(discover, user)

        async with trio.open_nursery() as nursery:
            if self.executor.toolchain is None:
                nursery.start_soon(find_toolchain)
            inv = await trio.to_thread.run_sync(collect_inventory, self.gpus, s.data_dir)
            runtime = await trio.to_thread.run_sync(detect_runtime)
        self.executor.container_runtime = runtime
        if "tc" in found:
            self.executor.toolchain = found["tc"]
        toolchain = self.executor.toolchain or Toolchain()
        cmd = RegisterNode(
            at=self.clock.wall(),
            node_id=ident.node_id,
            name=ident.name,
            api_url=ident.api_url,
            ssh_address=self.ssh_address,
            ssh_host_key=self.ssh_host_key,
            internal_ip=ident.host,
            labels=s.node_labels(),
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
            container_runtime=runtime.rsplit("/", 1)[-1] if runtime else None,
            sandbox=self.executor.confine.capabilities() if self.executor.confine else None,
            pythons=toolchain.versions(),
            nvcc=toolchain.nvcc is not None,
            blocks=s.blocks,
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
        await self.proposer.propose(encode(cmd))

    async def run(self) -> None:
        """Declared dead while cut off, and back: register again so the scheduler uses us."""
        while True:
            await self.clock.sleep(self.check_s)
            me = self.state.nodes.get(self.identity.node_id)
            if me is not None and me.status == "dead" and self.node.leader:
                log.info("this host was declared dead while unreachable; registering again")
                try:
                    await self.register()
                except Exception as e:  # no quorum yet: try again on the next round
                    log.info("re-registration deferred: %s", e)
