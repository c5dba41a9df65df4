"""``GET/POST /api/v1/offers``: where a request would fit now (``meshgpu offer``).

``GET`` takes one request in query parameters: the dstack ``resources`` grammar one field at a
time (``gpu=H100:80GB:2``, ``cpu=8..``, ``memory=64GB..``, ``disk=200GB..``, ``shm_size=8GB``) or
a whole ``resources`` JSON mapping, ``nodes`` (a job of a multi-node run takes whole hosts split
into blocks), ``fleet`` and ``after_queue``. ``POST`` takes a run configuration, so every filter
of a real run counts (fleets, regions, ``instances``, an ``image`` needing a container runtime)
and every job shape of it is answered (the groups of a task, a service's replicas).

Both are answered by the scheduler's own matching (``scheduler.offer``), read from this node's
applied state (``?consistent=true`` makes it linearizable). A ``GET`` request is the run
configuration it stands for -- a task with those resources -- so both go through the same parser
and a bad spec gets the same message a configuration file would.
"""

import json
import time
from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from meshgpu.api.problems import Problem, from_error
from meshgpu.api.views import offer_view
from meshgpu.config import ConfigError, ResourcesSpec, parse_config
from meshgpu.config.render import to_json
from meshgpu.config.runs import BaseRunConfiguration, TaskConfiguration
from meshgpu.config.spec import compile_run
from meshgpu.errors import Invalid
from meshgpu.ops.configs import parse_run_config_async
from meshgpu.scheduler import Offer, no_offer_reason, offer
from meshgpu.scheduler.matching import describe
from meshgpu.state import StateMachine

if TYPE_CHECKING:
    from meshgpu.ops import Services

RESOURCE_FIELDS = ("gpu", "cpu", "memory", "disk", "shm_size")
HINT = (
    "Write the dstack resources grammar, e.g. gpu=H100:80GB:2 (name, per-GPU memory and count "
    "in any order; a range such as 24GB.. or 1..4 works too), cpu=8.., memory=64GB.., "
    "disk=200GB.., or resources={...} with the whole mapping"
)


class OfferBody(BaseModel):
    config: str | dict[str, Any] = Field(
        description="A run configuration: the file's text (YAML) or the parsed mapping"
    )
    filename: str = "<config>"
    gpu: str | None = Field(default=None, description="Override resources.gpu (--gpu)")
    cpu: str | None = Field(default=None, description="Override resources.cpu (--cpu)")
    memory: str | None = Field(default=None, description="Override resources.memory (--memory)")
    disk: str | None = Field(default=None, description="Override resources.disk (--disk)")
    nodes: int | None = Field(default=None, ge=1, description="Override a task's nodes")
    after_queue: bool = Field(
        default=False, description="Plan the waiting queue first: what it takes is gone"
    )
    backends: bool = Field(
        default=True, description="Add the configured backends' offers (asked of the leader)"
    )


def _spec_problem(e: ConfigError, title: str, strip: str = "") -> Problem:
    """422 with every issue, each named as the user wrote it (a query parameter or a field)."""
    # Positions point into the stand-in document, not into anything the user wrote.
    issues = [i.to_dict() | {"line": None, "col": None} for i in e.issues]
    parts = []
    for i in e.issues:
        where = i.path.removeprefix(strip) if strip else i.path
        hint = f" (did you mean {i.suggestion!r}?)" if i.suggestion else ""
        parts.append(f"{where}: {i.message}{hint}" if where else i.message)
    detail = "; ".join(parts) + ". " + HINT
    return Problem(422, title, detail, "invalid_resources", issues=issues)


def _resources_override(values: dict[str, Any], title: str) -> dict[str, Any]:
    """Validate resource fields the way a configuration's would be (messages included)."""
    if not values:
        return {}
    try:
        parse_config(json.dumps({"type": "task", "commands": [":"], "resources": values}))
    except ConfigError as e:
        raise _spec_problem(e, title, "resources.") from None
    return values


