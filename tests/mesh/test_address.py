"""The address an agent bound to every address advertises (meshgpu/mesh/address.py): the source
of the route to the mesh, else of the default route, else the first interface address -- never
0.0.0.0. The namespace cases run the choice inside real network namespaces (root only)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from meshgpu.mesh import address
from meshgpu.mesh.address import choose_address, host_port, is_unspecified, route_source


def test_a_specific_bind_address_is_advertised_as_it_is() -> None:
    assert choose_address("10.1.2.3", ["127.0.0.1"]) == "10.1.2.3"
    assert is_unspecified("0.0.0.0") and is_unspecified("::") and not is_unspecified("10.0.0.1")


def test_the_route_towards_the_mesh_picks_the_source_address() -> None:
    assert route_source("127.0.0.1") == "127.0.0.1"
    assert choose_address("0.0.0.0", ["127.0.0.1"]) == "127.0.0.1"
    assert route_source("no-such-host.invalid") is None
    assert route_source("127.0.0.1", family=socket.AF_INET6) is None  # "::" wants IPv6 only


def test_without_routes_the_first_interface_address_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(address, "route_source", lambda target, port=9, family=0: None)
    monkeypatch.setattr(address, "interface_addresses", lambda: ["fd00::7", "10.0.0.7"])
    assert choose_address("0.0.0.0", ["10.9.9.9"]) == "10.0.0.7"  # IPv4 socket: IPv4 address
    assert choose_address("::", ["10.9.9.9"]) == "fd00::7"  # the peer port is IPv6-only then
    monkeypatch.setattr(address, "interface_addresses", lambda: [])
    assert choose_address("0.0.0.0") == "127.0.0.1"


def test_interface_addresses_leave_out_loopback() -> None:
    found = address.interface_addresses()
    assert not any(a.startswith("127.") or a == "::1" for a in found), found


def test_host_port_brackets_ipv6() -> None:
    assert host_port("10.0.0.1", 7480) == "10.0.0.1:7480"
    assert host_port("fd00::1", 7481) == "[fd00::1]:7481"


def _netns_reason() -> str:
    from tests.e2e.netns import available

    return available()


@pytest.mark.skipif(bool(_netns_reason()), reason=_netns_reason() or "ok")
def test_inside_namespaces_the_namespace_address_is_chosen() -> None:
    from tests.e2e.netns import Net

    net = Net.create(2)
    try:
        a, b = net.hosts
        code = (
            "import sys; from meshgpu.mesh.address import choose_address; "
            "print(choose_address('0.0.0.0', sys.argv[1:]))"
        )
        root = str(Path(__file__).resolve().parents[2])

        def choose(host: str, *targets: str) -> str:
            out = subprocess.run(
                ["ip", "netns", "exec", host, sys.executable, "-c", code, *targets],
                capture_output=True,
                text=True,
                check=True,
                timeout=30,
                cwd=root,
            )
            return out.stdout.strip()

        # No default route in these namespaces: the route to a peer, else eth0's address.
        assert choose(a.ns, b.ip) == a.ip
        assert choose(b.ns) == b.ip
        assert choose(b.ns, "192.0.2.1") == b.ip  # unroutable target: falls through
    finally:
        net.delete()


def test_join_urls_try_the_peer_address_then_the_api_port() -> None:
    from meshgpu.mesh.join import join_urls

    # Without a scheme: HTTPS (request_join tries plain HTTP after each, for --api-tls off).
    assert join_urls("10.0.0.2:7481") == ["https://10.0.0.2:7481", "https://10.0.0.2:7480"]
    assert join_urls("10.0.0.2") == ["https://10.0.0.2:7480"]
    assert join_urls("10.0.0.2:7480") == ["https://10.0.0.2:7480"]
    assert join_urls("http://10.0.0.2:9000/") == ["http://10.0.0.2:9000"]
