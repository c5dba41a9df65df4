"""Field types shared by run, fleet and profile configurations (dstack 0.22 semantics).

Every type here accepts each form dstack accepts and normalizes to one shape, so code downstream
never re-parses: durations become seconds, ``env`` becomes a mapping, ports become
``PortMapping``, ``retry: true`` becomes a full ``RetrySpec``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from meshgpu.config import cron
from meshgpu.config._units import Shorthand, parse_duration
from meshgpu.config.errors import RuleError


class Model(BaseModel):
    """Base of every configuration model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------------------------------------
# Durations


def _duration(v: Any) -> Any:
    return None if v is None else parse_duration(v)


def _offable(v: Any) -> Any:
    """``off``/``false`` switch the limit off; ``true``/absent keep the default (None)."""
    if v is None or v is True:
        return None
    if v is False or (isinstance(v, str) and v.strip().lower() == "off"):
        return "off"
    return parse_duration(v)


def _idle(v: Any) -> Any:
    """Idle durations: ``off``/``false``/``-1`` mean never (-1), as in dstack."""
    if v is None or v is True:
        return None
    if v is False or v == -1 or (isinstance(v, str) and v.strip().lower() in ("off", "-1")):
        return -1
    return parse_duration(v)


_DURATION_SCHEMA = {
    "anyOf": [
        {"type": "integer", "description": "seconds"},
        {
            "type": "string",
            "pattern": r"^(\d+[smhdw])+$",
            "description": "e.g. 30s, 5m, 2h, 1d, 1w",
        },
    ]
}
_OFFABLE_SCHEMA = {
    "anyOf": [*_DURATION_SCHEMA["anyOf"], {"const": "off"}, {"type": "boolean"}, {"type": "null"}]
}

Duration = Annotated[int, BeforeValidator(parse_duration), WithJsonSchema(_DURATION_SCHEMA)]
"""Seconds; accepts ``30s``, ``5m``, ``2h``, ``1d``, ``1w`` or an int."""
OptionalDuration = Annotated[
    int | None, BeforeValidator(_duration), WithJsonSchema(_OFFABLE_SCHEMA)
]
OffableDuration = Annotated[
    int | Literal["off"] | None, BeforeValidator(_offable), WithJsonSchema(_OFFABLE_SCHEMA)
]
"""Seconds, ``"off"`` (no limit) or None (the default applies)."""
IdleDuration = Annotated[int | None, BeforeValidator(_idle), WithJsonSchema(_OFFABLE_SCHEMA)]
"""Seconds, -1 (never) or None (the default applies)."""


# ---------------------------------------------------------------------------------------------
# Environment

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Linux refuses to exec (E2BIG) a process with one environment or argument string over
# MAX_ARG_STRLEN (32 pages: 131072 bytes, "KEY=", the value and the closing NUL included), or with
# all of them together over about a quarter of the stack limit (2 MiB with the usual 8 MiB). A
# variable is also passed as one ``-e KEY=VALUE`` argument to a container engine. Refuse such an
# environment where it is written, not when the job starts: one variable within 128 KiB, all of a
# configuration's within 1 MiB (leaving the rest for the job's own variables and its command).
MAX_ENV_ENTRY_BYTES = 131072
MAX_ENV_TOTAL_BYTES = 1 << 20


def env_size_problem(env: dict[str, str | None]) -> tuple[str, str] | None:
    """``(variable, message)`` for an environment too large to exec a process with, or None."""
    total = 0
    for key, value in env.items():
        size = len(key.encode("utf-8", "surrogatepass")) + 2  # "=" and the NUL
        size += len(value.encode("utf-8", "surrogatepass")) if value else 0
        if size > MAX_ENV_ENTRY_BYTES:
            return key, (
                f"env {key}: the variable is {size} bytes ({key}=VALUE), over Linux's "
                f"{MAX_ENV_ENTRY_BYTES}-byte limit for one variable (the job could not start): "
                "put the value in a file the run reads and pass its path"
            )
        total += size
        if total > MAX_ENV_TOTAL_BYTES:
            return key, (
                f"env: the variables up to {key} take more than {MAX_ENV_TOTAL_BYTES} bytes, "
                "too many for a process's environment (the job could not start): put large "
                "values in files the run reads and pass their paths"
            )
    return None


def _env_checked(v: Any) -> Any:
    out = _env(v)
    problem = env_size_problem(out)
    if problem is not None:
        raise RuleError(*problem)  # points at the variable's key in a mapping
    return out


def _env_overrides(v: Any) -> Any:
    """The API's ``env`` overrides (``-e KEY=VALUE``, values for sentinels): the file's rules."""
    if not isinstance(v, dict):
        return v  # the field's type reports it
    for key, value in v.items():
        if isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(
                    f"env {key!r}: the value has a lone UTF-16 surrogate, which is not text"
                ) from None
    return _env_checked(v)


# ``env`` of an API request: names as in a file, no value missing, sizes a process can exec with.
EnvOverrides = Annotated[dict[str, str], BeforeValidator(_env_overrides)]


