"""The rule: every field of a run configuration is honoured, or refused where it is written.

``FIELDS`` has one entry per field of every run type (task, service, dev-environment), nested
fields included (``resources.gpu.count``, ``probes[].url``, ``groups[].image``): ``Honoured``
says where the field takes effect; ``Refused`` says why it cannot, and when (a refusal may depend
on the value, on the rest of the configuration, or on what the mesh has: ``MeshCapabilities``);
``Part`` marks a field of a value that is honoured or refused as a whole (``registry_auth.username``
goes with ``registry_auth``). ``tests/config/test_support.py`` walks every field of the models
and fails, naming the field, when one has no entry.

``check_support`` applies the table to a parsed configuration and returns one ``ConfigIssue`` per
refused field, at the line and column where the field is written. It runs in two places:

* ``meshgpu config validate`` (offline: ``caps`` None): only what no mesh could honour;
* ``Runs.submit`` (the server, with the capabilities of the mesh's members): everything,
  so a configuration that this mesh cannot run as written is refused at ``apply``, not left
  pending or run with a field silently dropped.

Parsing (``loader.parse_config``) is the schema: every valid dstack configuration parses. This
module is the second layer, what meshgpu does with each field.
"""

from __future__ import annotations

import re
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from meshgpu.config._units import IntRange, MemoryRange
from meshgpu.config.errors import ConfigIssue
from meshgpu.config.infra import FleetConfiguration
from meshgpu.config.loader import Positions, fmt_path, models_in
from meshgpu.config.resources import ResourcesSpec
from meshgpu.config.runs import (
    BaseRunConfiguration,
    DevEnvironmentConfiguration,
    GatewayRef,
    ScalingSpec,
    ServiceConfiguration,
    TaskConfiguration,
)

RUN_TYPES: tuple[type[BaseRunConfiguration], ...] = (
    TaskConfiguration,
    ServiceConfiguration,
    DevEnvironmentConfiguration,
)


@dataclass(frozen=True, slots=True)
class MeshCapabilities:
    """What the mesh's members can do, as far as refusing a configuration goes (from their node
    records, ``state/records.py`` ``NodeRecord``)."""

    container_runtime: bool = False  # some member runs image jobs (docker/podman)
    # Some member (or a backend) provides named network volumes: none does yet.
    network_volumes: bool = False
    # The mesh's configured backends (for a backend fleet applied to it): (name, type, whether
    # it places instances together: ``Backend.cluster_placement``); None: not known (offline).
    backends: tuple[tuple[str, str, bool], ...] | None = None

    @classmethod
    def from_nodes(cls, nodes: Iterable[Any]) -> MeshCapabilities:
        """From the mesh's node records (``state.nodes.values()``)."""
        return cls(container_runtime=any(getattr(n, "container_runtime", None) for n in nodes))


Predicate = Callable[[Any, Any, MeshCapabilities | None], bool]
Reason = str | Callable[[Any], str]


@dataclass(frozen=True, slots=True)
class Honoured:
    """The field takes effect; ``where``: the code (and test) that makes it so."""

    where: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The field is refused with ``reason`` (what, why and what to do) whenever ``when`` holds
    for its value; otherwise it is honoured as ``otherwise`` says (None: never honoured).
    ``when`` gets ``caps`` None offline: a refusal that depends on the mesh then holds no one
    back (``meshgpu config validate`` cannot know the mesh)."""

    reason: Reason
    when: Predicate = lambda value, config, caps: True  # noqa: E731
    otherwise: str | None = None

    def text(self, value: Any) -> str:
        return self.reason(value) if callable(self.reason) else self.reason


@dataclass(frozen=True, slots=True)
class Part:
    """A field of a value that ``of`` (another entry) honours or refuses as a whole."""

    of: str


Entry = Honoured | Refused | Part


# ---------------------------------------------------------------------------------------------
# Predicates


def _set(value: Any) -> bool:
    return value not in (None, False, "", [], {})


def _container_job(config: BaseRunConfiguration) -> bool:
    """Does one of the run's jobs run in a container (``config/spec.py`` ``job_image``; a
    service replica group's own ``image``/``docker``/``privileged`` included)?"""
    groups = getattr(config, "groups", None) or []
    return bool(
        config.image
        or config.docker
        or config.privileged
        or config.entrypoint
        or any(getattr(g, "image", None) or getattr(g, "docker", None) for g in groups)
        or any(getattr(g, "privileged", None) for g in groups)
    )


def _no_runtime(value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None) -> bool:
    return caps is not None and not caps.container_runtime and _set(value)


def _no_runtime_for_container(
    value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None
) -> bool:
    return _no_runtime(value, config, caps) and _container_job(config)


def _network_volume(
    value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None
) -> bool:
    return caps is not None and not caps.network_volumes


def _not_dev(value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None) -> bool:
    return _set(value) and config.type != "dev-environment"


def _named_gateway(value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None) -> bool:
    return isinstance(value, GatewayRef)


def _given(value: Any, config: BaseRunConfiguration, caps: MeshCapabilities | None) -> bool:
    return value is not None


# ``user``: a name (POSIX portable, as useradd takes it) or a uid, optionally ``:group``/``:gid``.
_ID = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?|\d{1,10})$")


