"""Bad configurations: every problem at once, located, explained, never a traceback."""

from __future__ import annotations

import textwrap

import pytest

from meshgpu.config import ConfigError, parse_config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "f.yml")
    return [str(i) for i in info.value.issues]


def test_every_problem_at_once_with_positions_and_suggestions() -> None:
    out = problems(
        """\
        type: task
        comands: [ls]
        resources:
          gpu: A100:8:8
          memory: 10GB..2GB
        python: 3.12
        image: ubuntu
        ports: [99999]
        max_duration: 3 hours
        """
    )
    assert out == [
        "f.yml:2:1: comands: unknown field (did you mean 'commands'?)",
        "f.yml:4:8: resources.gpu: GPU spec 'A100:8:8' gives the count twice",
        "f.yml:5:11: resources.memory: impossible range: min 10GB is greater than max 2GB",
        "f.yml:6:1: python: image and python are mutually exclusive: keep one of them",
        "f.yml:8:9: ports[0]: expected less than or equal to 65535, got 99999",
        "f.yml:9:15: max_duration: invalid duration '3 hours': use seconds (3600) or a number with s, m, "
        "h, d or w (30s, 5m, 2h, 1d, 1w)",
    ]


def test_yaml_syntax_error_is_located() -> None:
    out = problems("type: task\ncommands: [ls\nname: x\n")
    assert len(out) == 1 and out[0].startswith("f.yml:3:") and "YAML syntax error" in out[0]


def test_nested_unknown_key_suggests_from_the_right_model() -> None:
    out = problems(
        """\
        type: service
        port: 8000
        commands: [serve]
        probes:
          - type: http
            intervall: 15s
        """
    )
    assert out == ["f.yml:6:5: probes[0].intervall: unknown field (did you mean 'interval'?)"]


def test_unknown_and_missing_type() -> None:
    assert problems("type: tsak\n") == [
        "f.yml:1:7: type: unknown type 'tsak': use one of dev-environment, task, service, fleet, "
        "volume, gateway, preset (did you mean 'task'?)"
    ]
    assert "missing required field 'type'" in problems("commands: [ls]\n")[0]
    assert "empty" in problems("")[0]
    assert "mapping" in problems("- a\n- b\n")[0]


def test_cross_field_rules_point_at_the_field() -> None:
    assert problems("type: task\ncommands: [a]\nnodes: 2\ngroups:\n  - commands: [b]\n") == [
        "f.yml:3:1: nodes: nodes and groups are mutually exclusive: give nodes per group"
    ]
    assert problems("type: service\ncommands: [a]\nport: 80\nreplicas: 1..4\n") == [
        "f.yml:1:1: a replica range needs scaling (e.g. scaling: {metric: rps, target: 10})"
    ]
    assert problems("type: volume\nname: v\nbackend: aws\nsize: 100GB\n") == [
        "f.yml:1:1: region: a aws volume needs region"
    ]


def test_yaml_mapping_trap_gets_a_hint() -> None:
    out = problems("type: task\ncommands:\n  - 'echo \"a: b\"'\n  - echo a: b\n")
    assert (
        len(out) == 1
        and out[0].startswith("f.yml:4:5: commands[1]:")
        and "quote the whole item" in out[0]
    )


