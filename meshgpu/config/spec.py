"""Typed run specs: what the state machine, the scheduler and the runner read of a run.

A run's configuration is validated at the edge (the pydantic models of ``runs.py``) and rendered
to its normalized JSON form (``render.to_json``: every field, defaults filled). That form is what
a ``SubmitRun`` entry carries in the Raft log and what snapshots keep, because it is also what the
user sees back (``GET /api/v1/runs/{name}``) and what an in-place update is compared with.
``compile_run`` turns it, once per run, into a frozen ``RunSpec`` that every reader past the edge
uses by attribute: no ``config.get("field")`` in state, scheduler or runner. A new field is added
here once, with its default, instead of as a string key in three packages.

Compiling is a pure function of the rendered form, so every member compiles the same spec from
the same log entry, and a snapshot (which keeps only the rendered form) recompiles it on restore.
Parts that many runs share (resources, placement, retry policy) are interned: a queue of ten
thousand runs from one YAML file holds one copy of each.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from meshgpu.config.common import ALL_RETRY_EVENTS, DEFAULT_RETRY_DURATION

# Run-level fields that decide *where* a job may run (or for how long it will hold it). Runs equal
# in these (and in their jobs' resources) are interchangeable to the scheduler.
PLACEMENT_FIELDS = (
    "fleets",
    "backends",
    "regions",
    "availability_zones",
    "instance_types",
    "instances",
    "spot_policy",
    "max_price",
    "reservation",
    "max_duration",
    "stop_duration",
    "placement",
)

# dstack's images (reference §1.1) for the jobs that need a container but name no image:
# ``privileged``/``entrypoint`` run in its base image (``-devel`` with ``nvcc``), ``docker: true``
# in its Docker-in-Docker image, privileged, with ``start-dockerd`` before the commands.
DSTACK_BASE_IMAGE = "dstackai/base:0.16-base-ubuntu24.04"
DSTACK_DEVEL_IMAGE = "dstackai/base:0.16-devel-ubuntu24.04"
DSTACK_DIND_IMAGE = "dstackai/dind"
START_DOCKERD = "start-dockerd"

DEFAULT_STOP_GRACE_S = 300.0  # dstack's stop_duration default
STOP_OFF_GRACE_S = 3600.0  # ``stop_duration: off``: no limit, bounded at an hour


def canonical(value: Any) -> str:
    """Canonical JSON text: equal texts, equal values (the key of every intern table here)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """dstack's ``retry``: the events that resubmit a failed replica, and for how long."""

    events: frozenset[str]
    duration: float  # seconds


# What replaces a service replica lost to an interruption (its host gone, a preemption) when the
# service's own ``retry`` does not cover interruptions: as ``retry: true`` would, for an hour.
SERVICE_INTERRUPTIONS = RetryPolicy(frozenset({"interruption"}), float(DEFAULT_RETRY_DURATION))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a run's jobs may be placed (dstack's profile parameters), as the scheduler filters
    hosts with them (``scheduler/filters.py``). ``key`` is the canonical text of the placement
    fields (durations included): runs with equal keys and equal job resources are one class of
    the wait queue."""

    key: str = "{}"
    image: bool = False
    python: str | None = None  # hosts with this interpreter (process jobs)
    nvcc: bool = False  # hosts with a CUDA toolkit (process jobs)
    fleets: tuple[str, ...] | None = None
    backends: tuple[str, ...] | None = None
    regions: tuple[str, ...] | None = None
    zones: tuple[str, ...] | None = None
    instance_types: tuple[str, ...] | None = None
    reservation: str | None = None
    spot_policy: str = "on-demand"
    max_price: float | None = None
    # each ``instances`` entry as its (field, value) pairs, ``None`` values left out
    instances: tuple[tuple[tuple[str, Any], ...], ...] = ()
    cluster: bool = True  # ``placement: any`` lets a multi-node gang span clusters

    def filters_key(self) -> str:
        """Canonical text of what the host filters read (no durations): equal texts filter
        hosts the same way."""
        return canonical(
            {
                "image": self.image,
                "python": self.python,
                "nvcc": self.nvcc,
                "fleets": self.fleets,
                "backends": self.backends,
                "regions": self.regions,
                "zones": self.zones,
                "instance_types": self.instance_types,
                "reservation": self.reservation,
                "spot_policy": self.spot_policy,
                "max_price": self.max_price,
                "instances": self.instances,
                "cluster": self.cluster,
            }
        )


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job of a run: a node of a task (per group), a replica of a service, the one job of a
    dev environment. Resubmissions of the job (retry) keep its spec."""

    job_num: int
    replica_num: int = 0
    group: str | None = None
    # The normalized resources (JSON form; shared between runs asking for the same) and their
    # canonical text: equal keys fit the same hosts.
    resources: Mapping[str, Any] = field(default_factory=dict)
    resources_key: str = "{}"
    commands: tuple[str, ...] = ()  # the group's own commands, or the run's
    # The job's environment: a service replica group's own ``image``/``python``/``nvcc``/
    # ``docker``/``privileged``/``spot_policy``/``reservation`` (dstack 0.22 ``groups:``), the
    # run's where the group sets none. ``env`` None: the run's (every job of a run without
    # replica groups, and of a group that sets none of them); ``RunSpec.for_group`` reads it.
    env: JobEnv | None = None