def _impossible_user(value: Any, config: BaseRunConfiguration, caps: Any) -> bool:
    if value is None:
        return False
    parts = str(value).split(":")
    if len(parts) > 2 or not all(_ID.match(p) for p in parts):
        return True
    return any(p.isdigit() and int(p) >= 2**32 - 1 for p in parts)  # (uid_t)-1 is "no one"


def _needs_runtime(field: str) -> str:
    return (
        f"{field} needs a container runtime; no member has one: start an agent with docker or "
        "podman on some host (or remove it)"
    )


def _volume_reason(value: Any) -> str:
    names = "/".join(value) if isinstance(value, list) else str(value)
    return (
        f"named volume {names!r}: network volumes are refused until a backend provides them; "
        "mount a host directory instead (/host/path:/job/path)"
    )


_GROUP = (
    "meshgpu/config/spec.py (JobSpec.env, RunSpec.for_group: the group's over the service's; "
    "tests/config/test_group_fields.py)"
)

# Where the common places are (each exists in the repository; the test checks the paths).
_FILTERS = "meshgpu/scheduler/filters.py (RunFilters.reject; tests/scheduler/test_placement.py)"
_MATCH = "meshgpu/scheduler/matching.py (tests/scheduler/test_placement.py)"
_RUNNER = "meshgpu/runner/executor.py (Executor._prepare)"
_CONTAINER = "meshgpu/runner/container.py (container_argv; tests/runner/test_runner.py)"
_INGRESS = (
    "meshgpu/services/ingress.py, meshgpu/services/nginx_conf.py (tests/services/test_ingress.py)"
)
_PROBES = "meshgpu/services/probes.py (tests/services/test_probes.py)"
_SCALER = "meshgpu/services/autoscaler.py (tests/services/test_autoscaler.py)"
_SPEC = "meshgpu/config/spec.py (compile_run; tests/config/test_spec.py)"
_PROVISIONING = (
    "provisioning only: no instance is created for a run on this mesh (its members are "
    "reused, where dstack applies the fleet's own settings, §1.2); backend fleets (#17) apply it"
)


