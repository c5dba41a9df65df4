"""Run configurations: ``dev-environment``, ``task`` and ``service`` (dstack 0.22 semantics).

Fields keep dstack's names and raw meaning: a field the user did not set stays ``None`` so that
"unset" and "set to the default" stay distinguishable (profiles merge underneath, and in-place
updates compare specs). ``effective_*`` helpers give the value that applies.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, field_validator, model_validator

from meshgpu.config._units import IntRange, Shorthand
from meshgpu.config.common import (
    Duration,
    Env,
    FileMapping,
    Model,
    OffableDuration,
    PortMapping,
    Priority,
    ProfileParams,
    RegistryAuth,
    RepoSpec,
    ServicePort,
    VolumeMount,
)
from meshgpu.config.errors import RuleError
from meshgpu.config.interpolation import InterpolationError, check_group_refs, references
from meshgpu.config.resources import ResourcesSpec

DEFAULT_STOP_DURATION = 300
_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


def _python_version(v: Any) -> Any:
    """``3.1`` read by YAML as a float means 3.10, as in dstack."""
    if v is None:
        return v
    if isinstance(v, float):
        text = repr(v)
        v = "3.10" if text == "3.1" else text
    if isinstance(v, str) and re.fullmatch(r"3\.(9|1[0-5])", v.strip()):
        return v.strip()
    raise ValueError(f"unsupported python version {v!r}: use one of 3.9 .. 3.15 (quote it: '3.10')")


PythonVersion = Annotated[
    str | None,
    BeforeValidator(_python_version),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "null"}]}),
]


def _commands(v: Any) -> Any:
    if isinstance(v, str):
        raise ValueError("commands must be a list of strings, one command per item (use '- cmd')")
    if isinstance(v, list):
        return [str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c for c in v]
    return v


Commands = Annotated[list[str], BeforeValidator(_commands)]


class _ImageFields(Model):
    """What decides the job's environment; shared by runs and service replica groups."""

    image: str | None = None
    python: PythonVersion = None
    nvcc: bool | None = None
    docker: bool | None = None
    privileged: bool | None = None

    @model_validator(mode="after")
    def _exclusive(self) -> Any:
        pairs = (("image", "python"), ("image", "docker"), ("python", "docker"))
        for a, b in pairs:
            if getattr(self, a) not in (None, False) and getattr(self, b) not in (None, False):
                raise RuleError(b, f"{a} and {b} are mutually exclusive: keep one of them")
        return self


class BaseRunConfiguration(ProfileParams, _ImageFields):
    """Fields common to every run configuration (dstack's ``BaseRunConfiguration``)."""

    type: str
    name: str | None = None
    user: str | None = None
    entrypoint: str | None = None
    working_dir: str | None = None
    shell: str | None = None
    env: Env = Field(default_factory=dict)
    registry_auth: RegistryAuth | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    priority: Priority | None = None
    volumes: list[VolumeMount] = Field(default_factory=list)
    repos: list[RepoSpec] = Field(default_factory=list)
    files: list[FileMapping] = Field(default_factory=list)
    single_branch: bool | None = None
    dstack: bool | None = None
    setup: Commands = Field(default_factory=list, description="Deprecated: use commands/init")
    home_dir: str | None = Field(default=None, description="Deprecated")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", v):
            raise ValueError(
                f"invalid run name {v!r}: use lowercase letters, digits and '-', starting with a letter"
                " (at most 41 characters)"
            )
        return v

    @field_validator("shell")
    @classmethod
    def _shell(cls, v: str | None) -> str | None:
        if v is not None and v not in ("sh", "bash") and not v.startswith("/"):
            raise ValueError(f"invalid shell {v!r}: use sh, bash or an absolute path")
        return v

    @field_validator("repos")
    @classmethod
    def _one_repo(cls, v: list[RepoSpec]) -> list[RepoSpec]:
        if len(v) > 1:
            raise ValueError("at most one repo is supported; mount others with files or volumes")
        return v

    @field_validator("working_dir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/") and not v.startswith("~"):
            raise ValueError(f"working_dir must be an absolute path, got {v!r}")
        return v

    def effective_shell(self) -> str:
        """``/bin/bash`` with the default image, ``/bin/sh`` with a custom one (dstack)."""
        if self.shell in ("sh", "bash"):
            return f"/bin/{self.shell}"
        if self.shell:
            return self.shell
        return "/bin/sh" if self.image else "/bin/bash"

    def effective_stop_duration(self) -> int | None:
        """Seconds of graceful stop; None when switched off."""
        if self.stop_duration == "off":
            return None
        return DEFAULT_STOP_DURATION if self.stop_duration is None else self.stop_duration


