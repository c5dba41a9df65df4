"""Typed run specs: every configuration of the corpus compiles, and the spec says what the
configuration says (checked against the validated pydantic model, not against the compiler)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from meshgpu.config import load_config
from meshgpu.config.render import to_json
from meshgpu.config.runs import (
    BaseRunConfiguration,
    ServiceConfiguration,
    TaskConfiguration,
)
from meshgpu.config.spec import NO_SPEC, RunSpec, compile_run, dev_env_commands, job_image
from meshgpu.state.records import RunRecord
from tests._paths import CORPUS

VALID = sorted((CORPUS / "valid").glob("*.yml"))


def test_the_corpus_is_all_there() -> None:
    assert len(VALID) == 134


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.stem)
def test_every_valid_configuration_compiles(path: Path) -> None:
    config = load_config(path)
    rendered = to_json(config)
    spec = compile_run(rendered)
    assert isinstance(spec, RunSpec)
    # A pure function of the rendered form: the copy a log entry decodes to compiles the same.
    assert compile_run(json.loads(json.dumps(rendered))) == spec
    if not isinstance(config, BaseRunConfiguration):
        return  # fleets, gateways, volumes: never submitted as runs
    assert spec.type == config.type
    assert spec.priority == (config.priority or 0)
    if isinstance(config, TaskConfiguration):
        assert len(spec.jobs) == config.total_nodes()
        assert {j.replica_num for j in spec.jobs} == {0}
    elif isinstance(config, ServiceConfiguration) and not config.groups:
        want = max(1, config.replicas.min or 0) if config.replicas is not None else 1
        assert [j.replica_num for j in spec.jobs] == list(range(want))
    else:
        assert len(spec.jobs) >= 1
    if isinstance(config, ServiceConfiguration):
        # Each replica is its own gang: its one job is job 0 of its replica (dstack).
        assert [j.job_num for j in spec.jobs] == [0] * len(spec.jobs)
        assert [j.replica_num for j in spec.jobs] == list(range(len(spec.jobs)))
    else:
        assert [j.job_num for j in spec.jobs] == list(range(len(spec.jobs)))
    # docker: true (dstack's Docker-in-Docker image) starts its daemon before the commands
    dind = ("start-dockerd",) if config.docker else ()
    for job in spec.jobs:
        assert json.loads(job.resources_key) == (job.resources or {})
        if job.group is None and config.type == "dev-environment":
            # init (after the legacy setup), then the ready line and the keep-alive (dstack)
            init = (*config.setup, *config.init)
            assert job.commands == dind + dev_env_commands(init)
        elif job.group is None:
            assert job.commands == dind + tuple(getattr(config, "commands", None) or ())
    assert dict(spec.env) == {k: v for k, v in config.env.items() if v is not None}
    assert spec.image == (config.image or job_image(rendered))
    container = config.image or config.docker or config.privileged or config.entrypoint
    assert (spec.image is not None) == bool(container) == spec.placement.image
    assert spec.max_duration_s == (
        config.max_duration if isinstance(config.max_duration, int) else None
    )
    want_stop = {None: 300.0, "off": 3600.0}.get(config.stop_duration)  # type: ignore[arg-type]
    assert spec.stop_grace_s == (want_stop if want_stop else float(config.stop_duration))
    assert spec.preemptible is (config.preemptible is True)
    assert (spec.retry is None) == (config.retry is None or config.retry is False)
    assert spec.placement.spot_policy == (config.spot_policy or "on-demand")
    assert spec.placement.cluster is (getattr(config, "placement", None) != "any")
    # The stored form keeps the configuration for display and the spec beside it.
    run = RunRecord.create(rendered, run_id="r", run_name="r")
    assert run.config == rendered and run.spec == spec
    again = RunRecord.from_doc(json.loads(json.dumps(run.to_doc())))
    assert again.config == rendered and again.spec == spec


def test_equal_parts_of_many_runs_are_shared() -> None:
    a = {"type": "task", "resources": {"gpu": "x"}, "fleets": ["f"], "retry": {"duration": 60}}
    one, two = compile_run(a), compile_run(json.loads(json.dumps(a)))
    assert one.placement is two.placement
    assert one.retry is two.retry
    assert one.jobs[0].resources is two.jobs[0].resources


def test_defaults_of_a_missing_run() -> None:
    assert NO_SPEC.stop_grace_s == 300.0 and NO_SPEC.max_duration_s is None
    assert NO_SPEC.placement.spot_policy == "on-demand" and NO_SPEC.placement.cluster


def test_group_commands_replace_the_runs() -> None:
    spec = compile_run(
        {
            "type": "task",
            "commands": ["run"],
            "groups": [
                {"name": "a", "nodes": 2, "resources": {}, "commands": ["a"]},
                {"name": "b", "nodes": 1, "resources": {}},
            ],
        }
    )
    assert [(j.group, j.commands) for j in spec.jobs] == [
        ("a", ("a",)),
        ("a", ("a",)),
        ("b", ("run",)),
    ]
    assert spec.group_names == ("a", "b") and spec.group_kind == "nodes"