def _entries() -> dict[str, Entry]:
    e: dict[str, Entry] = {
        "type": Honoured("meshgpu/config/loader.py (CONFIG_TYPES)"),
        "name": Honoured("meshgpu/ops/runs.py (Runs.submit: the run's name)"),
        # --- the job's environment
        "image": Refused(
            _needs_runtime("image"),
            _no_runtime,
            f"{_FILTERS}: hosts with a runtime; {_CONTAINER}",
        ),
        "docker": Refused(
            _needs_runtime("docker: true (Docker-in-Docker)"),
            _no_runtime,
            f"{_SPEC}: dstack's dstackai/dind image, privileged, start-dockerd first; {_CONTAINER}",
        ),
        "privileged": Refused(
            _needs_runtime("privileged"),
            _no_runtime,
            f"{_SPEC}: a privileged container (dstack's base image without image:); {_CONTAINER}",
        ),
        "entrypoint": Refused(
            _needs_runtime("entrypoint"),
            _no_runtime,
            f"{_SPEC}: the container's entrypoint (dstack's base image without image:); "
            f"{_CONTAINER}",
        ),
        "registry_auth": Refused(
            _needs_runtime("registry_auth (an image pull)"),
            _no_runtime_for_container,
            f"{_CONTAINER}: the image pull logs in with it (SCHED); a job without image pulls "
            "nothing",
        ),
        "registry_auth.username": Part("registry_auth"),
        "registry_auth.password": Part("registry_auth"),
        "python": Honoured(f"{_RUNNER}: a venv with that interpreter (ENV); {_FILTERS}"),
        "nvcc": Honoured(f"{_FILTERS}: hosts with a CUDA toolkit (ENV)"),
        "user": Refused(
            lambda v: (
                f"user {v!r} cannot exist: write a user name or a uid, optionally with :group or "
                ":gid (e.g. user: app or user: 1000:1000)"
            ),
            _impossible_user,
            f"{_RUNNER}: the job's OS user (SANDBOX); {_CONTAINER}: --user",
        ),
        "working_dir": Honoured(f"{_RUNNER}: commands start there (ENV); {_CONTAINER}: -w"),
        "shell": Honoured(f"{_RUNNER} (_shell)"),
        "env": Honoured("meshgpu/runner/jobenv.py (job_environment; tests/runner/test_runner.py)"),
        "home_dir": Refused(
            "home_dir is deprecated and does nothing in dstack: remove it (set HOME in env to "
            "choose the job's home)",
            _given,
        ),
        "setup": Refused(
            "setup is deprecated and dstack runs it only in dev environments: put these commands "
            "first in commands",
            _not_dev,
            f"{_SPEC}: a dev environment runs setup, then init",
        ),
        "dstack": Refused(
            "dstack: true gives the job dstack's server API at DSTACK_SERVER_URL for the dstack "
            "CLI and Python API; meshgpu does not speak dstack's API, so a dstack client in the "
            "job would fail: remove it, and use meshgpu's CLI or API from the job instead (pass "
            "MESHGPU_URL, MESHGPU_TOKEN and MESHGPU_CA in env; see docs/job-environment.md)",
            lambda v, c, caps: v is True,
        ),
        "single_branch": Honoured(
            f"{_RUNNER}: a git URL repo is cloned with one branch unless single_branch: false "
            "(ENV); an uploaded directory has no branches to leave out"
        ),
        # --- code and data
        "repos": Honoured(f"{_RUNNER}: the repo at DSTACK_REPO_DIR (ENV)"),
        "repos[].local_path": Honoured("meshgpu/cli/_runs.py (_submit: the archive; ENV)"),
        "repos[].url": Honoured(f"{_RUNNER}: cloned by the job's prologue (ENV)"),
        "repos[].branch": Honoured(f"{_RUNNER}: cloned by the job's prologue (ENV)"),
        "repos[].hash": Honoured(f"{_RUNNER}: cloned by the job's prologue (ENV)"),
        "repos[].path": Honoured(f"{_RUNNER}: where the repo is placed (ENV)"),
        "repos[].if_exists": Honoured(f"{_RUNNER}: cloned by the job's prologue (ENV)"),
        "files": Honoured("meshgpu/cli/_runs.py (_submit: into the archive; ENV)"),
        "files[].local_path": Honoured("meshgpu/cli/_runs.py (_submit: into the archive; ENV)"),
        "files[].path": Honoured(f"{_RUNNER}: moved to its path in the job (ENV)"),
        "volumes": Honoured(f"{_RUNNER}: bind mounts (SANDBOX); {_CONTAINER}: -v"),
        "volumes[].name": Refused(_volume_reason, _network_volume),
        "volumes[].path": Honoured(f"{_RUNNER}: the mount point (SANDBOX)"),
        "volumes[].instance_path": Honoured(f"{_RUNNER}: the host directory (SANDBOX)"),
        "volumes[].optional": Honoured(f"{_RUNNER}: a missing host directory is skipped (SANDBOX)"),
        # --- resources (top level and per group)
        "resources": Honoured(_MATCH),
        "resources.cpu": Honoured(_MATCH),
        "resources.cpu.arch": Honoured(_MATCH),
        "resources.cpu.count": Honoured(_MATCH),
        "resources.memory": Honoured(_MATCH),
        "resources.shm_size": Honoured(f"{_MATCH}; /dev/shm of that size (SANDBOX); {_CONTAINER}"),
        "resources.gpu": Honoured(_MATCH),
        "resources.gpu.vendor": Honoured(_MATCH),
        "resources.gpu.name": Honoured(_MATCH),
        "resources.gpu.count": Honoured(_MATCH),
        "resources.gpu.memory": Honoured(_MATCH),
        "resources.gpu.total_memory": Honoured(_MATCH),
        "resources.gpu.compute_capability": Honoured(_MATCH),
        "resources.disk": Honoured(_MATCH),
        "resources.disk.size": Honoured(_MATCH),
        # --- scheduling (profile parameters)
        "priority": Honoured("meshgpu/scheduler/queue.py (tests/scheduler/test_placement.py)"),
        "preemptible": Honoured(
            "meshgpu/scheduler/preemption.py (tests/scheduler/test_preemption.py)"
        ),
        "backends": Honoured(f"{_FILTERS}: the backend label"),
        "regions": Honoured(f"{_FILTERS}: the region label"),
        "availability_zones": Honoured(f"{_FILTERS}: the zone label"),
        "instance_types": Honoured(f"{_FILTERS}: the instance_type label"),
        "reservation": Honoured(f"{_FILTERS}: the reservation label"),
        "spot_policy": Honoured(f"{_FILTERS}: the spot label (SCHED)"),
        "max_price": Honoured(f"{_FILTERS}: the price label (SCHED)"),
        "fleets": Honoured(f"{_FILTERS}: the fleet label"),
        "instances": Honoured(_FILTERS),
        "instances[].name": Honoured(_FILTERS),
        "instances[].hostname": Honoured(_FILTERS),
        "instances[].fleet": Honoured(_FILTERS),
        "instances[].instance": Honoured(_FILTERS),
        "creation_policy": Honoured(
            "meshgpu/scheduler/placement.py: a run waits for a member (why-pending); no backend "
            "creates instances yet, so reuse-or-create is reuse, as in dstack with SSH fleets only"
        ),
        "idle_duration": Honoured(_PROVISIONING),
        "tags": Honoured(_PROVISIONING),
        "backend_options": Honoured(_PROVISIONING),
        "retry": Honoured("meshgpu/state/retry.py (tests/state/test_run_policies.py)"),
        "retry.on_events": Honoured("meshgpu/state/retry.py (tests/state/test_run_policies.py)"),
        "retry.duration": Honoured("meshgpu/state/retry.py (tests/state/test_run_policies.py)"),
        "max_duration": Honoured("meshgpu/runner/shim.py, meshgpu/scheduler/deadlines.py"),
        "stop_duration": Honoured("meshgpu/runner/shim.py, meshgpu/scheduler/deadlines.py"),
        "utilization_policy": Honoured(
            "meshgpu/devenv/autostop.py (tests/devenv/test_autostop.py)"
        ),
        "utilization_policy.min_gpu_utilization": Honoured("meshgpu/devenv/autostop.py"),
        "utilization_policy.time_window": Honoured("meshgpu/devenv/autostop.py"),
        "startup_order": Honoured(f"{_RUNNER} (tests/runner/test_startup_order.py)"),
        "stop_criteria": Honoured("meshgpu/state/machine.py (tests/state/test_run_policies.py)"),
        "schedule": Honoured("meshgpu/control/ (the leader starts it on schedule; SCHED)"),
        "schedule.cron": Honoured("meshgpu/control/ (the leader starts it on schedule; SCHED)"),
        # --- commands and ports
        "commands": Honoured(f"{_RUNNER}; {_SPEC}"),
        "init": Honoured(f"{_SPEC} (dev_env_commands)"),
        "ports": Honoured(
            "meshgpu/cli/_attach.py (port_forwards; tests/devenv/test_attach.py); "
            "meshgpu/scheduler/placement.py: a process job holds them on its host"
        ),
        "ports[].local_port": Honoured("meshgpu/cli/_attach.py (port_forwards)"),
        "ports[].container_port": Honoured("meshgpu/cli/_attach.py (port_forwards)"),
        # --- tasks
        "nodes": Honoured(f"{_SPEC}: one job per node; meshgpu/scheduler/placement.py (gangs)"),
        "groups": Honoured(f"{_SPEC} (_jobs)"),
        "groups[].name": Honoured(f"{_SPEC}: the ${{{{ groups[i] }}}} namespace"),
        "groups[].nodes": Honoured(f"{_SPEC} (_jobs)"),
        "groups[].commands": Honoured(f"{_SPEC} (JobSpec.commands)"),
        "groups[].resources": Honoured(f"{_SPEC} (JobSpec.resources); {_MATCH}"),
        "groups[].scaling": Honoured(f"{_SCALER}; {_SPEC} (compile_service)"),
        "groups[].ports": Honoured(
            f"{_SPEC} (_host_ports); meshgpu/cli/_attach.py (port_forwards)"
        ),
        "groups[].ports[].local_port": Honoured("meshgpu/cli/_attach.py (port_forwards)"),
        "groups[].ports[].container_port": Honoured("meshgpu/cli/_attach.py (port_forwards)"),
        # --- services
        "port": Honoured(f"{_INGRESS}: traffic to the replicas' port"),
        "port.container_port": Honoured(f"{_INGRESS}: traffic to the replicas' port"),
        "port.local_port": Honoured(
            f"{_INGRESS}: published on every node's API port (dstack's gateway publishes on "
            "80/443 whatever the legacy a:b form says)"
        ),
        "gateway": Refused(
            lambda v: (
                f"gateway {(v.project + '/') if getattr(v, 'project', None) else ''}"
                f"{getattr(v, 'name', v)}: meshgpu has no gateways; the ingress on every node "
                "serves services (remove it, or write gateway: true)"
            ),
            _named_gateway,
            f"{_INGRESS}: the ingress on every node is the gateway (true, false or unset)",
        ),
        "gateway.name": Part("gateway"),
        "gateway.project": Part("gateway"),
        "https": Honoured(
            f"{_INGRESS}: services are served on every node's API port, over TLS with the "
            "mesh's identity; no certificate is requested for a service (https: false)"
        ),
        "strip_prefix": Honoured(_INGRESS),
        "auth": Honoured(_INGRESS),
        "model": Honoured("meshgpu/services/models.py (tests/services/test_models.py)"),
        "model.type": Honoured("meshgpu/services/models.py"),
        "model.name": Honoured("meshgpu/services/models.py"),
        "model.format": Honoured("meshgpu/services/models.py (format: tgi is refused in parsing)"),
        "model.prefix": Honoured("meshgpu/services/models.py"),
        "model.chat_template": Refused(
            "chat_template is for format: tgi, which meshgpu does not serve: the OpenAI API the "
            "model serves applies its own template (remove it)",
            _given,
        ),
        "model.eos_token": Refused(
            "eos_token is for format: tgi, which meshgpu does not serve (remove it)", _given
        ),
        "replicas": Honoured(f"{_SCALER}; {_SPEC} (compile_service)"),
        "scaling": Honoured(_SCALER),
        "scaling.metric": Honoured(_SCALER),
        "scaling.target": Honoured(_SCALER),
        "scaling.window": Honoured(_SCALER),
        "scaling.scale_up_delay": Honoured(_SCALER),
        "scaling.scale_down_delay": Honoured(_SCALER),
        "rate_limits": Honoured(f"meshgpu/services/ratelimit.py; {_INGRESS}"),
        "rate_limits[].prefix": Honoured("meshgpu/services/ratelimit.py"),
        "rate_limits[].key": Honoured("meshgpu/services/ratelimit.py"),
        "rate_limits[].key.type": Honoured("meshgpu/services/ratelimit.py"),
        "rate_limits[].key.header": Honoured("meshgpu/services/ratelimit.py"),
        "rate_limits[].rps": Honoured("meshgpu/services/ratelimit.py"),
        "rate_limits[].burst": Honoured("meshgpu/services/ratelimit.py"),
        "probes": Honoured(_PROBES),
        "groups[].replicas": Honoured(f"{_SCALER}; {_SPEC} (compile_service)"),
        "groups[].router": Refused(
            lambda v: (
                f"router (type: {getattr(v, 'type', v)}) is not supported: meshgpu's ingress "
                "sends the service's traffic to every replica of every group, and neither tells "
                "a router its workers (dstack's SMG worker sync) nor sets "
                "DSTACK_ROUTER_INTERNAL_IP for a dynamo router's workers. Run the router as its "
                "own service (one replica) and the workers as another service, giving the "
                "router the workers' service URL (or, for dynamo, the workers the router "
                "service's address in env); see docs/services.md"
            ),
            _given,
        ),
        "groups[].router.type": Part("groups[].router"),
        # --- dev environments
        "ide": Honoured("meshgpu/cli/_devenv.py (ide_link; tests/devenv/test_devenv_cli.py)"),
        "version": Honoured(
            "meshgpu/cli/_devenv.py: the IDE installs its server, matching the client's version, "
            "over Remote-SSH (what dstack pins version for)"
        ),
        "inactivity_duration": Honoured(
            "meshgpu/devenv/autostop.py (tests/devenv/test_autostop.py)"
        ),
    }
    for key in ("type", "url", "method", "headers", "body", "timeout", "interval"):
        e[f"probes[].{key}"] = Honoured(_PROBES)
    for key in ("ready_after", "until_ready"):
        e[f"probes[].{key}"] = Honoured(_PROBES)
    e["probes[].headers[].name"] = Honoured(_PROBES)
    e["probes[].headers[].value"] = Honoured(_PROBES)
    # A service replica group's own environment and placement (dstack 0.22 ``groups:``): each
    # job of the group runs with them, the service's where the group sets none.
    e["groups[].image"] = Refused(
        _needs_runtime("image (of a replica group)"),
        _no_runtime,
        f"{_GROUP}; {_FILTERS}: hosts with a runtime; {_CONTAINER}",
    )
    e["groups[].docker"] = Refused(
        _needs_runtime("docker: true (of a replica group)"),
        _no_runtime,
        f"{_GROUP}: dstack's dind image, privileged, start-dockerd first; {_CONTAINER}",
    )
    e["groups[].privileged"] = Refused(
        _needs_runtime("privileged (of a replica group)"),
        _no_runtime,
        f"{_GROUP}: a privileged container; {_CONTAINER}",
    )
    e["groups[].python"] = Honoured(
        f"{_GROUP}; {_RUNNER}: a venv with that interpreter; {_FILTERS}"
    )
    e["groups[].nvcc"] = Honoured(f"{_GROUP}; {_FILTERS}: hosts with a CUDA toolkit")
    e["groups[].spot_policy"] = Honoured(f"{_GROUP}; {_FILTERS}: the spot label")
    e["groups[].reservation"] = Honoured(f"{_GROUP}; {_FILTERS}: the reservation label")
    return e


