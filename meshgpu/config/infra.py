"""Infrastructure configurations: ``fleet``, ``volume``, ``gateway`` and ``preset``."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from meshgpu.config._units import IntRange, Shorthand, parse_memory
from meshgpu.config.common import (
    Duration,
    Env,
    IdleDuration,
    MemorySchema,
    Model,
    ProfileParams,
    Retry,
    SpotPolicy,
    StrList,
)
from meshgpu.config.errors import RuleError
from meshgpu.config.resources import ResourcesSpec

# ---------------------------------------------------------------------------------------------
# Fleets


class FleetNodes(Shorthand, Model):
    """``nodes: N`` (exactly N), ``a..b`` (target a) or ``{min, target, max}``."""

    min: int = Field(default=0, ge=0)
    target: int | None = Field(default=None, ge=0)
    max: int | None = Field(default=None, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, (int, str)) and not isinstance(v, bool):
            rng = IntRange.model_validate(v)
            return {"min": rng.min or 0, "max": rng.max}
        return v

    @model_validator(mode="after")
    def _order(self) -> FleetNodes:
        target = self.effective_target()
        if target < self.min or (self.max is not None and target > self.max):
            raise ValueError(
                f"nodes must satisfy min <= target <= max, got {self.min}, {target}, {self.max}"
            )
        return self

    def effective_target(self) -> int:
        return self.min if self.target is None else self.target


def _blocks(v: Any) -> Any:
    if v == "auto" or v is None:
        return v
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"blocks must be a positive integer or auto, got {v!r}")
    return v


class ProxyJump(Model):
    hostname: str
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    identity_file: str | None = None


class SSHHost(Shorthand, Model):
    hostname: str
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    identity_file: str | None = None
    proxy_jump: ProxyJump | None = None
    internal_ip: str | None = None
    blocks: int | Literal["auto"] = 1

    _blocks = field_validator("blocks", mode="before")(classmethod(lambda cls, v: _blocks(v)))

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        return {"hostname": v} if isinstance(v, str) else v

    @field_validator("internal_ip")
    @classmethod
    def _private(cls, v: str | None) -> str | None:
        if v is not None and not ipaddress.ip_address(v).is_private:
            raise ValueError(f"internal_ip must be a private address, got {v}")
        return v


class SSHConfig(Model):
    user: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    identity_file: str | None = None
    proxy_jump: ProxyJump | None = None
    network: str | None = None
    hosts: list[SSHHost] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_hosts(self) -> SSHConfig:
        seen: dict[str, int] = {}
        for i, h in enumerate(self.hosts):
            if h.hostname in seen:
                raise RuleError(
                    ("hosts", i),
                    f"host {h.hostname} is given twice (also hosts[{seen[h.hostname]}]): "
                    "list each host once",
                )
            seen[h.hostname] = i
        return self

    @field_validator("network")
    @classmethod
    def _network(cls, v: str | None) -> str | None:
        if v is None:
            return v
        try:
            net = ipaddress.ip_network(v, strict=False)
        except ValueError as e:
            raise ValueError(f"network must be a CIDR such as 10.0.0.0/24: {e}") from None
        if not net.is_private:
            raise ValueError(f"network must be a private range, got {v}")
        return str(net)


class FleetConfiguration(Model):
    type: Literal["fleet"] = "fleet"
    name: str | None = None
    placement: Literal["any", "cluster"] | None = None
    blocks: int | Literal["auto"] = 1
    env: Env = Field(default_factory=dict)
    nodes: FleetNodes | None = None
    ssh_config: SSHConfig | None = None
    resources: ResourcesSpec | None = None
    backends: StrList | None = None
    regions: StrList | None = None
    availability_zones: StrList | None = None
    instance_types: StrList | None = None
    reservation: str | None = None
    spot_policy: SpotPolicy | None = None
    max_price: float | None = Field(default=None, gt=0)
    retry: Retry = None
    idle_duration: IdleDuration = None
    tags: dict[str, str] | None = None
    backend_options: list[dict[str, Any]] | dict[str, Any] | None = None

    _blocks = field_validator("blocks", mode="before")(classmethod(lambda cls, v: _blocks(v)))

    @model_validator(mode="after")
    def _kind(self) -> FleetConfiguration:
        if self.ssh_config is not None:
            cloud = [
                k
                for k in (
                    "nodes",
                    "resources",
                    "backends",
                    "regions",
                    "instance_types",
                    "spot_policy",
                )
                if getattr(self, k) is not None
            ]
            if cloud:
                raise RuleError(
                    cloud[0],
                    f"an SSH fleet (ssh_config) cannot also set {', '.join(cloud)}: those are for cloud fleets",
                )
        return self

    def is_ssh(self) -> bool:
        return self.ssh_config is not None


# ---------------------------------------------------------------------------------------------
# Volumes and gateways

VolumeBackend = Literal["aws", "gcp", "runpod", "kubernetes", "daytona", "lium", "local"]


class VolumeConfiguration(Model):
    type: Literal["volume"] = "volume"
    name: str | None = None
    backend: VolumeBackend
    region: str | None = None
    availability_zone: str | None = None
    size: Annotated[float | None, MemorySchema] = Field(default=None, description="GB")
    volume_id: str | None = None
    claim_name: str | None = None
    storage_class_name: str | None = None
    access_modes: list[str] | None = None
    read_only: bool | None = None
    auto_cleanup_duration: IdleDuration = None
    tags: dict[str, str] | None = None

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        return None if v is None else parse_memory(v)

    @model_validator(mode="after")
    def _source(self) -> VolumeConfiguration:
        if self.backend in ("aws", "gcp", "runpod") and self.region is None:
            raise RuleError("region", f"a {self.backend} volume needs region")
        if (
            self.backend in ("aws", "gcp", "runpod")
            and self.size is None
            and self.volume_id is None
        ):
            raise RuleError(
                "size", "give size (to create a volume) or volume_id (to register an existing one)"
            )
        return self


class Certificate(Model):
    type: Literal["lets-encrypt", "acm", "gcp-cm"] = "lets-encrypt"
    arn: str | None = None
    name: str | None = None


class LoadBalancer(Model):
    type: Literal["alb", "gcp-lb"] = "alb"


class GatewayConfiguration(Model):
    type: Literal["gateway"] = "gateway"
    name: str | None = None
    default: bool = False
    backend: str
    region: str
    instance_type: str | None = None
    domain: str | None = None
    public_ip: bool = True
    load_balancer: LoadBalancer | None = None
    certificate: Certificate | None = Field(default_factory=Certificate)
    replicas: int | None = Field(default=None, ge=1, le=9)
    router: dict[str, Any] | None = None
    tags: dict[str, str] | None = None


# ---------------------------------------------------------------------------------------------
# Presets (dstack 0.22: agent-built LLM-serving presets; parsed so such files validate)


class PresetAgent(Model):
    provider: Literal["claude", "codex"] = "claude"
    model: str | None = None
    effort: str | None = None


class PresetConfiguration(ProfileParams):
    type: Literal["preset"] = "preset"
    name: str | None = None
    repo: str | None = None
    base: str | None = None
    prompt: str | None = None
    min_context_length: int | None = Field(default=None, ge=1)
    max_ttft: float | None = Field(default=None, gt=0, description="p50 time to first token, ms")
    trials: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1)
    input_tokens: int = Field(default=1024, ge=1)
    output_tokens: int = Field(default=1024, ge=1)
    shared_prefix_tokens: int | None = Field(default=None, ge=0)
    dataset: str | None = None
    baseline: str | None = None
    gateway: str | bool | None = None
    env: Env = Field(default_factory=dict)
    agent: PresetAgent | None = None
    timeout: Duration | None = None

    @model_validator(mode="after")
    def _model(self) -> PresetConfiguration:
        if (self.repo is None) == (self.base is None):
            raise ValueError(
                "a preset needs exactly one of repo (an exact model) and base (variants allowed)"
            )
        return self
