"""Run-level placement filters (dstack's profile params) matched against node labels.

A mesh has no cloud catalogue to filter, so the facts come from labels that an agent registers
(``--labels``; ``--spot`` and ``--price USD_PER_HOUR`` set ``spot`` and ``price``) or a fleet
plugin sets:

=================== ============================ ==============================================
run field           node label                   match
=================== ============================ ==============================================
``fleets``          ``fleet``                    equal (``<project>/<fleet>`` matches ``fleet``)
``backends``        ``backend``                  equal, case-insensitive
``regions``         ``region``                   equal, case-insensitive
``availability_zones`` ``zone``                  equal, case-insensitive
``instance_types``  ``instance_type``            equal, case-insensitive
``reservation``     ``reservation``              equal
``spot_policy``     ``spot`` (``true``/``false``; ``spot`` needs spot, ``on-demand`` (the
                    no label: not spot)           default) refuses it, ``auto`` takes either
``max_price``       ``price`` ($/h)              price <= max_price; a host without a price
                                                  is not used (its cost is unknown)
``instances``       node name, internal IP,      any entry matches
                    ``fleet`` + ``instance``
=================== ============================ ==============================================

Two facts come from what the host registers rather than from labels: ``python: X.Y`` needs the
version among the node's ``pythons`` (interpreters its job user can run) and ``nvcc: true`` a node
with a CUDA toolkit (``nvcc``); both concern process jobs only (an ``image`` brings its own).

A filter the run sets excludes nodes that lack the label: asking for ``fleets: [a]`` means "only
fleet a". ``placement: cluster`` (the default for multi-node runs, as dstack requires cluster
fleets for them) keeps a gang on hosts with one value of the ``cluster`` label; hosts without the
label form one cluster of their own, so a plain LAN mesh is one cluster.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshgpu.config.spec import Placement
from meshgpu.state.records import NodeRecord

# Labels that can change a placement decision: part of a host's class signature.
LABEL_KEYS = (
    "fleet",
    "backend",
    "region",
    "zone",
    "instance_type",
    "reservation",
    "spot",
    "price",
    "cluster",
    "preemption",
)


def _lower(values: Any) -> frozenset[str] | None:
    return frozenset(str(v).lower() for v in values) if values else None


@dataclass(frozen=True, slots=True)
class RunFilters:
    """Where a run may be placed, from its configuration."""

    key: str  # canonical text: equal keys, equal filters
    image: bool = False
    python: str | None = None
    nvcc: bool = False
    fleets: frozenset[str] | None = None
    backends: frozenset[str] | None = None
    regions: frozenset[str] | None = None
    zones: frozenset[str] | None = None
    instance_types: frozenset[str] | None = None
    reservation: str | None = None
    spot_policy: str = "on-demand"
    max_price: float | None = None
    instances: tuple[tuple[tuple[str, Any], ...], ...] = ()
    cluster: bool = True  # multi-node gangs stay in one cluster (``placement: any`` turns it off)

    def by_name(self) -> bool:
        """Do the filters look at the node's name (``instances``), not only at its class?"""
        return bool(self.instances)

    def reject(self, node: NodeRecord, by_name: bool = True) -> str:
        """Why the run may not use this node ('' if it may). ``by_name=False`` leaves out the
        ``instances`` filter, the one part that differs between hosts of one class."""
        if self.image and not node.container_runtime:
            return f"{node.name} has no container runtime (docker/podman) for image jobs"
        if self.python is not None and self.python not in node.pythons:
            has = ", ".join(node.pythons) if node.pythons else "none its job user can run"
            return f"{node.name} has no Python {self.python} (it has {has})"
        if self.nvcc and not node.nvcc:
            return f"{node.name} has no CUDA toolkit (nvcc: true needs nvcc on the host)"
        labels = node.labels
        if self.fleets is not None:
            fleet = labels.get("fleet")
            if fleet is None or not any(f == fleet or f.endswith("/" + fleet) for f in self.fleets):
                return f"{node.name} is not in fleet {'/'.join(sorted(self.fleets))}"
        for name, allowed, label in (
            ("backend", self.backends, "backend"),
            ("region", self.regions, "region"),
            ("zone", self.zones, "zone"),
            ("instance type", self.instance_types, "instance_type"),
        ):
            if allowed is not None and str(labels.get(label, "")).lower() not in allowed:
                return f"{node.name}'s {name} is not {'/'.join(sorted(allowed))}"
        if self.reservation is not None and labels.get("reservation") != self.reservation:
            return f"{node.name} is not in reservation {self.reservation}"
        spot = str(labels.get("spot", "false")).lower() == "true"
        if self.spot_policy == "spot" and not spot:
            return f"{node.name} is not a spot instance (spot_policy: spot)"
        if self.spot_policy == "on-demand" and spot:
            return f"{node.name} is a spot instance (spot_policy: on-demand)"
        if self.max_price is not None:
            if "price" not in labels:
                return f"{node.name} has no price: start its agent with --price"
            try:
                price = float(labels["price"])
            except ValueError:
                return f"{node.name}'s price label {labels['price']!r} is not a number"
            if not price <= self.max_price:  # (NaN too)
                return f"{node.name} costs ${labels['price']}/h, over max_price ${self.max_price}"
        if (
            by_name
            and self.instances
            and not any(_instance_matches(dict(ref), node) for ref in self.instances)
        ):
            return f"{node.name} is not among the run's instances"
        return ""


def _instance_matches(ref: dict[str, Any], node: NodeRecord) -> bool:
    if ref.get("name") is not None:
        return ref["name"] in (node.name, node.node_id)
    if ref.get("hostname") is not None:
        return ref["hostname"] in (node.internal_ip, node.name)
    return node.labels.get("fleet") == ref.get("fleet") and node.labels.get("instance") == str(
        ref.get("instance")
    )


_CACHE: dict[str, RunFilters] = {}


def run_filters(placement: Placement) -> RunFilters:
    """The run's filters, built once per distinct placement."""
    hit = _CACHE.get(placement.key)
    if hit is not None:
        return hit
    if len(_CACHE) > 10_000:
        _CACHE.clear()
    hit = _CACHE[placement.key] = RunFilters(
        key=placement.filters_key(),
        image=placement.image,
        python=placement.python,
        nvcc=placement.nvcc,
        fleets=frozenset(placement.fleets) if placement.fleets else None,
        backends=_lower(placement.backends),
        regions=_lower(placement.regions),
        zones=_lower(placement.zones),
        instance_types=_lower(placement.instance_types),
        reservation=placement.reservation,
        spot_policy=placement.spot_policy,
        max_price=placement.max_price,
        instances=placement.instances,
        cluster=placement.cluster,
    )
    return hit


def cluster_of(node: NodeRecord) -> str:
    return node.labels.get("cluster", "")