FIELDS: dict[str, Entry] = _entries()


# ---------------------------------------------------------------------------------------------
# Walking models and configurations

_LEAVES = (IntRange, MemoryRange)  # values, not groups of fields
# Models that mean the same wherever they appear: their fields have one entry each.
_SHARED: dict[type[BaseModel], str] = {ResourcesSpec: "resources", ScalingSpec: "scaling"}


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _is_list(typing.get_args(annotation)[0])
    if origin is list:
        return True
    return origin is not None and any(_is_list(a) for a in typing.get_args(annotation))


def _nested(annotation: Any) -> list[type[BaseModel]]:
    return [m for m in dict.fromkeys(models_in(annotation)) if not issubclass(m, _LEAVES)]


def _child_key(key: str, model: type[BaseModel], listed: bool) -> str:
    return _SHARED.get(model) or (key + ("[]" if listed else ""))


def field_keys(model: type[BaseModel], prefix: str = "") -> Iterator[str]:
    """The table key of every field of ``model`` and of the models in it, recursively."""
    for name, info in model.model_fields.items():
        key = prefix + name
        yield key
        for sub in _nested(info.annotation):
            yield from field_keys(sub, _child_key(key, sub, _is_list(info.annotation)) + ".")


def fleet_field_keys(kind: str) -> set[str]:
    """Every field of ``type: fleet`` an SSH (``kind`` "ssh") or backend fleet has an entry for."""
    keys = set(field_keys(FleetConfiguration))
    return keys if kind == "ssh" else {k for k in keys if not k.startswith("ssh_config")}


