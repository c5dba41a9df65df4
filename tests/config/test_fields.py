"""Field semantics: durations, env, ports, retry, replicas, fleets, interpolation, schema."""

from __future__ import annotations

import glob
from pathlib import Path

import jsonschema
import pytest
import yaml

from meshgpu.config import (
    InterpolationError,
    interpolate,
    parse_config,
    parse_duration,
    references,
)
from meshgpu.config.schema import json_schema
from tests._paths import CORPUS


def task(extra: str) -> object:
    return parse_config("type: task\ncommands: [run]\n" + extra)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30),
        ("5m", 300),
        ("2h", 7200),
        ("1d", 86400),
        ("1w", 604800),
        (90, 90),
        ("1h30m", 5400),
        ("120", 120),
    ],
)
def test_durations(text: object, seconds: int) -> None:
    assert parse_duration(text) == seconds


def test_offable_and_idle_durations() -> None:
    assert task("max_duration: off\n").max_duration == "off"
    assert task("max_duration: false\n").max_duration == "off"
    assert task("max_duration: true\n").max_duration is None
    assert task("max_duration: 2h\n").max_duration == 7200
    assert task("idle_duration: off\n").idle_duration == -1
    assert task("idle_duration: -1\n").idle_duration == -1
    assert task("idle_duration: 5m\n").idle_duration == 300
    assert task("").effective_stop_duration() == 300
    assert task("stop_duration: off\n").effective_stop_duration() is None


def test_env_forms_and_sentinels() -> None:
    assert task("env: [A=1, B, C=x=y]\n").env == {"A": "1", "B": None, "C": "x=y"}
    assert task("env: {A: 1, B: null, C: true}\n").env == {"A": "1", "B": None, "C": "true"}


def test_ports() -> None:
    ports = task("ports: [8080, '80:8080', '*:9000']\n").ports
    assert [(p.local_port, p.container_port) for p in ports] == [
        (8080, 8080),
        (80, 8080),
        (None, 9000),
    ]
    assert [str(p) for p in ports] == ["8080", "80:8080", "*:9000"]
    svc = parse_config("type: service\ncommands: [s]\nport: 8000\n")
    assert (svc.port.local_port, svc.port.container_port) == (80, 8000)


def test_retry_forms() -> None:
    assert task("").retry is None
    assert task("retry: false\n").retry is None
    full = task("retry: true\n").retry
    assert full.on_events == ["no-capacity", "interruption", "error"] and full.duration == 3600
    part = task("retry: {on_events: [error], duration: 48h}\n").retry
    assert part.on_events == ["error"] and part.duration == 172800


def test_service_replicas_and_groups() -> None:
    svc = parse_config(
        "type: service\ncommands: [s]\nport: 80\nreplicas: 1..4\nscaling: {metric: rps, target: 10}\n"
    )
    assert (svc.replicas.min, svc.replicas.max) == (1, 4)
    assert svc.scaling.scale_up_delay == 300 and svc.scaling.scale_down_delay == 600
    zero = parse_config(
        "type: service\ncommands: [s]\nport: 80\nreplicas: ..2\nscaling: {target: 1}\n"
    )
    assert (zero.replicas.min, zero.replicas.max) == (0, 2)
    grouped = parse_config(
        "type: service\nport: 80\nreplicas:\n  - count: 1\n    commands: [a]\n"
        "  - name: workers\n    count: 1..3\n    scaling: {target: 2}\n    commands: [b]\n"
    )
    assert [g.name for g in grouped.groups] == ["0", "workers"]
    assert grouped.replicas is None
    assert [str(g.replicas) for g in grouped.replica_groups()] == ["1", "1..3"]


def test_task_groups_default_names_and_total_nodes() -> None:
    t = parse_config(
        "type: task\ngroups:\n  - nodes: 1\n    commands: [a]\n  - nodes: 3\n    commands: [b]\n"
    )
    assert [g.name for g in t.groups] == ["0", "1"] and t.total_nodes() == 4
    assert task("nodes: 2\n").total_nodes() == 2 and task("").total_nodes() == 1