@dataclass(frozen=True, slots=True)
class JobEnv:
    """What a replica group sets of its jobs' environment and placement, compiled as the run's
    are (``job_image``, ``compile_placement``) from the run's configuration with the group's
    fields over it."""

    image: str | None = None
    shell: str | None = None
    privileged: bool = False
    docker: bool = False  # Docker-in-Docker: ``start-dockerd`` runs before the commands
    python: str | None = None
    nvcc: bool = False
    placement: Placement = field(default_factory=Placement)


@dataclass(frozen=True, slots=True)
class Probe:
    """One of a service's readiness probes (dstack's ``probes`` entry, or the default probe of a
    ``model:`` service), run by the host that runs the replica against ``127.0.0.1:<port>``."""

    method: str = "get"
    url: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    body: str | None = None
    timeout_s: float = 10.0
    interval_s: float = 15.0
    ready_after: int = 1
    until_ready: bool = False


@dataclass(frozen=True, slots=True)
class RateLimitRule:
    """dstack's ``rate_limits`` entry: requests under ``prefix`` per key (client IP or a header's
    value) at ``rps`` with ``burst``; the longest matching prefix wins; excess gets 429."""

    prefix: str = "/"
    key: str = "ip_address"  # ip_address | header
    header: str | None = None
    rps: float = 1.0
    burst: int = 0


@dataclass(frozen=True, slots=True)
class Scaling:
    """dstack's ``scaling`` (metric rps): desired = ceil(rps over window / target), clipped to the
    group's range, changed no sooner than the delays after the last change."""

    target: float
    window_s: int = 60
    scale_up_delay_s: float = 300.0
    scale_down_delay_s: float = 600.0


@dataclass(frozen=True, slots=True)
class ReplicaGroup:
    """A service's replica group (a plain service is one group named ``"0"``, as in dstack)."""

    name: str
    min: int
    max: int
    scaling: Scaling | None = None


