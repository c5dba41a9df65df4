"""The whole dstack corpus: every valid file parses with dstack's meaning; invalid ones fail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from meshgpu.config import ConfigError, load_config
from meshgpu.config.resources import ResourcesSpec
from tests._paths import CORPUS

VALID = sorted((CORPUS / "valid").glob("*.yml"))
INVALID = sorted((CORPUS / "invalid").glob("*.yml"))


def _range(r: Any) -> Any:
    return None if r is None else {"min": r.min, "max": r.max}


def _resources(r: ResourcesSpec) -> dict[str, Any]:
    g = r.gpu
    return {
        "cpu": {"arch": r.cpu.arch, "count": _range(r.cpu.count)},
        "disk": {"size": _range(r.disk.size)},
        "gpu": {
            "compute_capability": g.compute_capability,
            "count": _range(g.count),
            "memory": _range(g.memory),
            "name": g.name,
            "total_memory": _range(g.total_memory),
            "vendor": g.vendor,
        },
        "memory": _range(r.memory),
        "shm_size": r.shm_size,
    }


def _port(p: Any) -> dict[str, Any]:
    return {"container_port": p.container_port, "local_port": p.local_port}


def meaning(c: Any) -> dict[str, Any]:
    """Our parse, in the shape of dstack's ``expected/*.json``."""
    out: dict[str, Any] = {"type": c.type}
    if c.type in ("dev-environment", "task", "service", "preset"):
        out.update(
            idle_duration=c.idle_duration, max_duration=c.max_duration, spot_policy=c.spot_policy
        )
    if c.type in ("dev-environment", "task", "service"):
        out.update(priority=c.priority, resources=_resources(c.resources))
    if c.type == "dev-environment":
        out.update(
            ide=c.ide, inactivity_duration=c.inactivity_duration, ports=[_port(p) for p in c.ports]
        )
    if c.type == "task":
        out.update(nodes=c.nodes, ports=[_port(p) for p in c.ports])
        if c.groups is not None:
            out["groups"] = [
                {
                    "name": g.name,
                    "nodes": g.nodes,
                    "replicas": None,
                    "resources": _resources(g.resources),
                    "scaling": None,
                }
                for g in c.groups
            ]
    if c.type == "service":
        out.update(port=_port(c.port), replicas=_range(c.replicas))
        if c.groups is not None:
            out["groups"] = [
                {
                    "name": g.name,
                    "nodes": None,
                    "replicas": _range(g.replicas),
                    "resources": _resources(g.resources),
                    "scaling": None
                    if g.scaling is None
                    else {
                        "metric": g.scaling.metric,
                        "scale_down_delay": g.scaling.scale_down_delay,
                        "scale_up_delay": g.scaling.scale_up_delay,
                        "target": g.scaling.target,
                        "window": g.scaling.window,
                    },
                }
                for g in c.groups
            ]
    if c.type == "fleet":
        out.update(
            blocks=c.blocks,
            idle_duration=c.idle_duration,
            placement=c.placement,
            spot_policy=c.spot_policy,
            nodes=None if c.nodes is None else {"min": c.nodes.min, "max": c.nodes.max},
        )
        if c.resources is not None:
            out["resources"] = _resources(c.resources)
    if c.type == "gateway":
        out["replicas"] = c.replicas
    return out


def test_corpus_is_present() -> None:
    assert len(VALID) == 134, f"expected the 134-file corpus at {CORPUS}"
    assert len(INVALID) == 4


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_valid_file_matches_dstack(path: Path) -> None:
    expected = json.loads((CORPUS / "expected" / f"{path.stem}.json").read_text())
    assert meaning(load_config(path)) == expected


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_file_is_rejected(path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    issues = info.value.issues
    assert issues and all(i.line is not None and i.message for i in issues)
    assert str(path) in str(info.value)
