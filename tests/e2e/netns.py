"""Hosts for end-to-end tests: network namespaces joined by a bridge, created and deleted by the
test itself (root required). Traffic stays inside these namespaces (10.213.N.0/24 on a bridge the
test owns); the root namespace reaches them through the bridge's own address."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), capture_output=True, text=True, check=check, timeout=30)


def available() -> str:
    """'' when the tests can run here, else why not."""
    if os.geteuid() != 0:
        return "network-namespace tests need root"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install iproute2 nftables)"
    return ""


@dataclass
class Host:
    ns: str
    ip: str
    ifname: str = "eth0"  # the same name in every namespace, as on real hosts (GLOO_SOCKET_IFNAME)


@dataclass
class Net:
    hosts: list[Host] = field(default_factory=list)
    bridge: str = ""
    subnet: int = 0

    @classmethod
    def create(cls, count: int) -> Net:
        tag = f"{random.randrange(16**4):04x}"
        net = cls(bridge=f"mgbr{tag}", subnet=random.randrange(1, 250))
        try:
            _run("ip", "link", "add", net.bridge, "type", "bridge")
            _run("ip", "addr", "add", f"10.213.{net.subnet}.254/24", "dev", net.bridge)
            _run("ip", "link", "set", net.bridge, "up")
            for i in range(1, count + 1):
                ns, veth = f"mg{tag}n{i}", f"mg{tag}v{i}"
                _run("ip", "netns", "add", ns)
                _run("ip", "link", "add", veth, "type", "veth", "peer", "name", f"{veth}b")
                _run("ip", "link", "set", veth, "netns", ns)
                host = Host(ns, f"10.213.{net.subnet}.{i}")
                _run("ip", "-n", ns, "link", "set", veth, "name", host.ifname)
                _run("ip", "link", "set", f"{veth}b", "master", net.bridge)
                _run("ip", "link", "set", f"{veth}b", "up")
                _run("ip", "-n", ns, "addr", "add", f"{host.ip}/24", "dev", host.ifname)
                _run("ip", "-n", ns, "link", "set", host.ifname, "up")
                _run("ip", "-n", ns, "link", "set", "lo", "up")
                # mDNS: multicast goes out of the veth
                _run("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", host.ifname)
                net.hosts.append(host)
        except BaseException:
            net.delete()
            raise
        return net

    def partition(self, side: list[Host]) -> None:
        """Drop all traffic between ``side`` and the other hosts (nftables, both directions)."""
        others = [h.ip for h in self.hosts if h not in side]
        for h in side:
            rules = "\n".join(
                [
                    "table inet mgpart {",
                    "  chain input { type filter hook input priority 0; policy accept;",
                    f"    ip saddr {{ {', '.join(others)} }} drop;",
                    "  }",
                    "  chain output { type filter hook output priority 0; policy accept;",
                    f"    ip daddr {{ {', '.join(others)} }} drop;",
                    "  }",
                    "}",
                ]
            )
            subprocess.run(
                ["ip", "netns", "exec", h.ns, "nft", "-f", "-"],
                input=rules,
                text=True,
                check=True,
                capture_output=True,
                timeout=30,
            )

    def heal(self) -> None:
        for h in self.hosts:
            _run(
                "ip", "netns", "exec", h.ns, "nft", "delete", "table", "inet", "mgpart", check=False
            )

    def delete(self) -> None:
        for h in self.hosts:
            _run("ip", "netns", "del", h.ns, check=False)
        if self.bridge:
            _run("ip", "link", "del", self.bridge, check=False)