def config_of_query(
    resources: str | None,
    fields: dict[str, str | None],
    nodes: int,
    fleets: list[str],
) -> BaseRunConfiguration:
    """The run configuration a ``GET /offers`` request stands for: a task with these resources."""
    raw: dict[str, Any] = {}
    if resources:
        try:
            raw = json.loads(resources)
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nested too deep
            raise Problem(
                422,
                "invalid resources",
                f"resources is not JSON ({e}). " + HINT,
                "invalid_resources",
            ) from None
        if not isinstance(raw, dict):
            raise Problem(
                422,
                "invalid resources",
                'resources must be a JSON object such as {"gpu": "H100:2"}. ' + HINT,
                "invalid_resources",
            )
    raw.update({k: v for k, v in fields.items() if v is not None})
    doc: dict[str, Any] = {"type": "task", "commands": [":"], "resources": raw}
    if nodes > 1:
        doc["nodes"] = nodes
    if fleets:
        doc["fleets"] = fleets
    try:
        config = parse_config(json.dumps(doc), "<query>")
    except ConfigError as e:
        raise _spec_problem(e, "invalid resources", "resources.") from None
    assert isinstance(config, BaseRunConfiguration)
    return config


async def config_of_body(body: OfferBody) -> BaseRunConfiguration:
    """The run configuration of a ``POST /offers`` body, with the CLI's overrides applied."""
    text = body.config if isinstance(body.config, str) else json.dumps(body.config)
    try:
        config = await parse_run_config_async(
            text, body.filename, "offers answer for a task, service or dev-environment"
        )
    except Invalid as e:  # a query, not a submission: answered 422
        raise from_error(e, 422) from None
    fields = {k: getattr(body, k) for k in ("gpu", "cpu", "memory", "disk")}
    override = _resources_override(
        {k: v for k, v in fields.items() if v is not None}, "invalid resources override"
    )
    updates: dict[str, Any] = {}
    if override:
        merged = config.resources.to_spec() | override
        updates["resources"] = ResourcesSpec.model_validate(merged)
    if body.nodes is not None:
        if not isinstance(config, TaskConfiguration) or config.groups:
            raise Problem(
                422,
                "nodes cannot be overridden",
                "only a task without groups has one nodes value; set nodes per group in the file",
                "invalid_request",
            )
        updates["nodes"] = body.nodes
    return config.model_copy(update=updates) if updates else config


def answer(
    state: StateMachine,
    config: BaseRunConfiguration,
    *,
    now: float,
    after_queue: bool = False,
) -> dict[str, Any]:
    """Offers for every job shape of ``config``: the stable JSON of ``meshgpu offer --json``."""
    spec = compile_run(to_json(config))
    gang_size = Counter(j.replica_num for j in spec.jobs)
    shapes: Counter[tuple[str | None, str, int]] = Counter()
    for j in spec.jobs:
        shapes[(j.group, j.resources_key, gang_size[j.replica_num])] += 1
    cluster_rule = spec.placement.cluster
    requests = []
    for (group, key, size), count in shapes.items():
        res = ResourcesSpec.model_validate(json.loads(key))
        # A service replica group's own image/python/spot_policy/... decide its hosts.
        found = offer(
            state, res, spec=spec.for_group(group), nodes=size, now=now, after_queue=after_queue
        )
        idle = [o for o in found if o.availability == "idle"]
        # A gang's jobs take one host each (in one cluster unless ``placement: any``); other jobs
        # are asked about one at a time.
        hosts = count if size > 1 else 1
        if size > 1 and cluster_rule:
            per_cluster = Counter(o.labels.get("cluster", "") for o in idle)
            room = max(per_cluster.values(), default=0)
        else:
            room = len(idle)
        fits = room >= hosts
        if not found:
            reason = "no host can ever run it: " + no_offer_reason(
                state, res, spec=spec.for_group(group), nodes=size
            )
        elif not fits:
            reason = _why_wait(found, room, hosts, size > 1 and cluster_rule)
        else:
            reason = ""
        requests.append(
            {
                "group": group,
                "jobs": count,
                "nodes": size,
                "resources": res.to_spec(),
                "summary": f"{describe(res)} ({res.summary()})",
                "fits_now": fits,
                "reason": reason,
                "idle": len(idle),
                "busy": len(found) - len(idle),
                "offers": [offer_view(o) for o in found],
            }
        )
    return {
        "after_queue": after_queue,
        "fits_now": all(r["fits_now"] for r in requests),
        "requests": requests,
    }


