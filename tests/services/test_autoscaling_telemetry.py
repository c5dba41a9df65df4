"""The ingress counters in gossip metadata (meshgpu/mesh/node_meta.py "s"): compact, bounded
(a cap on services, and the whole map within ``meta_max_size`` with everything else a node
publishes), read back tolerantly; waiting requests are decisive (published at once), counts are
not; only autoscaled services (or ones holding requests) are published."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from meshgpu.gpu import GPUTelemetry
from meshgpu.mesh.gossip.codec import encode_meta
from meshgpu.mesh.gossip.config import GossipConfig
from meshgpu.mesh.node_gossip import MeshGossip
from meshgpu.mesh.node_meta import (
    MAX_SERVICES,
    build_meta,
    decisive,
    encode_services,
    parse_meta,
    parse_services,
    service_key,
    variants,
)


def _meta(services: dict[str, tuple[int, int]] | None, **kw: Any) -> dict[str, Any]:
    gpus = [SimpleNamespace(name="H100", memory_mib=81920) for _ in range(8)]
    telemetry = [
        GPUTelemetry(
            index=i,
            utilization_pct=55.5,
            memory_used_mib=70000,
            temperature_c=71.0,
            healthy=True,
            reasons=[],
        )
        for i in range(8)
    ]
    return build_meta(
        raft_id=12,
        name="gpu-host-with-a-long-name-17",
        api_url="http://10.200.100.17:7480",
        labels=kw.get("labels", {"zone": "eu-west-1a", "rack": "r17"}),
        gpus=gpus,
        telemetry=telemetry,
        busy=range(8),
        cut_off=False,
        services=services,
    )


def test_round_trip() -> None:
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    meta = _meta({a: (1520, 2), b: (88, 0)})
    assert meta["s"] == [[service_key(a), 1520, 2], [service_key(b), 88]]
    assert parse_meta(meta).services == {service_key(a): (1520, 2), service_key(b): (88, 0)}
    assert "s" not in _meta({}) and parse_meta(_meta(None)).services == {}


def test_bounded_and_fits_the_datagram_with_everything_else() -> None:
    many = {uuid.uuid4().hex: (2**40 + i, i % 3) for i in range(1000)}
    rows = encode_services(many)
    assert len(rows) == MAX_SERVICES
    # Those holding requests first (they wait for a scale-up from zero), then the busiest.
    assert all(len(r) == 3 for r in rows[: sum(1 for r in rows if len(r) == 3)])
    meta = _meta(many)
    limit = GossipConfig.lan().meta_max_size
    # 16 services with large counters fit beside 8 GPUs' telemetry, labels and all.
    assert len(encode_meta(meta)) <= limit - 256
    # When something else does not fit, GPU telemetry and labels go first; the counters last.
    last = list(variants(meta))[-1]
    assert "t" not in last and "l" not in last and len(parse_meta(last).services) == 4


def test_malformed_rows_read_as_absent() -> None:
    raw = [["abc", 1], ["def", -1], ["ghi", 1, 2, 3], [5, 1], "x", ["jkl", 1.5], ["mno", 3, 1]]
    assert parse_services(raw) == {"abc": (1, 0), "mno": (3, 1)}
    assert parse_services({"a": 1}) == {}
    assert parse_services([["x", 1]] * 100) == {"x": (1, 0)}


def test_waiting_is_decisive_counts_are_not() -> None:
    a = uuid.uuid4().hex
    base = _meta({a: (10, 0)})
    assert decisive(_meta({a: (99, 0)})) == decisive(base)
    assert decisive(_meta({a: (10, 1)})) != decisive(base)
    assert decisive(_meta({a: (11, 3)})) == decisive(_meta({a: (10, 1)}))


def test_active_or_waiting_services_are_published() -> None:
    """Every active service (the autoscaler and every node's ps read them) and any that holds
    requests; a run that is gone is published only while requests wait for it."""
    scaled, fixed, gone = uuid.uuid4().hex, uuid.uuid4().hex, uuid.uuid4().hex

    def run(run_id: str, scaling: bool) -> Any:
        group = SimpleNamespace(scaling=object() if scaling else None)
        return SimpleNamespace(
            run_id=run_id,
            spec=SimpleNamespace(service=SimpleNamespace(groups=[group])),
            status=SimpleNamespace(is_finished=lambda: False),
        )

    state = SimpleNamespace(runs={"s": run(scaled, True), "f": run(fixed, False)})
    counts = {scaled: (5, 0), fixed: (7, 0), gone: (1, 2)}
    host = SimpleNamespace(state=state, service_counters=lambda: counts)
    gossip = MeshGossip(host)  # type: ignore[arg-type]
    assert gossip._services() == {scaled: (5, 0), fixed: (7, 0), gone: (1, 2)}
    counts[gone] = (1, 0)
    assert gossip._services() == {scaled: (5, 0), fixed: (7, 0)}