class DevEnvironmentConfiguration(BaseRunConfiguration):
    type: Literal["dev-environment"] = "dev-environment"
    ide: Literal["vscode", "cursor", "windsurf", "zed"] | None = None
    version: str | None = None
    init: Commands = Field(default_factory=list)
    ports: list[PortMapping] = Field(default_factory=list)
    inactivity_duration: OffableDuration = None

    @model_validator(mode="after")
    def _rules(self) -> DevEnvironmentConfiguration:
        if self.entrypoint is not None:
            raise RuleError("entrypoint", "entrypoint is not allowed for dev-environment: use init")
        if self.dstack and self.inactivity_duration not in (None, "off"):
            raise RuleError(
                "inactivity_duration", "dstack: true cannot be combined with inactivity_duration"
            )
        return self


def _check_group_refs(
    env: dict[str, str | None],
    commands: dict[str, list[str]],
    sizes: list[int],
    member: str,
) -> None:
    """dstack checks ``${{ groups[i].<member>[j].IP_ADDRESS }}`` at submit: in commands only
    (resolved at job start, when every node has its address), within the groups' sizes."""

    def refs(text: str) -> list[str]:
        try:
            return [r.namespace for r in references(text)]
        except InterpolationError:
            return []  # malformed: the loader reports it, with its line

    for key, value in env.items():
        if value and "groups" in refs(value):
            raise RuleError(
                "env", f"env {key}: groups references are resolved in commands only, not in env"
            )
    for field, texts in commands.items():
        for text in texts:
            if "groups" in refs(text):
                try:
                    check_group_refs(text, sizes, member)
                except InterpolationError as e:
                    raise RuleError(field, str(e)) from None


class TaskGroup(Model):
    """One group of a heterogeneous multi-node task (``groups:``)."""

    name: str | None = None
    nodes: int = Field(default=1, ge=1)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    commands: Commands = Field(default_factory=list)
    ports: list[PortMapping] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not _GROUP_NAME.match(v):
            raise ValueError(
                f"invalid group name {v!r}: lowercase letters, digits and '-', at most 40"
            )
        return v


def _name_groups(groups: list[Any]) -> list[Any]:
    """Give unnamed groups dstack's default names ``"0"``, ``"1"``, ... and reject duplicates."""
    named = [
        g if g.name is not None else g.model_copy(update={"name": str(i)})
        for i, g in enumerate(groups)
    ]
    seen: set[str] = set()
    for g in named:
        if g.name in seen:
            raise ValueError(f"group name {g.name!r} is used twice")
        seen.add(g.name)
    return named


class TaskConfiguration(BaseRunConfiguration):
    type: Literal["task"] = "task"
    commands: Commands = Field(default_factory=list)
    ports: list[PortMapping] = Field(default_factory=list)
    nodes: int | None = Field(default=None, ge=1)
    groups: list[TaskGroup] | None = None

    @model_validator(mode="after")
    def _rules(self) -> TaskConfiguration:
        if self.groups is not None:
            if not self.groups:
                raise RuleError("groups", "groups must list at least one group")
            if self.nodes is not None:
                raise RuleError(
                    "nodes", "nodes and groups are mutually exclusive: give nodes per group"
                )
            for key in ("commands", "ports"):
                if getattr(self, key):
                    raise RuleError(key, f"with groups, {key} belong to each group, not the task")
            if self.entrypoint is not None:
                raise RuleError("entrypoint", "with groups, entrypoint is not allowed")
            for g in self.groups:
                if not g.commands and not self.image:
                    raise RuleError(
                        "groups",
                        f"group {g.name or '?'} needs commands (or the task needs an image)",
                    )
            object.__setattr__(self, "groups", _name_groups(self.groups))
        elif not self.commands and not self.image:
            raise ValueError("a task needs commands, or an image whose entrypoint runs the work")
        # A task without groups is one group (dstack's ``node_groups``): groups[0].nodes[j].
        groups = self.groups or [TaskGroup(nodes=self.nodes or 1, commands=self.commands)]
        _check_group_refs(
            self.env,
            {"groups" if self.groups else "commands": [c for g in groups for c in g.commands]},
            [g.nodes for g in groups],
            "nodes",
        )
        return self

    def total_nodes(self) -> int:
        if self.groups:
            return sum(g.nodes for g in self.groups)
        return self.nodes or 1


