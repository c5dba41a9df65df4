"""The backend seam: what a cloud plugin implements so that the leader's fleet controller
(``meshgpu/control/backend_fleets.py``) can buy, list and release instances that boot the agent.

A backend is a package registering a factory under the entry-point group ``meshgpu.backends``
(``pyproject.toml``: ``[project.entry-points."meshgpu.backends"] local = "plugins.local:create"``):
``create(config, secrets) -> Backend``. This module is the only part of meshgpu a plugin may
import (the ``plugins`` import contract). Every method is *blocking* (cloud SDKs are): the
controller calls them in a worker thread, with a deadline.

* ``check()``: prove the credentials work (``meshgpu backend add`` calls it: wrong ones are a
  ``CredentialsError`` there, not a surprise at the first provisioning).
* ``offers(req)``: what could be bought, each with its price per hour; the controller sorts and
  filters them (``filter_offers``) -- a plugin may pre-filter.
* ``create(offer, bootstrap)``: start an instance of ``offer`` running ``bootstrap.user_data``
  (a cloud-init style shell script that starts the agent file with a single-use join token),
  tagged with ``bootstrap.tags``; a ``CapacityError`` makes the controller try the next offer.
* ``terminate(ref)``: release it (idempotent: an instance already gone is fine).
* ``list(tags)``: the instances carrying all of ``tags`` -- how a new leader reconciles.

``cluster_placement`` (a class attribute of the backend, and of its factory for the API's check
at ``apply``): the backend co-locates the instances of one ``Bootstrap.placement_group`` (a cloud
placement group, one rack or network spine) -- what a backend fleet with ``placement: cluster``
and more than one node needs. A backend without it is not used for such fleets, and applying one
whose backends all lack it is refused (``config/support.py``).
"""

from __future__ import annotations

import importlib.metadata as md
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

GROUP = "meshgpu.backends"
TAG_CLUSTER = "meshgpu-cluster"
TAG_INSTANCE = "meshgpu-instance"
TAG_FLEET = "meshgpu-fleet"


class BackendError(RuntimeError):
    """A backend call failed; the message says what to do."""


class CredentialsError(BackendError):
    """The backend refused the credentials."""


class CapacityError(BackendError):
    """This offer cannot be had now (no capacity, quota): the next offer may be."""


class BackendUnavailable(BackendError):
    """The cloud API did not answer (timeout, connection refused): try again later."""


@dataclass(frozen=True)
class Requirements:
    """What an instance must have (from a run's ``resources`` and the fleet's filters)."""

    gpu_count: int = 0
    gpu_count_max: int | None = None
    gpu_names: tuple[str, ...] = ()
    gpu_memory_gb: float = 0.0
    cpus: int = 0
    memory_gb: float = 0.0
    disk_gb: float = 0.0
    spot: bool | None = False  # False: on-demand only, True: spot only, None: either
    max_price: float | None = None
    regions: tuple[str, ...] = ()
    instance_types: tuple[str, ...] = ()
    # upper bounds (a range's max in ``resources``): None, none
    gpu_memory_gb_max: float | None = None
    cpus_max: int | None = None
    memory_gb_max: float | None = None
    disk_gb_max: float | None = None


@dataclass(frozen=True)
class Offer:
    backend: str  # the configured backend's name
    instance_type: str
    region: str
    price: float  # USD per hour
    spot: bool = False
    gpu_name: str = ""
    gpu_count: int = 0
    gpu_memory_gb: float = 0.0
    cpus: int = 0
    memory_gb: float = 0.0
    disk_gb: float = 0.0
    zone: str = ""
    availability: str = "available"  # available | not_available | no_quota | unknown

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Offer:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})

    def gpus_text(self) -> str:
        if not self.gpu_count:
            return "-"
        mem = f":{self.gpu_memory_gb:g}GB" if self.gpu_memory_gb else ""
        return f"{self.gpu_count}x{self.gpu_name}{mem}"