def test_fleet_nodes_and_ssh() -> None:
    f = parse_config(
        "type: fleet\nnodes: {min: 1, target: 2, max: 4}\nplacement: cluster\nblocks: auto\n"
    )
    assert (f.nodes.min, f.nodes.effective_target(), f.nodes.max) == (
        1,
        2,
        4,
    ) and f.blocks == "auto"
    assert parse_config("type: fleet\nnodes: 0..\n").nodes.max is None
    ssh = parse_config(
        "type: fleet\nssh_config:\n  user: ubuntu\n  hosts:\n    - 10.0.0.1\n"
        "    - {hostname: 10.0.0.2, blocks: 4, internal_ip: 10.1.0.2}\n"
    )
    assert ssh.is_ssh() and [h.hostname for h in ssh.ssh_config.hosts] == ["10.0.0.1", "10.0.0.2"]
    assert ssh.ssh_config.hosts[1].blocks == 4


def test_volumes_repos_files() -> None:
    t = task(
        "volumes: [my-vol:/data, /mnt/nfs:/nfs, {name: [a, b], path: /x}, {instance_path: /c, path: /c, optional: true}]\n"
        "repos: ['https://github.com/org/repo.git:/work']\nfiles: ['.:examples', 'a.txt']\n"
    )
    kinds = [type(v).__name__ for v in t.volumes]
    assert kinds == [
        "NetworkVolumeMount",
        "InstanceVolumeMount",
        "NetworkVolumeMount",
        "InstanceVolumeMount",
    ]
    assert t.volumes[2].name == ["a", "b"] and t.volumes[3].optional
    assert (t.repos[0].url, t.repos[0].path) == ("https://github.com/org/repo.git", "/work")
    assert task("repos: [..]\n").repos[0].local_path == ".."
    assert task("repos: ['git@github.com:org/r.git']\n").repos[0].url == "git@github.com:org/r.git"
    assert [(f.local_path, f.path) for f in t.files] == [(".", "examples"), ("a.txt", "a.txt")]


def test_python_float_quirk_and_shell() -> None:
    assert task("python: 3.1\n").python == "3.10"
    assert task("python: 3.12\n").python == "3.12"
    assert task("").effective_shell() == "/bin/bash"
    assert parse_config("type: task\nimage: ubuntu\ncommands: [a]\n").effective_shell() == "/bin/sh"


def test_interpolation_stages_and_escapes() -> None:
    text = "${{ secrets.hf }} ${{ env.USER }} $${{ secrets.literal }} ${{ run.args }}"
    assert [str(r) for r in references(text)] == ["secrets.hf", "env.USER", "run.args"]
    client = interpolate(text, {"env": {"USER": "ada"}, "run": {"args": "--lr 1"}})
    assert client == "${{ secrets.hf }} ada $${{ secrets.literal }} --lr 1"
    final = interpolate(client, {"secrets": {"hf": "tok"}}, final=True)
    assert final == "tok ada ${{ secrets.literal }} --lr 1"
    with pytest.raises(InterpolationError, match="not found: secrets.a, secrets.b"):
        interpolate("${{ secrets.a }}${{ secrets.b }}", {"secrets": {}})
    assert [str(r) for r in references("${{ groups[0].nodes[1].IP_ADDRESS }}")] == [
        "groups[0].nodes[1].IP_ADDRESS"
    ]


def test_references_survive_parsing() -> None:
    t = task(
        "env: ['HF_TOKEN=${{ secrets.hf_token }}']\nregistry_auth: {username: u, password: '${{ secrets.p }}'}\n"
    )
    assert t.env["HF_TOKEN"] == "${{ secrets.hf_token }}"
    assert t.registry_auth.password == "${{ secrets.p }}"


def test_json_schema_accepts_every_valid_corpus_file() -> None:
    validator = jsonschema.Draft202012Validator(json_schema())
    files = sorted(glob.glob(str(CORPUS / "valid" / "*.yml")))
    assert len(files) == 134
    for f in files:
        errors = list(validator.iter_errors(yaml.safe_load(Path(f).read_text())))
        assert not errors, (f, [e.message for e in errors][:3])
    assert list(validator.iter_errors({"type": "task", "comands": ["x"]}))
