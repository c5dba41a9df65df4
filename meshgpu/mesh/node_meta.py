"""What an agent tells the mesh about itself through gossip metadata, and how peers read it.

Gossip metadata is telemetry, not authority (ARCHITECTURE rule 3): the replicated node record
says what a host *has*; the metadata says how it is *doing* right now. It must fit the core's
``meta_max_size`` (1 KiB) beside everything else in one datagram, so keys are one letter::

    v  1                       format version
    r  7                       Raft id (lets a peer dial this member's gossip streams)
    n  "gpu-host-3"            node name
    a  "http://10.0.0.3:7480"  API URL
    l  {"zone": "a"}           labels
    g  "8xH100:80GB"           GPU summary
    h  [[3, "XID 79"], ...]    GPUs that are unhealthy now, with the reason (empty: all healthy)
    b  [0, 1]                  GPUs held by jobs running here (load)
    t  [[i, util%, MiB used, °C], ...]   per-GPU telemetry, rounded (dropped first when too big)
    f  1                       cut off from the Raft leader for the fencing period: this host has
                               stopped its jobs (the leader may fail them over at once)
    s  [["3f9a0c1d2e4b", 1520, 2], ["77c1...", 88], ...]   this node's ingress counters per
                               service, for the leader's autoscaler: the run id's first
                               ``SERVICE_KEY_LEN`` hex digits, requests completed since the agent
                               started, requests held now waiting for a replica (omitted when 0);
                               at most ``MAX_SERVICES`` services, those with waiting requests and
                               then the busiest first

Only changes of the *decisive* part (health, load, fencing, identity, which services have
requests waiting) are published at once; telemetry alone is refreshed at most every
``telemetry_refresh_s`` and the service counters every ``services_refresh_s``, since each change
costs a broadcast to every member. Parsing is tolerant: a field of the wrong shape (another version,
a bug) reads as absent, never as an error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from meshgpu.gpu import GPUTelemetry

VERSION = 1
_MAX_REASON = 48
SERVICE_KEY_LEN = 12  # hex digits of a run id naming its service in "s" (48 bits: no clash)
MAX_SERVICES = 16  # services in "s" (about 20 bytes each)

ServiceCounts = Mapping[str, tuple[int, int]]  # run id -> (completed total, waiting now)


def service_key(run_id: str) -> str:
    """How a service is named in gossip metadata (a run id's prefix)."""
    return run_id[:SERVICE_KEY_LEN]


def encode_services(counts: ServiceCounts, limit: int = MAX_SERVICES) -> list[list[Any]]:
    """The "s" field: at most ``limit`` services, those with requests waiting first (they
    wait for a scale-up from zero), then the busiest."""
    ranked = sorted(counts.items(), key=lambda kv: (kv[1][1] <= 0, -kv[1][0], kv[0]))
    out: list[list[Any]] = []
    for run_id, (completed, waiting) in ranked[: max(0, limit)]:
        row: list[Any] = [service_key(run_id), max(0, int(completed))]
        if waiting > 0:
            row.append(int(waiting))
        out.append(row)
    return out


def parse_services(raw: object) -> dict[str, tuple[int, int]]:
    """The "s" field read back: service key -> (completed, waiting); malformed rows skipped."""
    out: dict[str, tuple[int, int]] = {}
    if not isinstance(raw, list):
        return out
    for row in raw[:MAX_SERVICES]:
        if (
            isinstance(row, list)
            and len(row) in (2, 3)
            and isinstance(row[0], str)
            and all(type(v) is int and v >= 0 for v in row[1:])
        ):
            out[row[0][:SERVICE_KEY_LEN]] = (row[1], row[2] if len(row) == 3 else 0)
    return out


@dataclass(frozen=True, slots=True)
class NodeMeta:
    """A peer's metadata, read back."""

    raft_id: int | None = None
    name: str = ""
    api_url: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    gpus: str = ""
    unhealthy: dict[int, str] | None = None
    """GPU index -> reason; ``None`` when the host reports no GPU health at all."""
    busy: tuple[int, ...] = ()
    telemetry: tuple[dict[str, Any], ...] = ()
    """Per GPU, in the shape of the local telemetry the API shows (``index``,
    ``utilization_pct``, ``memory_used_mib``, ``temperature_c``, ``healthy``, ``reasons``)."""
    cut_off: bool = False
    services: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Service key (``service_key``) -> (requests completed, requests waiting) at its ingress."""


class _GPU(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def memory_mib(self) -> int: ...


def gpu_summary(gpus: Iterable[_GPU]) -> str:
    """``8xH100:80GB`` (groups joined by commas, in index order of first appearance), from
    inventory or from the replicated GPU records."""
    counts: Counter[tuple[str, int]] = Counter((g.name, round(g.memory_mib / 1024)) for g in gpus)
    return ",".join(f"{n}x{name}:{mem}GB" for (name, mem), n in counts.items())


def build_meta(
    *,
    raft_id: int,
    name: str,
    api_url: str,
    labels: Mapping[str, str],
    gpus: Iterable[_GPU],
    telemetry: Iterable[GPUTelemetry] | None,
    busy: Iterable[int],
    cut_off: bool,
    services: ServiceCounts | None = None,
) -> dict[str, Any]:
    """The full metadata map. ``telemetry=None``: the sample failed (no health is claimed)."""
    meta: dict[str, Any] = {
        "v": VERSION,
        "r": raft_id,
        "n": name,
        "a": api_url,
        "l": dict(labels),
        "g": gpu_summary(gpus),
        "b": sorted(set(busy)),
    }
    if telemetry is not None:
        samples = sorted(telemetry, key=lambda t: t.index)
        meta["h"] = [
            [t.index, ("; ".join(t.reasons) or "unhealthy")[:_MAX_REASON]]
            for t in samples
            if not t.healthy
        ]
        meta["t"] = [
            [t.index, _round(t.utilization_pct), t.memory_used_mib, _round(t.temperature_c)]
            for t in samples
        ]
    if cut_off:
        meta["f"] = 1
    if services:
        meta["s"] = encode_services(services)
    return meta


def decisive(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The part of ``meta`` whose changes are published at once: everything but telemetry and
    the service counters -- save which services have requests waiting."""
    out = {k: v for k, v in meta.items() if k not in ("t", "s")}
    waiting = [row[0] for row in meta.get("s") or () if len(row) == 3]
    if waiting:
        out["s"] = waiting
    return out


def variants(meta: Mapping[str, Any]) -> Iterator[dict[str, Any]]:
    """``meta``, then ever smaller versions of it for when it does not fit: without telemetry,
    without labels, with short reasons. What the leader acts on (health, load) goes last."""
    full = dict(meta)
    yield full
    slim = {k: v for k, v in full.items() if k != "t"}
    yield slim
    slim = {k: v for k, v in slim.items() if k != "l"}
    yield slim
    if "h" in slim:
        slim = slim | {"h": [[i, r[:8]] for i, r in slim["h"]]}
        yield slim
    if len(slim.get("s") or ()) > 4:
        yield slim | {"s": slim["s"][:4]}


def parse_meta(meta: Mapping[str, Any]) -> NodeMeta:
    """Read a peer's metadata; anything malformed reads as absent."""
    raft_id = meta.get("r")
    labels = meta.get("l")
    unhealthy: dict[int, str] | None = None
    h = meta.get("h")
    if isinstance(h, list):
        unhealthy = {}
        for item in h:
            if (
                isinstance(item, list)
                and len(item) == 2
                and type(item[0]) is int
                and isinstance(item[1], str)
            ):
                unhealthy[item[0]] = item[1]
    busy = meta.get("b")
    rows = []
    t = meta.get("t")
    if isinstance(t, list):
        for row in t:
            if isinstance(row, list) and len(row) == 4 and type(row[0]) is int:
                index, util, mem, temp = row
                bad = unhealthy.get(index) if unhealthy else None
                rows.append(
                    {
                        "index": index,
                        "utilization_pct": util if _number(util) else None,
                        "memory_used_mib": mem if type(mem) is int else None,
                        "temperature_c": temp if _number(temp) else None,
                        "healthy": bad is None,
                        "reasons": [bad] if bad is not None else [],
                    }
                )
    return NodeMeta(
        raft_id=raft_id if type(raft_id) is int and raft_id > 0 else None,
        name=_str(meta.get("n")),
        api_url=_str(meta.get("a")),
        labels={k: v for k, v in labels.items() if isinstance(v, str)}
        if isinstance(labels, dict)
        else {},
        gpus=_str(meta.get("g")),
        unhealthy=unhealthy,
        busy=tuple(i for i in busy if type(i) is int) if isinstance(busy, list) else (),
        telemetry=tuple(rows),
        cut_off=type(meta.get("f")) is int and meta["f"] == 1,
        services=parse_services(meta.get("s")),
    )


def _round(value: float | None) -> int | None:
    return None if value is None else int(round(value))


def _number(value: object) -> bool:
    return type(value) in (int, float)


def _str(value: object) -> str:
    return value if isinstance(value, str) else ""
