"""Which of this host's addresses the mesh should use, when the agent listens on all of them.

An agent started with ``--bind 0.0.0.0`` (or ``::``) and no ``--advertise`` must still tell its
peers, and its jobs (``MESHGPU_MASTER_NODE_IP``, ``MESHGPU_NODES_IPS``), an address they can
reach. The best guess is the source address the kernel picks for the route towards the mesh: a
UDP socket ``connect()`` to a member's address selects it (it sends no packet). With no member
known yet (the first agent) the route to the default gateway stands in; a host with no default
route falls back to its first non-loopback interface address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import socket
import struct
from collections.abc import Iterable

log = logging.getLogger(__name__)

UNSPECIFIED = frozenset({"", "0.0.0.0", "::", "[::]"})
# Stands in for "the rest of the world" when no member is known: TEST-NET-1 (RFC 5737) and the
# documentation prefix (RFC 3849) are never reached, and connect() on UDP sends nothing anyway.
_DEFAULT_ROUTE = {socket.AF_INET: "192.0.2.1", socket.AF_INET6: "2001:db8::1"}


def is_unspecified(address: str) -> bool:
    """``--bind`` values that mean "every address of this host"."""
    return address in UNSPECIFIED


def route_source(target: str, port: int = 9, family: int = socket.AF_UNSPEC) -> str | None:
    """The local address the kernel would send from towards ``target`` (a host name or an
    address), or None where there is no route (or the name does not resolve)."""
    try:
        infos = socket.getaddrinfo(target, port, family=family, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError):
        return None
    for fam, type_, proto, _, sockaddr in infos:
        try:
            with socket.socket(fam, type_, proto) as s:
                s.connect(sockaddr)
                address = s.getsockname()[0]
        except OSError:
            continue
        return address.split("%", 1)[0]  # an IPv6 scope id is not part of the address
    return None


def interface_addresses() -> list[str]:
    """This host's non-loopback addresses, IPv4 first, in interface order (Linux; elsewhere
    what the host name resolves to)."""
    found: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        names = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:  # SIOCGIFADDR: the interface's (primary) IPv4 address
                raw = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
            found.append(socket.inet_ntoa(raw[20:24]))
    try:
        with open("/proc/net/if_inet6") as f:
            for line in f:
                hexaddr = line.split()[0]
                found.append(str(ipaddress.IPv6Address(bytes.fromhex(hexaddr))))
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        try:
            found = [i[4][0] for i in socket.getaddrinfo(socket.gethostname(), None)]
        except OSError:
            pass
    return [a for a in dict.fromkeys(found) if _usable(a)]


def _usable(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return not (ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast)


def choose_address(bind: str, targets: Iterable[str] = ()) -> str:
    """The address to advertise for an agent bound to ``bind``: ``bind`` itself when it is one
    address; otherwise the source address of the route to the first reachable of ``targets``
    (members' hosts), then of the default route, then the first interface address. ``0.0.0.0``
    gets an IPv4 address and ``::`` an IPv6 one: the peer port listens on that family only."""
    if not is_unspecified(bind):
        return bind
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    for target in targets:
        found = route_source(target, family=family)
        if found is not None and not ipaddress.ip_address(found).is_unspecified:
            return found
    found = route_source(_DEFAULT_ROUTE[family], family=family)
    if found is not None and _usable(found):
        return found
    v6 = family == socket.AF_INET6
    candidates = [a for a in interface_addresses() if (":" in a) == v6]
    if candidates:
        return candidates[0]
    log.warning("no address of this host reaches anywhere: advertising the loopback address")
    return "::1" if v6 else "127.0.0.1"


def host_port(host: str, port: int) -> str:
    """``host:port``, with an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