def test_duplicate_keys_are_reported() -> None:
    out = problems("type: task\ncommands: [a]\ncommands: [b]\n")
    assert out == ["f.yml:3:1: commands: key given twice; keep one (YAML keeps the last)"]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("type: task\ncommands: ls\n", "commands must be a list"),
        ("type: task\ncommands: [a]\nenv: [1BAD=x]\n", "not a valid variable name"),
        ("type: task\ncommands: [a]\npriority: 101\n", "less than or equal to 100"),
        (
            "type: task\ncommands: [a]\nspot_policy: cheap\n",
            "expected 'spot', 'on-demand' or 'auto'",
        ),
        ("type: task\ncommands: [a]\npython: '2.7'\n", "unsupported python version"),
        ("type: task\ncommands: [a]\nenv:\n  - X=${{ secrets.A }\n", "unterminated reference"),
        ("type: task\ncommands: ['${{ foo.bar }}']\n", "unknown namespace 'foo'"),
        ("type: dev-environment\nide: vscode\nentrypoint: x\n", "entrypoint is not allowed"),
        ("type: fleet\nnodes: 3..1\n", "impossible range"),
        (
            "type: fleet\nssh_config:\n  hosts: [a]\nresources: {gpu: 1}\n",
            "cannot also set resources",
        ),
        (
            "type: service\ncommands: [a]\nport: 80\nreplicas: 2\nscaling: {target: 1}\n",
            "scaling needs a replica range",
        ),
        (
            "type: task\ncommands: [a]\nutilization_policy: {min_gpu_utilization: 5, time_window: 1m}\n",
            "at least 5m",
        ),
        ("type: task\ncommands: [a]\nschedule: {cron: '0 8 * *'}\n", "5 fields"),
        ("type: task\ncommands: [a]\nrepos: [., ..]\n", "at most one repo"),
        (
            "type: service\nimage: x\nport: 80\nreplicas:\n  - count: 1\n    router: {type: smg}\n"
            "  - count: 1\n    router: {type: dynamo}\n",
            "at most one replica group can be a router",
        ),
    ],
)
def test_clear_messages(text: str, fragment: str) -> None:
    out = problems(text)
    assert any(fragment in line for line in out), out
    assert all(line.startswith("f.yml:") for line in out)


def test_group_references_checked_at_submit() -> None:
    groups = "type: task\ngroups:\n  - nodes: 1\n    commands: [a]\n  - nodes: 2\n    commands:\n"
    assert parse_config(groups + "      - b ${{ groups[1].nodes[1].IP_ADDRESS }}\n")
    assert problems(groups + "      - b ${{ groups[1].nodes[2].IP_ADDRESS }}\n") == [
        "f.yml:2:1: groups: ${{ groups[1].nodes[2].IP_ADDRESS }}: group 1 starts with 2 nodes "
        "(nodes[0] to nodes[1])"
    ]
    assert problems(groups + "      - b ${{ groups[2].nodes[0].IP_ADDRESS }}\n") == [
        "f.yml:2:1: groups: ${{ groups[2].nodes[0].IP_ADDRESS }}: there are 2 groups "
        "(groups[0] to groups[1])"
    ]
    assert problems(groups + "      - b ${{ groups[0].nodes[0].IP }}\n") == [
        "f.yml:2:1: groups: unknown reference ${{ groups[0].nodes[0].IP }}: use "
        "${{ groups[i].nodes[j].IP_ADDRESS }}"
    ]
    # A task without groups is groups[0]; an escaped reference is not checked.
    plain = "type: task\nnodes: 2\ncommands:\n  - a ${{ groups[0].nodes[1].IP_ADDRESS }}\n"
    assert parse_config(plain + "  - $${{ groups[0].nodes[9].IP_ADDRESS }}\n")
    assert problems(plain + "  - a ${{ groups[0].nodes[2].IP_ADDRESS }}\n") == [
        "f.yml:3:1: commands: ${{ groups[0].nodes[2].IP_ADDRESS }}: group 0 starts with 2 nodes "
        "(nodes[0] to nodes[1])"
    ]
    assert problems(plain + "env: ['HEAD=${{ groups[0].nodes[0].IP_ADDRESS }}']\n") == [
        "f.yml:5:1: env: env HEAD: groups references are resolved in commands only, not in env"
    ]
    # Services name replicas, and only those they start with.
    service = "type: service\nport: 80\ncommands:\n  - a ${{ groups[0].replicas[0].IP_ADDRESS }}\n"
    assert parse_config(service)
    assert problems(service + "replicas: 0..2\nscaling: {metric: rps, target: 1}\n") == [
        "f.yml:3:1: commands: ${{ groups[0].replicas[0].IP_ADDRESS }}: group 0 starts with 0 "
        "replicas"
    ]
    assert problems(service.replace("replicas[0]", "nodes[0]")) == [
        "f.yml:3:1: commands: unknown reference ${{ groups[0].nodes[0].IP_ADDRESS }}: use "
        "${{ groups[i].replicas[j].IP_ADDRESS }}"
    ]