@dataclass(frozen=True, slots=True)
class ModelRoute:
    """``model:``: the OpenAI-compatible model a service serves, routed by name at
    ``/proxy/models/<project>/`` to ``<prefix>/...`` on a replica."""

    name: str
    type: str = "chat"
    format: str = "openai"
    prefix: str = "/v1"


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What the ingress, the probes and the autoscaler read of a service."""

    port: int  # the port the app listens on (dstack's container port)
    strip_prefix: bool = True
    auth: bool = True
    model: ModelRoute | None = None
    # The probes that run (the default model probe filled in; ``()`` when none apply).
    probes: tuple[Probe, ...] = ()
    probes_configured: bool = False  # ``probes:`` given (``[]`` included)
    rate_limits: tuple[RateLimitRule, ...] = ()
    groups: tuple[ReplicaGroup, ...] = ()

    def group(self, name: str | None) -> ReplicaGroup | None:
        return next((g for g in self.groups if g.name == (name or "0")), None)


@dataclass(frozen=True, slots=True)
class UtilizationRule:
    """dstack's ``utilization_policy``: a job whose GPUs include one that stayed below
    ``min_gpu_utilization`` percent for the whole ``time_window_s`` is terminated."""

    min_gpu_utilization: int
    time_window_s: int


# What a dev environment runs after ``init`` (dstack: print how to connect, then
# ``tail -f /dev/null``): the job stays up until it is stopped or auto-stopped.
DEV_ENV_READY = (
    'echo "meshgpu: dev environment $MESHGPU_RUN_NAME is ready: meshgpu attach $MESHGPU_RUN_NAME,'
    ' then ssh $MESHGPU_RUN_NAME"'
)
DEV_ENV_KEEPALIVE = "exec tail -f /dev/null"


def dev_env_commands(init: Any) -> tuple[str, ...]:
    """A dev environment's commands (dstack's ``configurators/dev.py``, less the IDE server
    download: Remote-SSH installs its own): ``init``, a line saying how to connect, then stay up.
    ``init`` commands run as one script, so a failing one fails the job as a task's would."""
    return (*(init or ()), DEV_ENV_READY, DEV_ENV_KEEPALIVE)


@dataclass(frozen=True, slots=True)
class InstanceVolume:
    """An instance volume (``volumes: [/host/path:/job/path]``): the host directory bind-mounted
    at ``path`` in the job (process jobs: its mount namespace; image jobs: ``-v``). ``optional``:
    a host without it runs the job without the mount."""

    instance_path: str
    path: str
    optional: bool = False


def compile_volumes(raw: Any) -> tuple[InstanceVolume, ...]:
    """The instance volumes of ``volumes:`` (named network volumes are left out: the support
    check refuses them before a run is accepted)."""
    out = []
    for v in raw or ():
        if isinstance(v, str):
            src, sep, dst = v.rpartition(":")
            if sep and (src.startswith("/") or src.startswith("~")):
                out.append(InstanceVolume(src, dst))
        elif isinstance(v, Mapping) and v.get("instance_path") and v.get("path"):
            out.append(
                InstanceVolume(str(v["instance_path"]), str(v["path"]), v.get("optional") is True)
            )
    return tuple(out)


@dataclass(frozen=True, slots=True)
class RepoSpecC:
    """dstack's ``repos`` entry (one at most): the uploaded local directory (``local_path``: the
    CLI archives it; hosts only see the archive) or a git ``url`` the host clones (``branch``,
    ``hash``). ``path`` is where it lands (relative: under the working directory), ``if_exists``
    what happens when that directory is not empty (``error`` | ``skip``)."""

    local_path: str | None = None
    url: str | None = None
    branch: str | None = None
    hash: str | None = None
    path: str = "."
    if_exists: str = "error"
    single_branch: bool = True  # dstack: false for dev environments, true otherwise


@dataclass(frozen=True, slots=True)
class FileMap:
    """dstack's ``files`` entry: the local file or directory ``local_path`` (uploaded with the
    code, under ``.meshgpu/files/<n>`` of the archive) placed at ``path`` in the job (relative:
    under the working directory)."""

    local_path: str
    path: str


