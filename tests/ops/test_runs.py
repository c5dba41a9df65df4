"""The run use cases in-process: a real state machine behind a proposer that applies at once;
errors come out as ``meshgpu.errors`` kinds (the API maps them to statuses once)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from meshgpu import errors
from meshgpu.api.problems import status_of
from meshgpu.ops import Runs
from meshgpu.runner.code import CodeStore
from meshgpu.state import StateMachine
from meshgpu.state.cluster import Replicated
from tests.api._stub import Proposer
from tests.scheduler._world import host, world

TASK = "type: task\ncommands: [echo hi]\nresources:\n  gpu: 1\n"


@dataclass
class Body:
    config: str = TASK
    filename: str = "<config>"
    name: str | None = None
    run_args: list[str] = field(default_factory=list)
    code_sha256: str | None = None
    request_id: str = "request-0001"
    env: dict[str, str] = field(default_factory=dict)
    gpu: str | None = None
    in_place: bool = False


def _runs(tmp_path: Path) -> tuple[Runs, StateMachine, Proposer]:
    replicated = Replicated()
    replicated.jobs = sm = world(host("n1", 8))
    proposer = Proposer(replicated)
    return Runs(sm, proposer, CodeStore(tmp_path, limit=1 << 20), "n1"), sm, proposer


async def test_submit_proposes_one_command_and_returns_the_run(tmp_path: Path) -> None:
    runs, sm, proposer = _runs(tmp_path)
    run, updated = await runs.submit(Body(name="one"))
    assert (run.run_name, updated) == ("one", None)
    assert sm.runs["one"] is run and len(proposer.proposed) == 1


async def test_a_retried_request_finds_its_run(tmp_path: Path) -> None:
    runs, sm, _ = _runs(tmp_path)
    first, _ = await runs.submit(Body(request_id="same-request"))
    again, _ = await runs.submit(Body(request_id="same-request"))
    assert again.run_name == first.run_name and len(sm.runs) == 1


async def test_a_name_in_use_is_a_conflict(tmp_path: Path) -> None:
    runs, _, _ = _runs(tmp_path)
    await runs.submit(Body(name="taken"))
    with pytest.raises(errors.Conflict) as e:
        await runs.submit(Body(name="taken", request_id="request-0002"))
    assert (e.value.title, e.value.code, status_of(e.value)) == (
        "run not submitted",
        "name_in_use",
        409,
    )


async def test_an_invalid_configuration_is_invalid_with_its_issues(tmp_path: Path) -> None:
    runs, _, proposer = _runs(tmp_path)
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(Body(config="type: task\ncommands: 3\n"))
    assert e.value.code == "invalid_config" and e.value.extra["issues"]
    assert status_of(e.value) == 400 and proposer.proposed == []


async def test_a_field_this_mesh_cannot_honour_is_refused_at_its_line(tmp_path: Path) -> None:
    """``image`` on a mesh where no member has a container runtime (config/support.py): refused
    before anything is proposed, with the field's file:line:col and the reason, like a parse
    error; a member with docker makes the same configuration run."""
    runs, sm, proposer = _runs(tmp_path)
    config = TASK + "image: ubuntu:24.04\n"
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(Body(config=config, filename="train.dstack.yml"))
    assert e.value.code == "invalid_config" and proposer.proposed == []
    [issue] = e.value.extra["issues"]
    assert (issue["file"], issue["line"], issue["col"], issue["path"]) == (
        "train.dstack.yml",
        5,
        1,
        "image",
    )
    assert "train.dstack.yml:5:1: image: image needs a container runtime; no member has one" in (
        e.value.detail
    )
    sm.apply_command(host("n2", 0, runtime="/usr/bin/docker"))
    run, _ = await runs.submit(Body(config=config, request_id="request-0002"))
    assert run.spec.image == "ubuntu:24.04"


async def test_an_in_place_update_is_checked_too(tmp_path: Path) -> None:
    runs, _, proposer = _runs(tmp_path)
    service = "type: service\nport: 8000\ncommands: [serve]\n"
    await runs.submit(Body(name="svc", config=service))
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(
            Body(
                name="svc",
                config=service + "gateway: my-gateway\n",
                in_place=True,
                request_id="request-0002",
            )
        )
    assert e.value.extra["issues"][0]["path"] == "gateway" and len(proposer.proposed) == 1


async def test_a_fleet_is_not_a_run(tmp_path: Path) -> None:
    runs, _, _ = _runs(tmp_path)
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(Body(config="type: fleet\nnodes: 1\n"))
    assert e.value.code == "not_a_run"


async def test_env_without_value_and_bad_gpu_are_refused_before_proposing(tmp_path: Path) -> None:
    runs, _, proposer = _runs(tmp_path)
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(Body(config=TASK + "env:\n  TOKEN:\n"))
    assert e.value.code == "missing_env"
    with pytest.raises(errors.Invalid) as e:
        await runs.submit(Body(gpu="H100:abc"))
    assert e.value.code == "invalid_gpu"
    assert proposer.proposed == []


async def test_unknown_runs_are_not_found_once_worded(tmp_path: Path) -> None:
    runs, _, _ = _runs(tmp_path)
    for call in (runs.stop("ghost", False), runs.set_priority("ghost", 5)):
        with pytest.raises(errors.NotFound) as e:
            await call
        assert (e.value.title, e.value.detail) == (
            "run not found",
            "no run named 'ghost'; see meshgpu ps -a",
        )
        assert status_of(e.value) == 404


async def test_in_place_changes_only_the_priority(tmp_path: Path) -> None:
    runs, sm, proposer = _runs(tmp_path)
    await runs.submit(Body(name="p", config=TASK + "priority: 1\n"))
    run, updated = await runs.submit(
        Body(name="p", config=TASK + "priority: 9\n", in_place=True, request_id="request-0002")
    )
    assert updated and run.priority == 9 and len(sm.runs) == 1
    # Anything else differs: a new submission, which the state refuses for its name.
    with pytest.raises(errors.Conflict):
        await runs.submit(
            Body(
                name="p",
                config=TASK.replace("echo hi", "echo bye"),
                in_place=True,
                request_id="request-0003",
            )
        )
    assert len(proposer.proposed) == 3 and sm.runs["p"].priority == 9


async def test_stop_marks_the_run(tmp_path: Path) -> None:
    runs, _, _ = _runs(tmp_path)
    await runs.submit(Body(name="s"))
    run = await runs.stop("s", abort=False)
    assert run.status.is_finished() or run.termination_reason is not None