def all_field_keys() -> set[str]:
    """Every field of every run type (``RUN_TYPES``)."""
    return {k for model in RUN_TYPES for k in field_keys(model)}


# ---------------------------------------------------------------------------------------------
# Fleets (``type: fleet``): the same rule. An SSH fleet (``ssh_config``) and a backend fleet
# (everything else) take different fields, so each has its own table; both cover every field of
# ``FleetConfiguration`` (the backend table leaves out ``ssh_config``'s, whose presence makes a
# fleet an SSH fleet). Nothing here depends on the mesh: checked offline and at apply alike.

_SSH_CTL = "meshgpu/control/fleets.py (FleetController; tests/e2e/test_ssh_fleet.py)"
_SSH_TARGET = "meshgpu/control/fleets.py (FleetController._target: the SSH connection)"
_SSH_ARGS = "meshgpu/control/fleets.py (FleetController._agent_args)"
_BF = "meshgpu/control/backend_fleets.py"
_BF_TEST = "tests/fleets/test_backend_aws.py"
_BF_REQ = f"{_BF} (requirements, filter_offers: the offers an instance is bought from; {_BF_TEST})"

# Parsing already refuses these in an SSH fleet (``config/infra.py`` ``FleetConfiguration._kind``).
_CLOUD_ONLY_PARSED = ("nodes", "resources", "backends", "regions", "instance_types", "spot_policy")


