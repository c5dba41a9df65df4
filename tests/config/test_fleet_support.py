"""The rule for ``type: fleet`` (``meshgpu/config/support.py`` SSH_FLEET_FIELDS and
BACKEND_FLEET_FIELDS): every field of an SSH fleet and of a backend fleet is honoured or refused
at its line with the reason, offline (``meshgpu config validate``, ``meshgpu apply``'s own check)
and at apply (``ops/fleets.py``)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from meshgpu.config import ConfigError
from meshgpu.config.loader import parse_config_located
from meshgpu.config.support import (
    BACKEND_FLEET_FIELDS,
    SSH_FLEET_FIELDS,
    Honoured,
    MeshCapabilities,
    Part,
    Refused,
    check_config,
    fleet_field_keys,
)
from meshgpu.control.backend_fleets import requirements
from meshgpu.fleets.backends import Offer, filter_offers
from meshgpu.testing import this_meshgpu_env

ROOT = Path(__file__).resolve().parents[2]
TABLES = {"ssh": SSH_FLEET_FIELDS, "backend": BACKEND_FLEET_FIELDS}
SSH = "type: fleet\nname: f\nssh_config:\n  hosts: [10.0.0.1]\n"
BACKEND = "type: fleet\nname: f\nnodes: 0..2\n"


def issues(text: str, file: str = "f.yml", caps: MeshCapabilities | None = None) -> list[str]:
    config, positions = parse_config_located(text, file)
    return [str(i) for i in check_config(config, positions, caps)]


# A mesh whose only backend cannot place instances together (a plugin without
# cluster_placement), and one with aws besides it.
NO_CLUSTER = MeshCapabilities(backends=(("gpuco", "gpuco", False),))
WITH_AWS = MeshCapabilities(backends=(("aws", "aws", True), ("gpuco", "gpuco", False)))
# The caps each refusal example is checked with (None: offline).
REFUSAL_CAPS = {"placement": NO_CLUSTER}


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_every_fleet_field_has_an_entry(kind: str) -> None:
    table = TABLES[kind]
    missing = sorted(fleet_field_keys(kind) - set(table))
    assert not missing, f"{kind} fleet fields with no entry in support.py: {missing}"
    stale = sorted(set(table) - fleet_field_keys(kind))
    assert not stale, f"{kind} fleet entries for fields the model does not have: {stale}"


@pytest.mark.parametrize("kind", sorted(TABLES))
def test_fleet_parts_and_pointers(kind: str) -> None:
    table = TABLES[kind]
    for key, entry in table.items():
        if isinstance(entry, Part):
            assert isinstance(table[entry.of], Honoured | Refused), key
            assert key.startswith(entry.of + "."), key
        text = entry.where if isinstance(entry, Honoured) else getattr(entry, "otherwise", None)
        for ref in re.findall(r"(?:meshgpu|tests)/[\w/]+(?:\.py)?", text or ""):
            assert (ROOT / ref).exists(), f"{kind} {key}: {ref} does not exist"


# key -> (file, where, what the reason says)
BACKEND_REFUSALS: dict[str, tuple[str, str, str]] = {
    "placement": (
        BACKEND + "placement: cluster\n",
        "f.yml:4:1: placement",
        "none of this fleet's backends can (their plugins lack cluster_placement",
    ),
    "resources.cpu.arch": (
        BACKEND + "resources:\n  cpu: arm:4\n",
        "f.yml:5:3: resources.cpu.arch",
        "backend offers do not say their CPU architecture yet",
    ),
    "resources.gpu.vendor": (
        BACKEND + "resources:\n  gpu: amd:1\n",
        "f.yml:5:3: resources.gpu.vendor",
        "the backends' offers are NVIDIA GPUs only",
    ),
    "resources.gpu.total_memory": (
        BACKEND + "resources:\n  gpu:\n    total_memory: 80GB\n",
        "f.yml:6:5: resources.gpu.total_memory",
        "write gpu.memory and gpu.count instead",
    ),
    "resources.gpu.compute_capability": (
        BACKEND + "resources:\n  gpu:\n    compute_capability: '8.0'\n",
        "f.yml:6:5: resources.gpu.compute_capability",
        "offers do not say it",
    ),
    "resources.shm_size": (
        BACKEND + "resources:\n  shm_size: 8GB\n",
        "f.yml:5:3: resources.shm_size",
        "put it in the run's resources",
    ),
    "availability_zones": (
        BACKEND + "availability_zones: [us-east-1a]\n",
        "f.yml:4:1: availability_zones",
        "instances are not placed by zone yet",
    ),
    "reservation": (
        BACKEND + "reservation: cr-123\n",
        "f.yml:4:1: reservation",
        "capacity reservations are not used",
    ),
    "retry": (
        BACKEND + "retry: false\n",
        "f.yml:4:1: retry",
        "the controller always retries a failed provisioning",
    ),
    "retry.duration": (
        BACKEND + "retry:\n  duration: 1h\n",
        "f.yml:5:3: retry.duration",
        "retries provisioning without a deadline",
    ),
    "tags": (
        BACKEND + "tags:\n  meshgpu-cluster: x\n",
        "f.yml:4:1: tags",
        "keys starting with meshgpu- (the controller's own",
    ),
    "backend_options": (
        BACKEND + "backend_options: {aws: {x: 1}}\n",
        "f.yml:4:1: backend_options",
        "no backend plugin takes per-fleet options yet",
    ),
}

SSH_REFUSALS: dict[str, tuple[str, str, str]] = {
    key: (SSH + f"{key}: {value}\n", f"f.yml:5:1: {key}", f"{key} is for backend fleets")
    for key, value in (
        ("availability_zones", "[a]"),
        ("reservation", "r"),
        ("max_price", "1.5"),
        ("idle_duration", "1h"),
        ("tags", "{a: b}"),
        ("backend_options", "{a: 1}"),
    )
}
SSH_REFUSALS["retry"] = (SSH + "retry: true\n", "f.yml:5:1: retry", "retry is for backend fleets")
# Refused by parsing already (``FleetConfiguration._kind``), at the field's line.
SSH_PARSE_REFUSALS = {
    "nodes": "nodes: 2",
    "resources": "resources: {gpu: 1}",
    "backends": "backends: [aws]",
    "regions": "regions: [x]",
    "instance_types": "instance_types: [x]",
    "spot_policy": "spot_policy: spot",
}


def test_every_fleet_refusal_has_an_example() -> None:
    refused = {k for k, e in BACKEND_FLEET_FIELDS.items() if isinstance(e, Refused)}
    assert refused == set(BACKEND_REFUSALS)
    refused = {k for k, e in SSH_FLEET_FIELDS.items() if isinstance(e, Refused)}
    assert refused == set(SSH_REFUSALS) | set(SSH_PARSE_REFUSALS)


@pytest.mark.parametrize("key", sorted(BACKEND_REFUSALS))
def test_a_backend_fleet_field_is_refused_at_its_line(key: str) -> None:
    text, where, reason = BACKEND_REFUSALS[key]
    [issue] = issues(text, caps=REFUSAL_CAPS.get(key))
    assert issue.startswith(where + ": "), issue
    assert reason in issue


@pytest.mark.parametrize("key", sorted(SSH_REFUSALS))
def test_an_ssh_fleet_field_is_refused_at_its_line(key: str) -> None:
    text, where, reason = SSH_REFUSALS[key]
    [issue] = issues(text)
    assert issue.startswith(where + ": "), issue
    assert reason in issue


@pytest.mark.parametrize("key", sorted(SSH_PARSE_REFUSALS))
def test_cloud_fields_of_an_ssh_fleet_are_refused_by_parsing(key: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config_located(SSH + SSH_PARSE_REFUSALS[key] + "\n", "f.yml")
    [issue] = e.value.issues
    assert str(issue).startswith("f.yml:"), issue
    assert "those are for cloud fleets" in str(issue)


def test_values_that_a_backend_fleet_honours() -> None:
    for text in (
        BACKEND + "placement: any\n",
        "type: fleet\nname: f\nnodes: 1\nplacement: cluster\n",
        "type: fleet\nname: f\nnodes: 0..1\nplacement: cluster\n",
        "type: fleet\nname: f\nnodes:\n  min: 1\n  target: 1\n  max: 3\n",
        "type: fleet\nname: f\nnodes:\n  min: 0\n  target: 2\n  max: 4\n",
        BACKEND + "placement: cluster\n",  # offline: the mesh's backends are not known
        BACKEND + "resources:\n  cpu: x86:4..8\n  gpu: nvidia:A100:40GB..80GB:1..2\n"
        "  memory: 16GB..64GB\n  disk: 100GB..200GB\n",
        BACKEND + "retry: true\n",
        BACKEND + "retry:\n  on_events: [no-capacity, error, interruption]\n",
        BACKEND + "tags: {team: ml, cost-center: '42'}\n",
        BACKEND + "backends: [aws]\nregions: [us-east-1]\ninstance_types: [g5.xlarge]\n"
        "spot_policy: auto\nmax_price: 2\nidle_duration: 20s\nblocks: 2\nenv: [A=1]\n",
        SSH + "placement: cluster\nblocks: auto\nenv: [A=1]\n",
    ):
        assert issues(text) == [], text


def test_placement_cluster_at_apply_depends_on_the_fleets_backends() -> None:
    """Refused at apply only where none of the backends the fleet may use places instances
    together; honoured offline, on one node, and where a backend (aws) can."""
    cluster = BACKEND + "placement: cluster\n"
    assert issues(cluster, caps=WITH_AWS) == []
    assert issues(cluster + "backends: [aws]\n", caps=WITH_AWS) == []
    [issue] = issues(cluster + "backends: [gpuco]\n", caps=WITH_AWS)
    assert issue.startswith("f.yml:4:1: placement: ") and "add such a backend" in issue
    assert issues("type: fleet\nname: f\nnodes: 1\nplacement: cluster\n", caps=NO_CLUSTER) == []
    assert issues(BACKEND + "placement: any\n", caps=NO_CLUSTER) == []
    # no backend at all: apply's own "add a backend first" says it
    assert issues(cluster, caps=MeshCapabilities(backends=())) == []
    # the SSH fleet's table is not the backends' business
    assert issues(SSH + "placement: cluster\n", caps=NO_CLUSTER) == []


def test_the_plugins_say_whether_they_place_instances_together() -> None:
    from meshgpu.fleets.backends import supports_cluster

    assert supports_cluster("aws") and supports_cluster("local")
    assert not supports_cluster("no-such-plugin")


def test_retry_on_events_leaving_out_what_the_controller_retries_on() -> None:
    [issue] = issues(BACKEND + "retry:\n  on_events: [interruption]\n")
    assert "retries on no-capacity and error always" in issue


@pytest.mark.parametrize(
    "tags",
    [
        "{aws:name: x}",
        "{'': x}",
        "{k: " + "v" * 300 + "}",
        "{" + ", ".join(f"k{i}: v" for i in range(41)) + "}",
    ],
)
def test_tags_the_clouds_would_refuse(tags: str) -> None:
    [issue] = issues(BACKEND + f"tags: {tags}\n")
    assert issue.startswith("f.yml:4:1: tags: ")


def test_several_refusals_in_file_order() -> None:
    text = BACKEND + "reservation: r\navailability_zones: [a]\nbackend_options: {}\n"
    assert [i.split(": ")[0] for i in issues(text)] == ["f.yml:4:1", "f.yml:5:1", "f.yml:6:1"]


# --- the honoured bounds: an instance is within the fleet's resources ------------------------


def _offer(t: str, gpus: int, gmem: float, cpus: int, ram: float, disk: float = 100) -> Offer:
    return Offer("b", t, "r", 1.0, False, "A100", gpus, gmem, cpus, ram, disk)


def test_upper_bounds_of_a_fleets_resources_filter_offers() -> None:
    offers = [
        _offer("small", 1, 40, 8, 64),
        _offer("big-mem", 1, 80, 8, 64),
        _offer("many-cpu", 1, 40, 96, 64),
        _offer("much-ram", 1, 40, 8, 1024),
        _offer("big-disk", 1, 40, 8, 64, 2000),
        _offer("two", 2, 40, 8, 64),
    ]
    spec = {
        "resources": {
            "gpu": {"count": {"min": 1, "max": 1}, "memory": {"min": 24, "max": 48}},
            "cpu": {"count": {"min": 4, "max": 16}},
            "memory": {"min": 16, "max": 128},
            "disk": {"size": {"min": 50, "max": 500}},
        }
    }
    req = requirements(spec, None, None)
    assert [o.instance_type for o in filter_offers(offers, req)] == ["small"]


def test_a_fleet_file_is_refused_offline_by_the_cli(tmp_path: Path) -> None:
    f = tmp_path / "fleet.yml"
    f.write_text(BACKEND + "reservation: r\n")
    r = subprocess.run(
        [sys.executable, "-m", "meshgpu", "config", "validate", str(f)],
        capture_output=True,
        text=True,
        env=this_meshgpu_env(),
        timeout=60,
    )
    assert r.returncode != 0
    assert f"{f}:4:1: reservation: reservation: capacity reservations" in r.stdout + r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "meshgpu", "apply", "-f", str(f), "-y"],
        capture_output=True,
        text=True,
        env=this_meshgpu_env(),
        timeout=60,
    )
    assert r.returncode != 0
    assert f"{f}:4:1: reservation" in r.stdout + r.stderr