class ScalingSpec(Model):
    metric: Literal["rps"] = "rps"
    target: float = Field(gt=0)
    window: Duration | None = None
    scale_up_delay: Duration = 300
    scale_down_delay: Duration = 600

    @field_validator("window")
    @classmethod
    def _window(cls, v: int | None) -> int | None:
        if v is not None and v not in (30, 60, 300):
            raise ValueError("scaling window must be 30s, 1m or 5m")
        return v


class ProbeHeader(Model):
    name: str
    value: str


class ProbeSpec(Model):
    type: Literal["http"] = "http"
    url: str = "/"
    method: Literal["get", "post", "put", "delete", "patch", "head"] = "get"
    headers: list[ProbeHeader] = Field(default_factory=list, max_length=16)
    body: str | None = None
    timeout: Duration = 10
    interval: Duration = 15
    ready_after: int = Field(default=1, ge=1)
    until_ready: bool = False

    @field_validator("method", mode="before")
    @classmethod
    def _method(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, v: int) -> int:
        if not 1 <= v <= 300:
            raise ValueError("probe timeout must be between 1s and 5m")
        return v


class ModelSpec(Shorthand, Model):
    """An OpenAI-compatible (or TGI) model served by the service."""

    type: Literal["chat"] = "chat"
    name: str
    format: Literal["openai", "tgi"] = "openai"
    prefix: str = "/v1"
    chat_template: str | None = None
    eos_token: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _openai_only(self) -> ModelSpec:
        # The model endpoint forwards requests unchanged (no TGI <-> OpenAI conversion).
        if self.format == "tgi":
            raise RuleError(
                "format",
                "format: tgi is not supported: the model endpoint forwards OpenAI-compatible "
                "requests as they are; serve the OpenAI API (TGI has it under /v1) with "
                "format: openai",
            )
        return self


class RateLimitKey(Model):
    type: Literal["ip_address", "header"] = "ip_address"
    header: str | None = None

    @model_validator(mode="after")
    def _header(self) -> RateLimitKey:
        if (self.type == "header") != (self.header is not None):
            raise ValueError("a header key needs header: NAME (and only a header key has one)")
        return self


class RateLimit(Model):
    prefix: str = "/"
    key: RateLimitKey = Field(default_factory=RateLimitKey)
    rps: float = Field(ge=1 / 60)
    burst: int = Field(default=0, ge=0)


class GatewayRef(Model):
    project: str | None = None
    name: str


def _gateway(v: Any) -> Any:
    if isinstance(v, str) and "/" in v:
        project, _, name = v.partition("/")
        return GatewayRef(project=project, name=name)
    if isinstance(v, str):
        return GatewayRef(name=v)
    return v


class RouterSpec(Model):
    # ``sglang`` is accepted by dstack 0.22.5 beside ``smg`` (SGLang's model gateway).
    type: Literal["smg", "sglang", "dynamo"]


class ServiceGroup(_ImageFields):
    """A replica group of a service (``replicas:`` given as a list, or ``groups:``)."""

    name: str | None = None
    replicas: IntRange = Field(default_factory=lambda: IntRange(min=1, max=1), alias="count")
    scaling: ScalingSpec | None = None
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    spot_policy: Literal["spot", "on-demand", "auto"] | None = None
    reservation: str | None = None
    commands: Commands = Field(default_factory=list)
    router: RouterSpec | None = None

    @model_validator(mode="before")
    @classmethod
    def _count_alias(cls, v: Any) -> Any:
        if isinstance(v, dict) and "replicas" in v and "count" not in v:
            v = dict(v)
            v["count"] = v.pop("replicas")
        return v

    @model_validator(mode="after")
    def _rules(self) -> ServiceGroup:
        _check_replicas_scaling(self.replicas, self.scaling)
        if self.router is not None and (self.replicas.min, self.replicas.max) != (1, 1):
            raise RuleError("router", "a router group must have exactly 1 replica")
        return self


def _check_replicas_scaling(replicas: IntRange, scaling: ScalingSpec | None) -> None:
    if replicas.max is None:
        raise ValueError("a replica range needs a maximum, e.g. 0..4")
    if replicas.min != replicas.max and scaling is None:
        raise ValueError("a replica range needs scaling (e.g. scaling: {metric: rps, target: 10})")
    if replicas.min == replicas.max and scaling is not None:
        raise ValueError("scaling needs a replica range such as 1..4, not a fixed count")