def _for_backend_fleets(field: str) -> str:
    return (
        f"{field} is for backend fleets (instances bought from a cloud); an SSH fleet's hosts "
        "are the ones listed in ssh_config: remove it"
    )


def _cluster_without_backend(value: Any, config: Any, caps: Any) -> bool:
    """``placement: cluster`` with more than one node on a mesh none of whose backends that the
    fleet may use places instances together (known at apply only: offline, never)."""
    if value != "cluster" or caps is None or caps.backends is None:
        return False
    hi = config.nodes.max if config.nodes is not None else None
    if hi is not None and hi <= 1:
        return False
    allowed = set(config.backends or ())
    usable = [
        can
        for name, type_, can in caps.backends
        if not allowed or name in allowed or type_ in allowed
    ]
    return bool(usable) and not any(usable)  # none at all: apply says "add a backend"


def _not_x86(value: Any, config: Any, caps: Any) -> bool:
    return value is not None and str(getattr(value, "value", value)).lower() not in ("x86",)


def _not_nvidia(value: Any, config: Any, caps: Any) -> bool:
    return value is not None and str(getattr(value, "value", value)).lower() != "nvidia"


def _retry_cannot_mean(value: Any, config: Any, caps: Any) -> bool:
    """``retry: false`` (parsed to None), or events that leave out what the controller always
    retries on (a capacity error moves to the next offer; any other error backs off)."""
    if value is None:
        return True
    return not {"no-capacity", "error"} <= set(value.on_events)


# AWS's limits on a resource's tags (the strictest of the plugins'); ``meshgpu-*`` are the
# controller's own (``fleets/backends.py`` TAG_*).
MAX_TAGS, MAX_TAG_KEY, MAX_TAG_VALUE = 40, 128, 256


def _bad_tags(value: Any, config: Any, caps: Any) -> bool:
    if not value:
        return False
    return (
        len(value) > MAX_TAGS
        or any(k.lower().startswith(("meshgpu-", "aws:")) for k in value)
        or any(not k or len(k) > MAX_TAG_KEY or len(v) > MAX_TAG_VALUE for k, v in value.items())
    )


def _tags_reason(value: Any) -> str:
    reserved = [k for k in value if k.lower().startswith(("meshgpu-", "aws:"))]
    if reserved:
        return (
            f"tags {', '.join(reserved)}: keys starting with meshgpu- (the controller's own: "
            "cluster, fleet and instance ids) or aws: are reserved; rename them"
        )
    return (
        f"tags: at most {MAX_TAGS} tags, keys of 1 to {MAX_TAG_KEY} and values of at most "
        f"{MAX_TAG_VALUE} characters (the clouds' limits)"
    )


