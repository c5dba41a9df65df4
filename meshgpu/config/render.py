"""Normalized views of a configuration: JSON for scripts, a readable plan for people."""

from __future__ import annotations

from typing import Any

from meshgpu.config._units import format_duration
from meshgpu.config.loader import Configuration
from meshgpu.config.resources import ResourcesSpec
from meshgpu.config.runs import BaseRunConfiguration, ServiceConfiguration, TaskConfiguration


def to_json(config: Configuration) -> dict[str, Any]:
    """Every field, defaults filled, in JSON types: the stable ``--json`` form."""
    return config.model_dump(mode="json", by_alias=False)


def _duration(v: int | str | None, default: str = "-") -> str:
    if v is None:
        return default
    if v == "off" or v == -1:
        return "off"
    return format_duration(int(v))


def _res(r: ResourcesSpec) -> str:
    return r.summary()


def plan_lines(config: Configuration) -> list[tuple[str, str]]:
    """(label, value) rows describing what applying the configuration asks for."""
    rows: list[tuple[str, str]] = [("type", config.type)]
    name = getattr(config, "name", None)
    rows.append(("name", name or "(generated at submit)"))
    if isinstance(config, BaseRunConfiguration):
        env = config.image or (f"python {config.python}" if config.python else "default image")
        if config.docker:
            env = "docker-in-docker"
        rows.append(("environment", env))
        if isinstance(config, TaskConfiguration) and config.groups:
            for g in config.groups:
                rows.append((f"group {g.name}", f"{g.nodes} node(s), {_res(g.resources)}"))
        elif isinstance(config, ServiceConfiguration) and config.groups:
            for g in config.groups:
                # The group's own environment and placement, where it sets them.
                own = [
                    "docker-in-docker" if g.docker else None,
                    g.image,
                    f"python {g.python}" if g.python else None,
                    "nvcc" if g.nvcc else None,
                    "privileged" if g.privileged else None,
                    f"spot policy {g.spot_policy}" if g.spot_policy else None,
                    f"reservation {g.reservation}" if g.reservation else None,
                ]
                extra = "".join(f", {x}" for x in own if x)
                rows.append((f"replicas {g.name}", f"{g.replicas}, {_res(g.resources)}{extra}"))
        else:
            rows.append(("resources", _res(config.resources)))
        if isinstance(config, TaskConfiguration):
            rows.append(("nodes", str(config.total_nodes())))
        if isinstance(config, ServiceConfiguration):
            rows.append(("port", str(config.port)))
            if config.replicas is not None:
                rows.append(("replicas", str(config.replicas)))
        ports = getattr(config, "ports", None)
        if ports:
            rows.append(("ports", ", ".join(str(p) for p in ports)))
        rows.append(("priority", str(config.priority if config.priority is not None else 0)))
        rows.append(("spot policy", config.spot_policy or "on-demand"))
        rows.append(("max duration", _duration(config.max_duration, "off")))
        if config.type == "dev-environment":
            rows.append(("ide", getattr(config, "ide", None) or "none (ssh)"))
            rows.append(
                (
                    "inactivity duration",
                    _duration(getattr(config, "inactivity_duration", None), "off"),
                )
            )
        if config.utilization_policy is not None:
            u = config.utilization_policy
            rows.append(
                (
                    "utilization policy",
                    f"stop if a GPU stays below {u.min_gpu_utilization}% for "
                    f"{_duration(u.time_window)}",
                )
            )
        rows.append(
            (
                "retry",
                "no"
                if config.retry is None
                else f"{', '.join(config.retry.on_events)} for {_duration(config.retry.duration)}",
            )
        )
        if config.env:
            rows.append(
                (
                    "env",
                    ", ".join(
                        k + ("" if v is not None else " (from your environment)")
                        for k, v in config.env.items()
                    ),
                )
            )
    else:
        for key in ("nodes", "placement", "blocks", "backend", "region", "domain", "replicas"):
            value = getattr(config, key, None)
            if value is not None:
                if hasattr(value, "min") and hasattr(value, "max"):
                    value = f"{value.min}..{'' if value.max is None else value.max}"
                rows.append((key, str(value)))
        resources = getattr(config, "resources", None)
        if resources is not None:
            rows.append(("resources", _res(resources)))
        ssh = getattr(config, "ssh_config", None)
        if ssh is not None:
            rows.append(("ssh hosts", ", ".join(h.hostname for h in ssh.hosts)))
    return rows