@dataclass(frozen=True, slots=True)
class RunSpec:
    """Everything meshgpu does with a run, compiled from its configuration."""

    type: str | None = None  # task | service | dev-environment
    priority: int = 0
    jobs: tuple[JobSpec, ...] = ()
    # Names of the run's groups in order (``(None,)`` when it has none): the
    # ``${{ groups[i]... }}`` namespace of commands.
    group_names: tuple[str | None, ...] = (None,)
    placement: Placement = field(default_factory=Placement)
    max_duration_s: int | None = None
    stop_grace_s: float = DEFAULT_STOP_GRACE_S
    retry: RetryPolicy | None = None
    preemptible: bool = False  # ``preemptible: true`` (labels of its hosts may also allow it)
    stop_criteria: str | None = None
    startup_order: str | None = None
    # the runner's
    env: tuple[tuple[str, str], ...] = ()  # variables with a value (the rest come from hosts)
    image: str | None = None
    shell: str | None = None
    working_dir: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    privileged: bool = False  # ``privileged`` or ``docker`` (docker-in-docker)
    shm_size_gb: float | None = None
    volumes: tuple[InstanceVolume, ...] = ()  # instance volumes (named ones are refused)
    service: ServiceSpec | None = None  # a service's ingress/probe/scaling view (None otherwise)
    # Host ports the run's jobs listen on (a service's port, a task's or dev environment's
    # ``ports``): a process job holds them on its host, so two such jobs never share a host.
    host_ports: tuple[int, ...] = ()
    # Dev environments (dstack §1.3, §6): the IDE whose link ``apply`` prints, and the auto-stop
    # rules the job's host applies (meshgpu/devenv/autostop.py): no SSH session for
    # ``inactivity_duration_s`` (None: off), and ``utilization_policy`` (any run type).
    ide: str | None = None
    inactivity_duration_s: int | None = None
    utilization: UtilizationRule | None = None
    # ``schedule: {cron: ...}`` (dstack §1.2): the cron texts as written (dstack's day-of-week,
    # 0 = Monday; ``cron.py`` computes the times). A scheduled run waits for its next start,
    # and goes back to waiting after each time it has run (``RunRecord.next_triggered_at``).
    schedule: tuple[str, ...] = ()
    # ``registry_auth``: (username, password) the container runtime pulls the image with.
    registry_auth: tuple[str, str] | None = None
    # The job's environment (runner/prologue.py): ``python`` (a venv with that interpreter),
    # ``nvcc`` (a host with a CUDA toolkit), the one repo and the ``files`` mappings.
    python: str | None = None
    nvcc: bool = False
    repo: RepoSpecC | None = None
    files: tuple[FileMap, ...] = ()

    def job_spec(self, group: str | None, job_num: int = 0) -> JobSpec:
        """The spec a job of ``group`` (its ``job_num``-th node) runs with: a service replica
        created by scaling up or by a rolling update takes its group's (``None`` and ``"0"``
        are a plain service's one group: its jobs have none)."""
        for j in self.jobs:
            if j.group == group and j.job_num == job_num:
                return j
        for j in self.jobs:
            if j.group == group:
                return j
        return self.jobs[job_num] if job_num < len(self.jobs) else self.jobs[0]

    def for_group(self, group: str | None) -> RunSpec:
        """The spec the jobs of ``group`` run with: the run's, with the group's own environment
        (``JobSpec.env``: image, python, nvcc, docker, privileged, spot_policy, reservation of
        a service replica group) over it. The executor, the prologue and the scheduler read a
        job's spec through this."""
        env = self.job_spec(group).env if self.jobs else None
        if env is None:
            return self
        return replace(
            self,
            image=env.image,
            shell=env.shell,
            privileged=env.privileged,
            python=env.python,
            nvcc=env.nvcc,
            placement=env.placement,
        )

    def placement_of(self, group: str | None) -> Placement:
        """Where the jobs of ``group`` may run (the group's ``spot_policy``, ``reservation``,
        and what its environment needs of a host, over the run's)."""
        env = self.job_spec(group).env if self.jobs else None
        return self.placement if env is None else env.placement

    def image_of(self, group: str | None) -> str | None:
        """The image the jobs of ``group`` run in (None: process jobs on their host)."""
        env = self.job_spec(group).env if self.jobs else None
        return self.image if env is None else env.image

    @property
    def group_kind(self) -> str:
        """What a group is made of in the commands' namespace: nodes of a task, replicas
        otherwise."""
        return "nodes" if self.type == "task" else "replicas"


NO_SPEC = RunSpec()  # what a job of a run that is gone is read with (defaults everywhere)

# Intern tables: equal parts of many runs are one object. Bounded so that a stream of distinct
# configurations cannot grow them without limit (a cleared table only costs sharing).
_RESOURCES: dict[str, Mapping[str, Any]] = {}
_PLACEMENTS: dict[str, Placement] = {}
_RETRIES: dict[str, RetryPolicy | None] = {}
_LIMIT = 10_000