def _fleet_entries(kind: str) -> dict[str, Entry]:
    ssh = kind == "ssh"
    e: dict[str, Entry] = {
        "type": Honoured("meshgpu/config/loader.py (CONFIG_TYPES)"),
        "name": Honoured("meshgpu/ops/fleets.py (Fleets.apply: the fleet's name)"),
        "blocks": Honoured(
            f"{_SSH_ARGS}: --blocks" if ssh else f"{_BF} (BackendFleetController._bootstrap)"
        ),
        "env": Honoured(
            f"{_SSH_CTL}: the agent's environment"
            if ssh
            else f"{_BF} (BackendFleetController._bootstrap: the user data's environment)"
        ),
    }
    if ssh:
        e["placement"] = Honoured(
            f"{_SSH_ARGS}: the cluster label (tests/fleets/test_fleet_input.py)"
        )
        for key in _CLOUD_ONLY_PARSED:
            e[key] = Refused(_for_backend_fleets(key))
        for key in ("nodes.min", "nodes.target", "nodes.max"):
            e[key] = Part("nodes")
        for key in (
            "availability_zones",
            "reservation",
            "max_price",
            "retry",
            "idle_duration",
            "tags",
            "backend_options",
        ):
            e[key] = Refused(_for_backend_fleets(key), _given)
        e["retry"] = Refused(
            "retry is for backend fleets; an SSH fleet's controller retries a host that fails "
            "with backoff, always: remove it",
            lambda v, c, caps: "retry" in c.model_fields_set,
        )
        e["retry.on_events"] = Part("retry")
        e["retry.duration"] = Part("retry")
        e["ssh_config"] = Honoured(_SSH_CTL)
        for key in ("user", "port", "identity_file", "proxy_jump"):
            e[f"ssh_config.{key}"] = Honoured(_SSH_TARGET)
            e[f"ssh_config.hosts[].{key}"] = Honoured(_SSH_TARGET + ": the host's over the fleet's")
        for key in ("hostname", "port", "user", "identity_file"):
            e[f"ssh_config.proxy_jump.{key}"] = Honoured(_SSH_TARGET)
            e[f"ssh_config.hosts[].proxy_jump.{key}"] = Honoured(_SSH_TARGET)
        e["ssh_config.network"] = Honoured(f"{_SSH_ARGS}: the address the host advertises")
        e["ssh_config.hosts"] = Honoured(_SSH_CTL)
        e["ssh_config.hosts[].hostname"] = Honoured(_SSH_TARGET)
        e["ssh_config.hosts[].internal_ip"] = Honoured(f"{_SSH_ARGS}: the address it advertises")
        e["ssh_config.hosts[].blocks"] = Honoured(f"{_SSH_ARGS}: --blocks, over the fleet's")
        for key in field_keys(ResourcesSpec, "resources."):
            e[key] = Part("resources")
        return e
    # --- backend fleets
    e["placement"] = Refused(
        "placement: cluster with more than one node needs instances placed together, and none "
        "of this fleet's backends can (their plugins lack cluster_placement; aws and local "
        "have it): add such a backend (meshgpu backend add ...) and list it in backends:, "
        "or use nodes: 1",
        _cluster_without_backend,
        f"{_BF} (BackendFleetController._bootstrap: the cluster label on every instance; "
        "placement_group and _pinned: one placement group and zone from backends with "
        "cluster_placement; _gang_wants: a multi-node gang grows one fleet; plugins/aws: EC2 "
        f"cluster placement group; {_BF_TEST}, tests/fleets/test_backend_fleet_growth.py)",
    )
    e["nodes"] = Honoured(f"{_BF} (nodes_range: keeps nodes.min, grows to nodes.max; {_BF_TEST})")
    e["nodes.min"] = Honoured(f"{_BF} (BackendFleetController._wants)")
    e["nodes.max"] = Honoured(
        f"{_BF} (BackendFleetController._wants; AddFleetInstance.max_instances)"
    )
    e["nodes.target"] = Honoured(
        f"{_BF} (BackendFleetController._wants: target instances at first, Fleet.target_left; "
        "idle ones then go down to nodes.min; tests/fleets/test_backend_fleet_growth.py)"
    )
    e["resources"] = Honoured(_BF_REQ)
    for key in ("cpu", "cpu.count", "memory", "gpu", "gpu.name", "gpu.count", "gpu.memory"):
        e[f"resources.{key}"] = Honoured(_BF_REQ + " (lower and upper bounds)")
    e["resources.disk"] = Honoured(_BF_REQ + " (lower and upper bounds)")
    e["resources.disk.size"] = Honoured(_BF_REQ + " (lower and upper bounds)")
    e["resources.cpu.arch"] = Refused(
        lambda v: (
            f"cpu.arch {getattr(v, 'value', v)}: backend offers do not say their CPU "
            "architecture yet (the aws catalogue is x86 only): remove it, or write x86"
        ),
        _not_x86,
        "x86: every offer of the built-in plugins",
    )
    e["resources.gpu.vendor"] = Refused(
        lambda v: (
            f"gpu.vendor {getattr(v, 'value', v)}: the backends' offers are NVIDIA GPUs only: "
            "remove it, or write nvidia"
        ),
        _not_nvidia,
        "nvidia: every GPU offer of the built-in plugins",
    )
    e["resources.gpu.total_memory"] = Refused(
        "gpu.total_memory: offers are filtered by per-GPU memory and count; write gpu.memory "
        "and gpu.count instead",
        _given,
    )
    e["resources.gpu.compute_capability"] = Refused(
        "gpu.compute_capability: offers do not say it; name the GPUs instead (gpu: H100)",
        _given,
    )
    e["resources.shm_size"] = Refused(
        "shm_size is a job's /dev/shm, not an instance property: put it in the run's resources",
        _given,
    )
    e["backends"] = Honoured(
        f"{_BF} (BackendFleetController._fleet_backends); meshgpu/ops/fleets.py"
    )
    e["regions"] = Honoured(_BF_REQ)
    e["instance_types"] = Honoured(_BF_REQ)
    e["spot_policy"] = Honoured(_BF_REQ)
    e["max_price"] = Honoured(_BF_REQ)
    e["availability_zones"] = Refused(
        "availability_zones: instances are not placed by zone yet (the plugins pick the "
        "region's default): remove it, or use regions",
        _given,
    )
    e["reservation"] = Refused(
        "reservation: capacity reservations are not used by the backends yet: remove it",
        _given,
    )
    e["retry"] = Refused(
        lambda v: (
            "retry: false: the controller always retries a failed provisioning (the next offer "
            "on a capacity error, with backoff on any other): remove it"
            if v is None
            else "retry.on_events: the controller retries on no-capacity and error always; "
            "list both (or write retry: true)"
        ),
        _retry_cannot_mean,
        f"{_BF} (BackendFleetController.create: the next offer on a capacity error, backoff "
        "on any other; always)",
    )
    e["retry.on_events"] = Part("retry")
    e["retry.duration"] = Refused(
        lambda v: (
            f"retry.duration {v}: the controller retries provisioning without a deadline (a "
            "run waiting for it is bounded by the run's own retry and max_duration): remove it, "
            "or write retry: true"
        ),
        _given,
    )
    e["idle_duration"] = Honoured(f"{_BF} (idle_s, BackendFleetController._account)")
    e["tags"] = Refused(
        _tags_reason,
        _bad_tags,
        f"{_BF} (BackendFleetController._tags: on every instance; plugins/aws: EC2 tags)",
    )
    e["backend_options"] = Refused(
        "backend_options: no backend plugin takes per-fleet options yet; set the backend's "
        "settings with meshgpu backend add NAME -o key=value",
        _given,
    )
    return e