def _utf8(v: str) -> str:
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"character {e.start + 1} is a lone UTF-16 surrogate (U+{ord(v[e.start]):04X}), "
                "not text: send the character it was meant to be"
            ) from None
    return v


# A string from an API request that can be stored and answered: JSON's "\ud800" decodes to a lone
# surrogate, which no UTF-8 encoder (responses, the replicated log) accepts.
Utf8Str = Annotated[str, AfterValidator(_utf8)]


def _env(v: Any) -> Any:
    """List ``KEY=VAL``/``KEY`` or mapping -> ``{KEY: value}``; None marks a sentinel ``KEY``
    whose value the client takes from its own environment at apply time."""
    if v is None:
        return {}
    out: dict[str, str | None] = {}
    if isinstance(v, list):
        for i, item in enumerate(v):
            if not isinstance(item, str):
                raise ValueError(f"env item {i} must be a string KEY=VALUE or KEY, got {item!r}")
            key, eq, value = item.partition("=")
            if not _ENV_NAME.match(key):
                raise ValueError(
                    f"env item {item!r}: {key!r} is not a valid variable name (letters, digits, _)"
                )
            out[key] = value if eq else None
        return out
    if isinstance(v, dict):
        for key, value in v.items():
            if not isinstance(key, str) or not _ENV_NAME.match(key):
                raise ValueError(
                    f"env key {key!r} is not a valid variable name (letters, digits, _)"
                )
            if value is None:
                out[key] = None
            elif isinstance(value, bool):
                out[key] = "true" if value else "false"
            elif isinstance(value, (str, int, float)):
                out[key] = str(value)
            else:
                raise ValueError(f"env {key}: expected a string value, got {type(value).__name__}")
        return out
    raise ValueError("env must be a list of KEY=VALUE strings or a mapping of KEY: VALUE")


Env = Annotated[
    dict[str, str | None],
    BeforeValidator(_env_checked),
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "array",
                    "items": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*(=.*)?$"},
                },
                {
                    "type": "object",
                    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
                },
            ]
        }
    ),
]


# ---------------------------------------------------------------------------------------------
# Ports


class PortMapping(Shorthand, Model):
    """``8080`` (same port both sides), ``80:8080`` (local:container) or ``*:8080`` (random
    local port: ``local_port`` None)."""

    local_port: int | None = Field(default=None, ge=0, le=65535)
    container_port: int = Field(ge=1, le=65535)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a port such as 8080, 80:8080 or *:8080")
        if isinstance(v, int):
            return {"local_port": v, "container_port": v}
        if isinstance(v, str):
            text = v.strip()
            m = re.fullmatch(r"(?:(\*|\d+):)?(\d+)", text)
            if not m:
                raise ValueError(f"invalid port {v!r}: use 8080, 80:8080 or *:8080")
            local, container = m.group(1), int(m.group(2))
            if local is None:
                return {"local_port": container, "container_port": container}
            return {"local_port": None if local == "*" else int(local), "container_port": container}
        return v

    def __str__(self) -> str:
        local = "*" if self.local_port is None else str(self.local_port)
        return (
            str(self.container_port)
            if local == str(self.container_port)
            else f"{local}:{self.container_port}"
        )


class ServicePort(PortMapping):
    """A service's ``port``: an int is the container port, published on 80 by the proxy."""

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, int) and not isinstance(v, bool):
            return {"local_port": 80, "container_port": v}
        if isinstance(v, str) and v.strip().isdigit():
            return {"local_port": 80, "container_port": int(v)}
        return PortMapping._parse(v)


# ---------------------------------------------------------------------------------------------
# Retry

RetryEvent = Literal["no-capacity", "interruption", "error"]
ALL_RETRY_EVENTS: tuple[RetryEvent, ...] = ("no-capacity", "interruption", "error")
DEFAULT_RETRY_DURATION = 3600


class RetrySpec(Shorthand, Model):
    shorthand_schema: ClassVar[list[dict[str, Any]]] = [{"type": "boolean"}]

    on_events: list[RetryEvent] = Field(default_factory=lambda: list(ALL_RETRY_EVENTS))
    duration: Duration = DEFAULT_RETRY_DURATION


def _retry(v: Any) -> Any:
    if v is None or v is False:
        return None
    if v is True:
        return RetrySpec()
    return v


Retry = Annotated[RetrySpec | None, BeforeValidator(_retry)]


# ---------------------------------------------------------------------------------------------
# Profile parameters


class UtilizationPolicy(Model):
    min_gpu_utilization: int = Field(ge=0, le=100)
    time_window: Duration

    @field_validator("time_window")
    @classmethod
    def _window(cls, v: int) -> int:
        if v < 300:
            raise ValueError("time_window must be at least 5m")
        return v


def _cron_list(v: Any) -> Any:
    if isinstance(v, str):
        v = [v]
    if isinstance(v, list):
        for expr in v:
            if not isinstance(expr, str):
                raise ValueError(f"cron expression must be a string, got {expr!r}")
            cron.check(expr)  # a CronError is a ValueError: its message says what to write
    return v