@dataclass
class InstanceRef:
    backend: str
    instance_id: str  # the cloud's id
    region: str = ""
    address: str = ""
    state: str = ""  # the cloud's word (running, pending, terminated ...)
    tags: dict[str, str] = field(default_factory=dict)
    zone: str = ""  # the availability zone it runs in, where the cloud says

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InstanceRef:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class Bootstrap:
    name: str  # a readable instance name (``<fleet>-<num>``)
    user_data: str  # the cloud-init shell script
    tags: dict[str, str]
    # ``placement: cluster``: the fleet's placement group (one name per cluster and fleet), made
    # by the backend on first use; every instance of the fleet is created into it ("": none)
    placement_group: str = ""


class Backend(Protocol):
    name: str
    cluster_placement: bool

    def check(self) -> None: ...

    def offers(self, req: Requirements) -> list[Offer]: ...

    def create(self, offer: Offer, bootstrap: Bootstrap) -> InstanceRef: ...

    def terminate(self, ref: InstanceRef) -> None: ...

    def list(self, tags: dict[str, str]) -> list[InstanceRef]: ...


# meshgpu's own plugins (also registered in pyproject.toml): found even where meshgpu runs
# without its distribution's metadata (the one-file agent, a source checkout).
BUILTIN = {"local": "plugins.local:create", "aws": "plugins.aws:create"}


def types() -> dict[str, md.EntryPoint]:
    """The installed backend types (entry points of ``meshgpu.backends``)."""
    out = {n: md.EntryPoint(n, v, GROUP) for n, v in BUILTIN.items()}
    out.update({ep.name: ep for ep in md.entry_points(group=GROUP)})
    return out


def load(type_: str, name: str, config: dict[str, Any], secrets: dict[str, Any]) -> Backend:
    eps = types()
    ep = eps.get(type_)
    if ep is None:
        raise BackendError(
            f"no backend type {type_!r} is installed here (installed: "
            f"{', '.join(sorted(eps)) or 'none'}): install the plugin package on every voter"
        )
    factory = ep.load()
    return factory(name=name, config=dict(config), secrets=dict(secrets))  # type: ignore[no-any-return]


def supports_cluster(type_: str) -> bool:
    """Does the installed backend type ``type_`` co-locate a placement group's instances
    (``cluster_placement`` on its factory)? False for an unknown type."""
    ep = types().get(type_)
    if ep is None:
        return False
    try:
        factory = ep.load()
    except Exception:  # noqa: BLE001 - a broken plugin cannot place anything
        return False
    return bool(getattr(factory, "cluster_placement", False))


def filter_offers(offers: list[Offer], req: Requirements) -> list[Offer]:
    """The offers meeting ``req``, cheapest first (unavailable ones last)."""
    names = {n.lower() for n in req.gpu_names}
    out = []
    for o in offers:
        if o.gpu_count < req.gpu_count:
            continue
        if req.gpu_count_max is not None and o.gpu_count > req.gpu_count_max:
            continue
        if names and o.gpu_name.lower() not in names:
            continue
        if req.gpu_memory_gb and o.gpu_memory_gb < req.gpu_memory_gb:
            continue
        if o.cpus < req.cpus or o.memory_gb < req.memory_gb:
            continue
        if req.disk_gb and o.disk_gb and o.disk_gb < req.disk_gb:
            continue
        if any(
            hi is not None and have > hi
            for have, hi in (
                (o.gpu_memory_gb, req.gpu_memory_gb_max),
                (o.cpus, req.cpus_max),
                (o.memory_gb, req.memory_gb_max),
                (o.disk_gb, req.disk_gb_max),
            )
        ):
            continue
        if req.spot is not None and o.spot != req.spot:
            continue
        if req.max_price is not None and o.price > req.max_price:
            continue
        if req.regions and o.region not in req.regions:
            continue
        if req.instance_types and o.instance_type not in req.instance_types:
            continue
        out.append(o)
    return sorted(out, key=lambda o: (o.availability != "available", o.price, o.instance_type))


def seal_json(secrets: dict[str, Any]) -> bytes:
    return json.dumps(secrets, sort_keys=True).encode()