def _intern(table: dict[str, Any], key: str, make: Any) -> Any:
    hit = table.get(key, table)
    if hit is table:
        if len(table) > _LIMIT:
            table.clear()
        hit = table[key] = make()
    return hit


def _strings(values: Any) -> tuple[str, ...] | None:
    return tuple(values) if values else None


def job_image(config: Mapping[str, Any]) -> str | None:
    """The image a run's jobs run in (None: a process job on the host): its ``image``, or
    dstack's image for what needs a container without naming one (``docker``, ``privileged``,
    ``entrypoint``; see ``DSTACK_BASE_IMAGE``)."""
    if config.get("image"):
        return str(config["image"])
    if config.get("docker"):
        return DSTACK_DIND_IMAGE
    if config.get("privileged") or config.get("entrypoint"):
        return DSTACK_DEVEL_IMAGE if config.get("nvcc") else DSTACK_BASE_IMAGE
    return None


def compile_placement(config: Mapping[str, Any]) -> Placement:
    """The placement of a rendered configuration (see ``Placement``)."""
    doc = {k: config[k] for k in PLACEMENT_FIELDS if config.get(k) not in (None, [], {})}
    image = job_image(config)
    if image:
        doc["image"] = True  # which image does not matter; that one needs a container runtime does
    else:
        # What a process job needs of its host's toolchain (an image brings its own).
        if config.get("python"):
            doc["python"] = config["python"]
        if config.get("nvcc"):
            doc["nvcc"] = True
        ports = _host_ports(config)
        if ports:
            # A process job holds its ports on its host: runs that need different ports fit
            # different hosts, so they are different classes of the wait queue.
            doc["host_ports"] = list(ports)
    key = json.dumps(doc, sort_keys=True, separators=(",", ":"))

    def make() -> Placement:
        refs = config.get("instances") or []
        return Placement(
            key=key,
            image=bool(image),
            python=None if image else config.get("python"),
            nvcc=bool(config.get("nvcc")) and not image,
            fleets=_strings(config.get("fleets")),
            backends=_strings(config.get("backends")),
            regions=_strings(config.get("regions")),
            zones=_strings(config.get("availability_zones")),
            instance_types=_strings(config.get("instance_types")),
            reservation=config.get("reservation"),
            spot_policy=config.get("spot_policy") or "on-demand",
            max_price=config.get("max_price"),
            instances=tuple(
                tuple(sorted((k, v) for k, v in ref.items() if v is not None))
                for ref in refs
                if isinstance(ref, dict)
            ),
            cluster=config.get("placement") != "any",
        )

    return _intern(_PLACEMENTS, key, make)


def compile_retry(retry: Any) -> RetryPolicy | None:
    """dstack's ``retry`` (reference §1.2): ``true`` covers every event for an hour; an object
    the listed events (all when omitted) for ``duration`` (an hour when omitted)."""
    if retry is True:
        return RetryPolicy(frozenset(ALL_RETRY_EVENTS), float(DEFAULT_RETRY_DURATION))
    if not isinstance(retry, dict):
        return None

    def make() -> RetryPolicy:
        events = retry.get("on_events")
        duration = retry.get("duration")
        if not isinstance(duration, int | float) or isinstance(duration, bool):
            duration = DEFAULT_RETRY_DURATION
        return RetryPolicy(
            frozenset(ALL_RETRY_EVENTS if events is None else events), float(duration)
        )

    return _intern(_RETRIES, canonical(retry), make)


def _resources(raw: Any) -> tuple[Mapping[str, Any], str]:
    raw = raw or {}
    key = json.dumps(raw, sort_keys=True, separators=(",", ":"))
    return _intern(_RESOURCES, key, lambda: raw), key


def _service_group_name(g: Mapping[str, Any], i: int) -> str:
    """A service replica group's name: its ``name``, or its position (dstack)."""
    name = g.get("name")
    return str(name) if name is not None else str(i)