class Schedule(Model):
    cron: Annotated[
        list[str],
        BeforeValidator(_cron_list),
        WithJsonSchema(
            {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}
        ),
    ]


class InstanceRef(Shorthand, Model):
    """``instances:`` entry: a name, ``{name}``, ``{hostname}`` or ``{fleet, instance: N}``."""

    name: str | None = None
    hostname: str | None = None
    fleet: str | None = None
    instance: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return {"name": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _one(self) -> InstanceRef:
        if (self.fleet is None) != (self.instance is None):
            raise ValueError("give both fleet and instance (its number), or name, or hostname")
        if sum(x is not None for x in (self.name, self.hostname, self.fleet)) != 1:
            raise ValueError(
                "an instance is named by exactly one of: name, hostname, fleet+instance"
            )
        return self


SpotPolicy = Literal["spot", "on-demand", "auto"]
CreationPolicy = Literal["reuse", "reuse-or-create"]
StartupOrder = Literal["any", "master-first", "workers-first"]
StopCriteria = Literal["all-done", "master-done"]


def _str_list(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


StrList = Annotated[
    list[str],
    BeforeValidator(_str_list),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]
MemorySchema = WithJsonSchema(
    {
        "anyOf": [
            {"type": "number"},
            {"type": "string", "description": "e.g. 512MB, 16GB"},
            {"type": "null"},
        ]
    }
)


class ProfileParams(Model):
    """Parameters shared by run configurations, fleets and profiles (dstack's ``ProfileParams``)."""

    backends: StrList | None = None
    regions: StrList | None = None
    availability_zones: StrList | None = None
    instance_types: StrList | None = None
    reservation: str | None = None
    spot_policy: SpotPolicy | None = None
    retry: Retry = None
    max_duration: OffableDuration = None
    stop_duration: OffableDuration = None
    max_price: float | None = Field(default=None, gt=0)
    creation_policy: CreationPolicy | None = None
    idle_duration: IdleDuration = None
    utilization_policy: UtilizationPolicy | None = None
    startup_order: StartupOrder | None = None
    stop_criteria: StopCriteria | None = None
    schedule: Schedule | None = None
    fleets: StrList | None = None
    instances: list[InstanceRef] | None = None
    tags: dict[str, str] | None = None
    backend_options: list[dict[str, Any]] | dict[str, Any] | None = None
    preemptible: bool | None = Field(
        default=None,
        description="meshgpu extension: a higher-priority run may stop this one when it then fits",
    )


# ---------------------------------------------------------------------------------------------
# Volumes, repos, files, registry auth


class NetworkVolumeMount(Shorthand, Model):
    """A named network volume (``name`` may list alternatives: any one of them is used)."""

    name: StrList
    path: str


class InstanceVolumeMount(Shorthand, Model):
    """A host directory (``instance_path``) mounted at ``path``."""

    instance_path: str
    path: str
    optional: bool = False


def _volume(v: Any) -> Any:
    if isinstance(v, str):
        src, sep, dst = v.rpartition(":")
        if not sep or not src or not dst:
            raise ValueError(f"invalid volume {v!r}: use name:/path or /host/path:/path")
        if src.startswith("/") or src.startswith("~"):
            return InstanceVolumeMount(instance_path=src, path=dst)
        return NetworkVolumeMount(name=[src], path=dst)
    if isinstance(v, dict) and "instance_path" in v:
        return InstanceVolumeMount.model_validate(v)
    return v


VolumeMount = Annotated[NetworkVolumeMount | InstanceVolumeMount, BeforeValidator(_volume)]

_URL_RE = re.compile(r"^(?:[a-z][a-z0-9+.-]*://|[\w.-]+@[\w.-]+:)", re.IGNORECASE)


class RepoSpec(Shorthand, Model):
    """``repos:`` entry: a local directory or a git URL, mounted at ``path`` (default: the
    working directory)."""

    local_path: str | None = None
    url: str | None = None
    branch: str | None = None
    hash: str | None = None
    path: str = "."
    if_exists: Literal["error", "skip"] = "error"

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        src, path = v, "."
        head, sep, tail = v.rpartition(":")
        scheme_only = re.fullmatch(r"[a-z][a-z0-9+.-]*", head, re.IGNORECASE) and tail.startswith(
            "//"
        )
        if sep and head and tail.startswith(("/", "~", ".")) and not scheme_only:
            src, path = head, tail
        key = "url" if _URL_RE.match(src) else "local_path"
        return {key: src, "path": path}

    @model_validator(mode="after")
    def _one(self) -> RepoSpec:
        if (self.local_path is None) == (self.url is None):
            raise ValueError("a repo needs exactly one of local_path and url")
        return self


class FileMapping(Shorthand, Model):
    local_path: str
    path: str

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, str):
            local, sep, path = v.partition(":")
            return {"local_path": local, "path": path if sep else local}
        return v


class RegistryAuth(Model):
    username: str
    password: str

    @field_validator("username", "password", mode="before")
    @classmethod
    def _str(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


# Priority is serialized as-is; kept here so every run type shares the bound.
Priority = Annotated[int, Field(ge=0, le=100), PlainSerializer(int)]