SSH_FLEET_FIELDS: dict[str, Entry] = _fleet_entries("ssh")
BACKEND_FLEET_FIELDS: dict[str, Entry] = _fleet_entries("backend")


def _yaml_key(model: BaseModel, name: str, path: tuple[Any, ...], pos: Positions) -> str:
    """The key the field was written with: its alias (``count``), or ``replicas`` for a
    service's replica groups written as ``replicas: [...]``."""
    info = type(model).model_fields[name]
    candidates = [c for c in (info.alias, name) if c]
    if isinstance(model, ServiceConfiguration) and name == "groups":
        candidates.append("replicas")
    if name == "replicas" and info.alias:
        candidates.append("replicas")
    for c in candidates:
        if ("key",) + path + (c,) in pos or path + (c,) in pos:
            return c
    return candidates[-1] if name == "groups" else candidates[0]


def _locate(path: tuple[Any, ...], pos: Positions) -> tuple[int | None, int | None]:
    """The field's key (or, for a value in shorthand form, the nearest written value)."""
    p = path
    while True:
        at = pos.get(("key",) + p) or pos.get(p)
        if at is not None:
            return at
        if not p:
            return None, None
        p = p[:-1]


def check_support(
    config: BaseRunConfiguration,
    positions: Positions | None,
    caps: MeshCapabilities | None,
    file: str | None = None,
) -> list[ConfigIssue]:
    """One issue per field of ``config`` refused by ``FIELDS`` (fields the user set only: a
    default is never refused), located with the loader's ``positions`` (``parse_config_located``)
    in their file (or ``file``)."""
    return _check(config, FIELDS, positions, caps, file)


def _check(
    config: BaseModel,
    table: dict[str, Entry],
    positions: Positions | None,
    caps: MeshCapabilities | None,
    file: str | None = None,
) -> list[ConfigIssue]:
    pos = positions if positions is not None else Positions()
    file = file or pos.file
    issues: list[ConfigIssue] = []

    def visit(model: BaseModel, prefix: str, path: tuple[Any, ...]) -> None:
        for name in type(model).model_fields:
            if name not in model.model_fields_set:
                continue
            key = prefix + name
            value = getattr(model, name)
            ypath = path + (_yaml_key(model, name, path, pos),)
            entry = table.get(key)
            if isinstance(entry, Refused) and entry.when(value, config, caps):
                line, col = _locate(ypath, pos)
                issues.append(ConfigIssue(file, line, col, fmt_path(ypath), entry.text(value)))
                continue
            items = value if isinstance(value, list) else [value]
            for i, item in enumerate(items):
                if isinstance(item, BaseModel) and not isinstance(item, _LEAVES):
                    sub = _child_key(key, type(item), isinstance(value, list)) + "."
                    visit(item, sub, ypath + ((i,) if isinstance(value, list) else ()))

    visit(config, "", ())
    issues.sort(key=lambda i: (i.line or 0, i.col or 0))
    return issues


def check_fleet(
    config: FleetConfiguration,
    positions: Positions | None,
    file: str | None = None,
    caps: MeshCapabilities | None = None,
) -> list[ConfigIssue]:
    """``check_support`` for a fleet: ``SSH_FLEET_FIELDS`` or ``BACKEND_FLEET_FIELDS`` (what a
    fleet may ask does not depend on the mesh's members; only ``placement: cluster`` depends on
    the mesh's backends, ``caps.backends``, known at apply)."""
    table = SSH_FLEET_FIELDS if config.is_ssh() else BACKEND_FLEET_FIELDS
    return _check(config, table, positions, caps, file)


def check_config(
    config: Any, positions: Positions | None, caps: MeshCapabilities | None
) -> list[ConfigIssue]:
    """``check_support`` for run configurations, ``check_fleet`` for fleets; other kinds
    (volumes, gateways) are refused whole by the API that would take them."""
    if isinstance(config, FleetConfiguration):
        return check_fleet(config, positions, caps=caps)
    if not isinstance(config, BaseRunConfiguration):
        return []
    return check_support(config, positions, caps)


__all__ = [
    "FIELDS",
    "RUN_TYPES",
    "Honoured",
    "MeshCapabilities",
    "Part",
    "Refused",
    "BACKEND_FLEET_FIELDS",
    "SSH_FLEET_FIELDS",
    "all_field_keys",
    "check_config",
    "check_fleet",
    "check_support",
    "field_keys",
    "fleet_field_keys",
]