def _service_replicas(v: Any) -> Any:
    if isinstance(v, str) and v.strip().startswith(".."):
        v = "0" + v.strip()  # dstack: the minimum of a replica range defaults to 0
    return v


_GROUP_LEVEL = (
    "commands",
    "image",
    "python",
    "nvcc",
    "docker",
    "privileged",
    "spot_policy",
    "reservation",
)


class ServiceConfiguration(BaseRunConfiguration):
    type: Literal["service"] = "service"
    commands: Commands = Field(default_factory=list)
    port: ServicePort | None = None
    gateway: Annotated[
        bool | GatewayRef | None,
        BeforeValidator(_gateway),
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "boolean"},
                    {"type": "string"},
                    {"type": "object"},
                    {"type": "null"},
                ]
            }
        ),
    ] = None
    strip_prefix: bool = True
    model: ModelSpec | None = None
    https: bool | Literal["auto"] | None = None
    auth: bool = True
    replicas: Annotated[IntRange | None, BeforeValidator(_service_replicas)] = None
    groups: list[ServiceGroup] | None = None
    scaling: ScalingSpec | None = None
    rate_limits: list[RateLimit] = Field(default_factory=list)
    probes: list[ProbeSpec] | None = Field(default=None, max_length=10)

    @model_validator(mode="before")
    @classmethod
    def _replica_list(cls, v: Any) -> Any:
        if isinstance(v, dict) and isinstance(v.get("replicas"), list):
            if "groups" in v:
                raise RuleError(
                    "groups", "give replica groups once: either replicas: [...] or groups: [...]"
                )
            v = dict(v)
            v["groups"] = v.pop("replicas")
        return v

    @model_validator(mode="after")
    def _rules(self) -> ServiceConfiguration:
        if self.port is None:
            raise ValueError("a service needs port: the port its app listens on, e.g. port: 8000")
        if self.groups is not None:
            if not self.groups:
                raise RuleError("replicas", "replica groups must list at least one group")
            if self.scaling is not None:
                raise RuleError("scaling", "with replica groups, scaling belongs to each group")
            fields_set = self.model_fields_set
            for g in self.groups:
                for key in _GROUP_LEVEL:
                    if key in fields_set and key in g.model_fields_set:
                        raise RuleError(
                            key, f"{key} is set both on the service and on group {g.name or '?'}"
                        )
                if not g.commands and not self.commands and not (g.image or self.image):
                    raise ValueError(f"group {g.name or '?'} needs commands (or an image)")
            if sum(g.router is not None for g in self.groups) > 1:
                raise RuleError("replicas", "at most one replica group can be a router")
            if self.retry is not None and any(
                g.router and g.router.type == "dynamo" for g in self.groups
            ):
                raise RuleError(
                    "retry", "retry is not supported for a service with a dynamo router group"
                )
            object.__setattr__(self, "groups", _name_groups(self.groups))
        else:
            if not self.commands and not self.image:
                raise ValueError("a service needs commands, or an image whose entrypoint serves")
            if self.replicas is not None:
                _check_replicas_scaling(self.replicas, self.scaling)
            elif self.scaling is not None:
                raise RuleError("scaling", "scaling needs a replica range such as replicas: 1..4")
        if self.https == "auto" and self.gateway is False:
            raise RuleError("https", "https: auto needs a gateway")
        groups = self.replica_groups()
        if self.schedule is not None and sum(g.replicas.min or 0 for g in groups) == 0:
            # dstack: a scheduled service starts at its trigger; one at zero replicas would
            # start nothing until requests came.
            raise RuleError(
                "schedule",
                "a scheduled service cannot scale to zero: give replicas a minimum of 1 or more "
                "(e.g. replicas: 1..4), or drop schedule",
            )
        _check_group_refs(
            self.env,
            {"commands": self.commands, "replicas": [c for g in groups for c in g.commands]},
            [g.replicas.min or 0 for g in groups],
            "replicas",
        )
        return self

    def replica_groups(self) -> list[ServiceGroup]:
        """The groups that run, a plain service being one group named ``"0"``."""
        if self.groups:
            return list(self.groups)
        replicas = self.replicas or IntRange(min=1, max=1)
        return [
            ServiceGroup(name="0", count=replicas, scaling=self.scaling, resources=self.resources)
        ]


RunConfiguration = DevEnvironmentConfiguration | TaskConfiguration | ServiceConfiguration
