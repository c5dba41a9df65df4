"""The leader's two fleet controllers as the agent starts them each term: SSH fleets (sharing
one asyncio loop for asyncssh, started when a fleet first needs it) and backend fleets; both
hand new hosts the agent file this node runs from (or one built once into ``<data>/dist``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from meshgpu.clock import Clock
from meshgpu.control.backend_fleets import BackendFleetController
from meshgpu.control.fleets import FleetController


def fleet_controllers(
    node: Any,
    replicated: Any,
    proposer: Any,
    create_token: Callable[..., Any],
    ca_key_path: Path,
    data_dir: Path,
    clock: Clock,
) -> tuple[Callable[[], FleetController], Callable[[], BackendFleetController]]:
    """(SSH fleet controller, backend fleet controller) factories, a fresh one per term."""
    from meshgpu.devenv.aio import AsyncioThread
    from meshgpu.fleets.pyz import agent_file

    cache = data_dir / "dist"
    bridge: list[AsyncioThread] = []

    def get_bridge() -> AsyncioThread:
        if not bridge:
            bridge.append(AsyncioThread("fleet-ssh"))
            bridge[0].start()
        return bridge[0]

    def ssh() -> FleetController:
        return FleetController(
            node,
            replicated.cluster,
            replicated.jobs,
            proposer,
            create_token,
            ca_key_path,
            lambda: agent_file(cache),
            get_bridge,
            clock=clock,
        )

    def backend() -> BackendFleetController:
        return BackendFleetController(
            node,
            replicated.cluster,
            replicated.jobs,
            proposer,
            create_token,
            ca_key_path,
            lambda: agent_file(cache),
            clock=clock,
        )

    return ssh, backend