def _jobs(c: Mapping[str, Any]) -> list[tuple[str | None, Any, int, int, Any]]:
    """(group, resources, replica_num, job_num, group commands) per job: one per node of a task
    (per group), one per initial replica of a service, one for anything else.

    A service's replicas are jobs 0 of their own replica (dstack). Every group appears at least
    once, even one whose ``min`` is 0: the jobs are the templates of the group's replicas too
    (``RunSpec.job_spec``); the state machine starts ``min`` of them (``ServiceSpec.groups``).
    A plain service's jobs have no group (``None``, the replica group ``"0"``)."""
    default_res = c.get("resources") or {}
    groups = c.get("groups") or []
    out: list[tuple[str | None, Any, int, int, Any]] = []
    if c.get("type") == "task":
        num = 0
        if groups:
            for g in groups:
                for _ in range(g.get("nodes") or 1):
                    out.append((g.get("name"), g.get("resources"), 0, num, g.get("commands")))
                    num += 1
        else:
            out.extend((None, default_res, 0, n, None) for n in range(c.get("nodes") or 1))
    elif c.get("type") == "service":
        if groups:
            replica = 0
            for i, g in enumerate(groups):
                name = _service_group_name(g, i)
                for _ in range(max(1, (g.get("replicas") or {}).get("min") or 0)):
                    out.append((name, g.get("resources"), replica, 0, g.get("commands")))
                    replica += 1
        else:
            replicas = c.get("replicas") or {"min": 1}
            out.extend(
                (None, default_res, r, 0, None) for r in range(max(1, replicas.get("min") or 0))
            )
    else:
        out.append((None, default_res, 0, 0, None))
    return out


