"""mDNS discovery (zeroconf): members advertise ``_meshgpu._tcp.local.`` with their cluster id,
API URL and peer address in TXT records (never a secret); a host with a join token browses for
members of the token's cluster.

zeroconf runs its own asyncio loop in a thread; the blocking calls (registering takes ~1.7 s of
probing) run in trio worker threads (reference/python-stack-notes.md §3).
"""

from __future__ import annotations

import logging
import socket
import time
from dataclasses import dataclass

import trio
from zeroconf import IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange, Zeroconf

log = logging.getLogger(__name__)
SERVICE = "_meshgpu._tcp.local."


@dataclass(frozen=True)
class Member:
    name: str
    cluster_id: str
    api_url: str
    peer_address: str


def _zeroconf(interface: str) -> Zeroconf:
    interfaces = [interface] if interface not in ("0.0.0.0", "") else None
    return Zeroconf(interfaces=interfaces or ["0.0.0.0"], ip_version=IPVersion.V4Only)


class Advertiser:
    """Announces this member while the agent runs."""

    def __init__(
        self, name: str, cluster_id: str, api_url: str, peer_address: str, address: str
    ) -> None:
        self.address = address
        host, _, port = api_url.rpartition(":")
        safe = "".join(ch if ch.isalnum() or ch == "-" else "-" for ch in name)[:50] or "node"
        self.info = ServiceInfo(
            SERVICE,
            f"{safe}-{cluster_id[:8]}.{SERVICE}",
            addresses=[socket.inet_aton(address)],
            port=int(port),
            properties={"cluster": cluster_id, "api": api_url, "peer": peer_address, "name": name},
            server=f"{safe}-{cluster_id[:8]}.local.",
        )
        self.zc: Zeroconf | None = None

    async def run(self) -> None:
        try:
            self.zc = await trio.to_thread.run_sync(_zeroconf, self.address)
            await trio.to_thread.run_sync(
                lambda: self.zc.register_service(self.info, allow_name_change=True)
            )
            log.info("mDNS: advertising %s", self.info.name)
            await trio.sleep_forever()
        finally:
            if self.zc is not None:
                zc = self.zc
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(
                        lambda: (zc.unregister_all_services(), zc.close())
                    )


def browse(cluster_id: str, interface: str, timeout: float = 5.0) -> list[Member]:
    """Blocking: members of ``cluster_id`` seen within ``timeout`` (call in a worker thread)."""
    zc = _zeroconf(interface)
    found: dict[str, Member] = {}

    def on_change(
        zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        if state_change is ServiceStateChange.Removed:
            return
        info = zeroconf.get_service_info(service_type, name, timeout=2000)
        if info is None:
            return
        props = {k.decode(): (v or b"").decode() for k, v in info.properties.items()}
        if props.get("cluster") == cluster_id and props.get("api"):
            found[name] = Member(
                props.get("name", name), cluster_id, props["api"], props.get("peer", "")
            )

    browser = ServiceBrowser(zc, SERVICE, handlers=[on_change])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not found:
            time.sleep(0.05)
        time.sleep(0.2 if found else 0)  # let the other members answer too
    finally:
        browser.cancel()
        zc.close()
    return list(found.values())
