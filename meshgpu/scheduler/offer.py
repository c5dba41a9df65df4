"""``meshgpu offer``: where would a request fit now?

Every active host that could ever run the request is an offer. It is ``idle`` when the request
fits there now -- with the GPUs it would get, chosen as the scheduler would -- and ``busy`` when
it could run there once work ends. With ``after_queue=True`` the waiting queue is planned first:
what it would take is gone and hosts reserved for blocked gangs count as busy unless the backfill
rule would admit the request (so a deep queue shows why a new run would wait).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshgpu.config.resources import ResourcesSpec
from meshgpu.config.spec import NO_SPEC, RunSpec
from meshgpu.scheduler.capacity import Capacity
from meshgpu.scheduler.deadlines import Deadlines
from meshgpu.scheduler.index import SchedulerIndex
from meshgpu.scheduler.matching import req_of
from meshgpu.scheduler.placement import _Planner
from meshgpu.scheduler.policy import SchedulerPolicy
from meshgpu.state.machine import StateMachine


@dataclass(frozen=True, slots=True)
class Offer:
    node_id: str
    node: str
    availability: str  # "idle" (fits now) | "busy" (could run it once work there ends)
    gpu_indices: tuple[int, ...]  # the GPUs it would get now (empty when busy)
    gpus: str  # the host's GPUs, e.g. "8xH100:80GB"
    free_gpus: int
    total_gpus: int
    blocks: int | None = None  # on a host split into blocks: how many the request takes
    free_blocks: int | None = None
    total_blocks: int | None = None
    reserved_for: str | None = None  # a waiting run holds this host (after_queue only)
    labels: dict[str, str] = field(default_factory=dict)


def offer(
    state: StateMachine,
    resources: ResourcesSpec | dict[str, Any],
    *,
    spec: RunSpec | None = None,
    nodes: int = 1,
    now: float | None = None,
    after_queue: bool = False,
    policy: SchedulerPolicy | None = None,
    index: SchedulerIndex | None = None,
) -> list[Offer]:
    """Hosts for one job of ``resources`` (with the run-level filters of ``spec``; ``nodes``
    > 1 means a job of a multi-node gang, which takes whole hosts split into blocks). Idle offers
    come first, in the order the scheduler would pick them. ``index``: as for ``plan``."""
    res = (
        resources
        if isinstance(resources, ResourcesSpec)
        else ResourcesSpec.model_validate(resources)
    )
    planner = _Planner(state, now, policy or SchedulerPolicy(), index)
    try:
        if after_queue:
            planner.plan_queue()
        return _offers(planner, res, spec or NO_SPEC, nodes)
    finally:
        planner.cap.close()


def no_offer_reason(
    state: StateMachine,
    resources: ResourcesSpec | dict[str, Any],
    *,
    spec: RunSpec | None = None,
    nodes: int = 1,
    index: SchedulerIndex | None = None,
) -> str:
    """Why no host can ever run the request (what an empty ``offer`` means), in the words a
    waiting job's ``why_pending`` uses."""
    res = (
        resources
        if isinstance(resources, ResourcesSpec)
        else ResourcesSpec.model_validate(resources)
    )
    if index is None:
        index = SchedulerIndex.shared(state)
    index.sync(state)
    cap = Capacity(state, index.hosts, Deadlines(None, SchedulerPolicy()))
    try:
        return cap.never_reasons(req_of(res, (spec or NO_SPEC).placement, exclusive=nodes > 1))
    finally:
        cap.close()


def fits_no_host(
    state: StateMachine,
    resources: ResourcesSpec | dict[str, Any],
    *,
    spec: RunSpec | None = None,
    nodes: int = 1,
    index: SchedulerIndex | None = None,
) -> bool:
    """Could no active host run the request, even idle? (What a backend fleet grows for.)"""
    res = (
        resources
        if isinstance(resources, ResourcesSpec)
        else ResourcesSpec.model_validate(resources)
    )
    if index is None:
        index = SchedulerIndex.shared(state)
    index.sync(state)
    cap = Capacity(state, index.hosts, Deadlines(None, SchedulerPolicy()))
    try:
        req = req_of(res, (spec or NO_SPEC).placement, exclusive=nodes > 1)
        for cls, _ in cap.feasible(req):
            for host in cap.members(cls):
                if req.filters.by_name() and req.filters.reject(host.node):
                    continue
                return False
        return True
    finally:
        cap.close()


def _offers(planner: _Planner, res: ResourcesSpec, spec: RunSpec, nodes: int) -> list[Offer]:
    cap = planner.cap
    req = req_of(res, spec.placement, exclusive=nodes > 1)
    end = planner.deadlines.of_new(spec)
    idle: list[tuple[int, str, Offer]] = []
    busy: list[Offer] = []
    for cls, sf in cap.feasible(req):
        for host in cap.members(cls):
            node = host.node
            if req.filters.by_name() and req.filters.reject(node):
                continue
            gpus = cap.gpus_for(host, sf)
            held_for = None
            if gpus is not None:
                blocks = sf.units if host.shape is not None else 0
                if planner.backfill.admits(host, ("", -1), end, gpus, blocks) is None:
                    held_for = host.reservation.gang[0] if host.reservation else None
                    gpus = None
            shape = host.shape
            item = Offer(
                node_id=host.node_id,
                node=node.name,
                availability="idle" if gpus is not None else "busy",
                gpu_indices=gpus or (),
                gpus=_host_gpus(node.gpus),
                free_gpus=len(host.free),
                total_gpus=len(node.gpus),
                blocks=sf.units if shape is not None else None,
                free_blocks=host.free_blocks if shape is not None else None,
                total_blocks=shape.total if shape is not None else None,
                reserved_for=held_for,
                labels=dict(node.labels),
            )
            if gpus is not None:
                idle.append((host.units - sf.units, node.name, item))
            else:
                busy.append(item)
    idle.sort(key=lambda t: t[:2])
    busy.sort(key=lambda o: o.node)
    return [o for _, _, o in idle] + busy


def _host_gpus(gpus: list[Any]) -> str:
    if not gpus:
        return "none"
    kinds: dict[str, int] = {}
    for g in gpus:
        key = f"{g.name}:{round(g.memory_mib / 1024)}GB"
        kinds[key] = kinds.get(key, 0) + 1
    return ", ".join(f"{n}x{k}" for k, n in kinds.items())