async def with_backend_offers(
    services: "Services",  # noqa: UP037
    config: BaseRunConfiguration,
    doc: dict[str, Any],
) -> None:
    """Beside each request's hosts, what the configured backends would sell for it
    (``backend_offers``: cheapest first; ``backend_errors``: backends that did not answer).
    Asked of the leader (``ops/backends.py``): a backend that fails never fails the answer."""
    import dataclasses

    from meshgpu.control.backend_fleets import requirements
    from meshgpu.errors import MeshError

    b = services.backends
    if b is None or not b.cluster.fleets.backends:
        return
    spec = compile_run(to_json(config))
    for req in doc["requests"]:
        placement = spec.for_group(req["group"]).placement
        # the run's spot_policy as the scheduler reads it (on-demand unless it says)
        need = requirements({}, req["resources"], placement)
        try:
            got = await b.offers(dataclasses.asdict(need), list(placement.backends or []) or None)
        except MeshError as e:
            req["backend_offers"], req["backend_errors"] = [], [f"{e.title}: {e.detail}"]
            continue
        req["backend_offers"], req["backend_errors"] = got["offers"], got["failed"]


def _why_wait(found: list[Offer], room: int, hosts: int, one_cluster: bool) -> str:
    if hosts == 1:
        why = "it would wait: no host can take it now"
    else:
        where = " in one cluster" if one_cluster else ""
        why = f"it would wait: {room} of the {hosts} hosts it needs{where} can take it now"
    busy = [o for o in found if o.availability == "busy"]
    if busy:
        n = len(busy)
        why += f"; {n} busy host{'s' if n != 1 else ''} could run it once work there ends"
    held = sorted({o.reserved_for for o in busy if o.reserved_for})
    if held:
        why += f" (held for waiting run{'s' if len(held) != 1 else ''} {', '.join(held)})"
    return why


def router(services: "Services", auth: Any, read: Any) -> APIRouter:  # noqa: UP037 - see app.py
    """The offers routes; ``auth``/``read`` are the app's bearer-token and read-index
    dependencies (annotations are evaluated here: FastAPI reads them)."""
    r = APIRouter()

    @r.get("/api/v1/offers")
    async def get_offers(
        _: auth,
        __: read,
        gpu: Annotated[str | None, Query(description="e.g. H100:80GB:2, A100,H100:1..4")] = None,
        cpu: Annotated[str | None, Query(description="e.g. 8.., arm:16")] = None,
        memory: Annotated[str | None, Query(description="e.g. 64GB..")] = None,
        disk: Annotated[str | None, Query(description="e.g. 200GB..")] = None,
        shm_size: Annotated[str | None, Query(description="e.g. 8GB")] = None,
        resources: Annotated[
            str | None, Query(description='The whole mapping as JSON, e.g. {"gpu": "H100:2"}')
        ] = None,
        nodes: Annotated[int, Query(ge=1, le=10_000, description="Jobs of one gang")] = 1,
        fleet: Annotated[list[str] | None, Query(description="Only these fleets")] = None,
        after_queue: Annotated[bool, Query(description="Plan the waiting queue first")] = False,
        backends: Annotated[
            bool, Query(description="Add the backends' offers (asked of the leader)")
        ] = True,
    ) -> dict[str, Any]:
        fields = {"gpu": gpu, "cpu": cpu, "memory": memory, "disk": disk, "shm_size": shm_size}
        config = config_of_query(resources, fields, nodes, fleet or [])
        doc = answer(services.state, config, now=time.time(), after_queue=after_queue)
        if backends:
            await with_backend_offers(services, config, doc)
        return doc

    @r.post("/api/v1/offers")
    async def post_offers(body: OfferBody, _: auth, __: read) -> dict[str, Any]:
        config = await config_of_body(body)
        doc = answer(services.state, config, now=time.time(), after_queue=body.after_queue)
        if body.backends:
            await with_backend_offers(services, config, doc)
        return doc

    return r


__all__ = ["OfferBody", "answer", "config_of_body", "config_of_query", "router"]
