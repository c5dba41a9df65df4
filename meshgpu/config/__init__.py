"""dstack-compatible configuration language: models, grammar, loader and interpolation.

``load_config(path)`` / ``parse_config(text)`` return one of the configuration models or raise
:class:`ConfigError` listing every problem with ``file:line:col``.
"""

from meshgpu.config._units import IntRange, MemoryRange, parse_duration, parse_memory
from meshgpu.config.common import PortMapping, ProfileParams, RetrySpec
from meshgpu.config.errors import ConfigError, ConfigIssue
from meshgpu.config.infra import (
    FleetConfiguration,
    GatewayConfiguration,
    PresetConfiguration,
    VolumeConfiguration,
)
from meshgpu.config.interpolation import InterpolationError, interpolate, references
from meshgpu.config.loader import (
    CONFIG_TYPES,
    Configuration,
    load_config,
    parse_config,
)
from meshgpu.config.resources import CPUSpec, DiskSpec, GPUSpec, ResourcesSpec, parse_resources
from meshgpu.config.runs import (
    DevEnvironmentConfiguration,
    RunConfiguration,
    ServiceConfiguration,
    TaskConfiguration,
)

__all__ = [
    "CONFIG_TYPES",
    "CPUSpec",
    "ConfigError",
    "ConfigIssue",
    "Configuration",
    "DevEnvironmentConfiguration",
    "DiskSpec",
    "FleetConfiguration",
    "GPUSpec",
    "GatewayConfiguration",
    "IntRange",
    "InterpolationError",
    "MemoryRange",
    "PortMapping",
    "PresetConfiguration",
    "ProfileParams",
    "ResourcesSpec",
    "RetrySpec",
    "RunConfiguration",
    "ServiceConfiguration",
    "TaskConfiguration",
    "VolumeConfiguration",
    "interpolate",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_memory",
    "parse_resources",
    "references",
]