def _duration(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def stop_grace(value: Any) -> float:
    """dstack's ``stop_duration`` as the runner applies it: 300 s by default, ``off`` an hour."""
    if value == "off":
        return STOP_OFF_GRACE_S
    return float(value) if isinstance(value, int) else DEFAULT_STOP_GRACE_S


def _seconds(value: Any, default: float) -> float:
    return (
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else default
    )


def _scaling(raw: Any) -> Scaling | None:
    if not isinstance(raw, dict) or not raw.get("target"):
        return None
    return Scaling(
        target=float(raw["target"]),
        window_s=int(raw.get("window") or 60),
        scale_up_delay_s=_seconds(raw.get("scale_up_delay"), 300.0),
        scale_down_delay_s=_seconds(raw.get("scale_down_delay"), 600.0),
    )


def _probe(raw: Mapping[str, Any]) -> Probe:
    return Probe(
        method=str(raw.get("method") or "get"),
        url=str(raw.get("url") or "/"),
        headers=tuple((h["name"], h["value"]) for h in raw.get("headers") or ()),
        body=raw.get("body"),
        timeout_s=_seconds(raw.get("timeout"), 10.0),
        interval_s=_seconds(raw.get("interval"), 15.0),
        ready_after=int(raw.get("ready_after") or 1),
        until_ready=bool(raw.get("until_ready")),
    )


def default_model_probe(model: ModelRoute) -> Probe:
    """dstack's probe for a ``model:`` service without ``probes``: one chat completion of one
    token, 30 s to answer."""
    body = json.dumps(
        {"model": model.name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    )
    return Probe(
        method="post",
        url=model.prefix.rstrip("/") + "/chat/completions",
        headers=(("Content-Type", "application/json"),),
        body=body,
        timeout_s=30.0,
    )


def compile_service(c: Mapping[str, Any]) -> ServiceSpec | None:
    """The service view of a rendered ``type: service`` configuration (None for other types)."""
    if c.get("type") != "service" or not isinstance(c.get("port"), dict):
        return None
    raw_model = c.get("model")
    model = (
        ModelRoute(
            name=raw_model["name"],
            type=raw_model.get("type") or "chat",
            format=raw_model.get("format") or "openai",
            prefix=raw_model.get("prefix") or "/v1",
        )
        if isinstance(raw_model, dict) and raw_model.get("name")
        else None
    )
    raw_probes = c.get("probes")
    probes = tuple(_probe(p) for p in raw_probes or ())
    if raw_probes is None and model is not None:
        probes = (default_model_probe(model),)
    if c.get("groups"):
        groups = tuple(
            ReplicaGroup(
                name=_service_group_name(g, i),
                min=int((g.get("replicas") or {}).get("min") or 0),
                max=int((g.get("replicas") or {}).get("max") or 0),
                scaling=_scaling(g.get("scaling")),
            )
            for i, g in enumerate(c["groups"])
        )
    else:
        replicas = c.get("replicas") or {"min": 1, "max": 1}
        low = int(replicas.get("min") or 0)
        groups = (
            ReplicaGroup(
                name="0",
                min=low,
                max=int(replicas.get("max") if replicas.get("max") is not None else low),
                scaling=_scaling(c.get("scaling")),
            ),
        )
    return ServiceSpec(
        port=int(c["port"]["container_port"]),
        strip_prefix=c.get("strip_prefix") is not False,
        auth=c.get("auth") is not False,
        model=model,
        probes=probes,
        probes_configured=raw_probes is not None,
        rate_limits=tuple(
            RateLimitRule(
                prefix=r.get("prefix") or "/",
                key=(r.get("key") or {}).get("type") or "ip_address",
                header=(r.get("key") or {}).get("header"),
                rps=float(r["rps"]),
                burst=int(r.get("burst") or 0),
            )
            for r in c.get("rate_limits") or ()
        ),
        groups=groups,
    )


def _host_ports(c: Mapping[str, Any]) -> tuple[int, ...]:
    raw = list(c.get("ports") or ())
    if c.get("type") == "task":  # a task's groups list their own ports
        for g in c.get("groups") or ():
            raw.extend(g.get("ports") or () if isinstance(g, dict) else ())
    ports = [p.get("container_port") for p in raw if isinstance(p, dict)]
    if c.get("type") == "service" and isinstance(c.get("port"), dict):
        ports.append(c["port"].get("container_port"))
    return tuple(sorted({int(p) for p in ports if isinstance(p, int)}))


def compile_utilization(raw: Any) -> UtilizationRule | None:
    if not isinstance(raw, dict):
        return None
    low, window = raw.get("min_gpu_utilization"), raw.get("time_window")
    if not isinstance(low, int) or not isinstance(window, int):
        return None
    return UtilizationRule(min_gpu_utilization=low, time_window_s=window)


def _crons(raw: Any) -> tuple[str, ...]:
    crons = raw.get("cron") if isinstance(raw, dict) else None
    if isinstance(crons, str):
        crons = [crons]
    return tuple(str(c) for c in crons or ())


def _registry_auth(raw: Any) -> tuple[str, str] | None:
    if not isinstance(raw, dict) or raw.get("username") is None:
        return None
    return (str(raw["username"]), str(raw.get("password") or ""))


def compile_repo(config: Mapping[str, Any]) -> RepoSpecC | None:
    """The run's one repo (``repos[0]``), None without one."""
    repos = config.get("repos") or []
    raw = repos[0] if repos and isinstance(repos[0], dict) else None
    if raw is None:
        return None
    single = config.get("single_branch")
    return RepoSpecC(
        local_path=raw.get("local_path"),
        url=raw.get("url"),
        branch=raw.get("branch"),
        hash=raw.get("hash"),
        path=raw.get("path") or ".",
        if_exists=raw.get("if_exists") or "error",
        single_branch=(config.get("type") != "dev-environment") if single is None else bool(single),
    )


# A service replica group's fields that decide its jobs' environment and placement (dstack 0.22
# ``groups:``; the models refuse setting one both on the service and on a group).
GROUP_ENV_FIELDS = ("image", "python", "nvcc", "docker", "privileged", "spot_policy", "reservation")
# One of these in a group chooses the group's environment: the service's other two do not apply.
_ENV_KIND = ("image", "python", "docker")


def _shell_of(config: Mapping[str, Any], image: str | None) -> str | None:
    # dstack's own images run commands with bash (a custom image: sh, the runner's default)
    return config.get("shell") or ("bash" if image and not config.get("image") else None)


def _group_config(config: Mapping[str, Any], g: Mapping[str, Any]) -> dict[str, Any]:
    """The run's configuration as one replica group's jobs see it: the group's fields over the
    service's. A group that picks its environment (``image``, ``python`` or ``docker``) drops
    the service's choice of the other two (they are mutually exclusive in one place)."""
    own = {k: g[k] for k in GROUP_ENV_FIELDS if g.get(k) not in (None, False)}
    merged = dict(config)
    if any(k in own for k in _ENV_KIND):
        for k in _ENV_KIND:
            merged.pop(k, None)
    merged.update(own)
    return merged


def _group_envs(config: Mapping[str, Any]) -> dict[str | None, JobEnv]:
    """``JobEnv`` of each service replica group that sets one of ``GROUP_ENV_FIELDS`` (the
    others run with the run's)."""
    if config.get("type") != "service":
        return {}
    out: dict[str | None, JobEnv] = {}
    for i, g in enumerate(config.get("groups") or ()):
        if not isinstance(g, Mapping) or all(g.get(k) in (None, False) for k in GROUP_ENV_FIELDS):
            continue
        merged = _group_config(config, g)
        image = job_image(merged)
        out[_service_group_name(g, i)] = JobEnv(
            image=image,
            shell=_shell_of(merged, image),
            privileged=bool(merged.get("privileged") or merged.get("docker")),
            docker=bool(merged.get("docker")) and not merged.get("image"),
            python=merged.get("python") or None,
            nvcc=bool(merged.get("nvcc")),
            placement=compile_placement(merged),
        )
    return out


def compile_run(config: Mapping[str, Any]) -> RunSpec:
    """The spec of a run from its rendered configuration (``render.to_json``)."""
    commands = tuple(config.get("commands") or ())
    dev = config.get("type") == "dev-environment"
    if dev:
        commands = dev_env_commands([*(config.get("setup") or ()), *(config.get("init") or ())])
    image = job_image(config)
    docker = bool(config.get("docker")) and not config.get("image")
    envs = _group_envs(config)
    jobs = []
    for group, raw, replica, num, group_commands in _jobs(config):
        resources, key = _resources(raw)
        env = envs.get(group)
        # ``docker: true`` (the run's or the group's) starts the daemon before the commands.
        dind = docker if env is None else env.docker
        own = tuple(group_commands) if group_commands else tuple(commands)
        jobs.append(
            JobSpec(
                job_num=num,
                replica_num=replica,
                group=group,
                resources=resources,
                resources_key=key,
                commands=((START_DOCKERD,) if dind else ()) + own,
                env=env,
            )
        )
    groups = config.get("groups") or []
    env = config.get("env") or {}
    shm = (config.get("resources") or {}).get("shm_size")
    return RunSpec(
        type=config.get("type"),
        priority=int(config.get("priority") or 0),
        jobs=tuple(jobs),
        group_names=tuple(
            _service_group_name(g, i) if config.get("type") == "service" else g.get("name")
            for i, g in enumerate(groups)
        )
        or (None,),
        placement=compile_placement(config),
        max_duration_s=_duration(config.get("max_duration")),
        stop_grace_s=stop_grace(config.get("stop_duration")),
        retry=compile_retry(config.get("retry")),
        preemptible=config.get("preemptible") is True,
        stop_criteria=config.get("stop_criteria"),
        startup_order=config.get("startup_order"),
        env=tuple((k, v) for k, v in env.items() if v is not None),
        image=image,
        shell=_shell_of(config, image),
        working_dir=config.get("working_dir"),
        user=config.get("user"),
        entrypoint=config.get("entrypoint"),
        privileged=bool(config.get("privileged") or config.get("docker")),
        shm_size_gb=shm,
        volumes=compile_volumes(config.get("volumes")),
        service=compile_service(config),
        host_ports=_host_ports(config),
        ide=config.get("ide") if dev else None,
        inactivity_duration_s=_duration(config.get("inactivity_duration")) if dev else None,
        utilization=compile_utilization(config.get("utilization_policy")),
        schedule=_crons(config.get("schedule")),
        registry_auth=_registry_auth(config.get("registry_auth")),
        python=config.get("python") or None,
        nvcc=bool(config.get("nvcc")),
        repo=compile_repo(config),
        files=tuple(
            FileMap(local_path=str(f["local_path"]), path=str(f.get("path") or f["local_path"]))
            for f in config.get("files") or ()
            if isinstance(f, dict) and f.get("local_path")
        ),
    )
