"""Leader controllers and the smaller use cases in-process: a real state machine behind a
proposer that applies at once."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
import trio.testing

from consensus.node import NodeOptions
from meshgpu import errors
from meshgpu.control import Demand, Retention, Scheduling
from meshgpu.ops import Code, Tokens
from meshgpu.runner.code import CodeStore
from meshgpu.state import JobStatus, StateMachine
from meshgpu.state.cluster import Replicated
from tests.api._stub import Proposer
from tests.scheduler._world import host, submit, task, world


def _replicated(sm: StateMachine) -> Replicated:
    replicated = Replicated()
    replicated.jobs = sm
    return replicated


async def test_the_scheduling_controller_places_at_once_and_again_on_demand() -> None:
    sm = world(host("n1", 8))
    sm.apply_command(submit("a", task(4)))
    replicated = _replicated(sm)
    node: Any = SimpleNamespace(
        id=1, leader_since=trio.current_time(), last_heard={}, options=NodeOptions()
    )
    demand = Demand()
    scheduling = Scheduling(node, sm, replicated.cluster, Proposer(replicated), demand)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(scheduling.run)
        await trio.testing.wait_all_tasks_blocked()
        assert [j.status for j in sm.jobs.values()] == [JobStatus.PROVISIONING]
        sm.apply_command(submit("b", task(4)))
        demand.notify()
        await trio.testing.wait_all_tasks_blocked()
        assert all(j.status is JobStatus.PROVISIONING for j in sm.jobs.values())
        assert len(sm.jobs) == 2
        nursery.cancel_scope.cancel()


async def test_retention_prunes_past_the_policy_only() -> None:
    sm = world(host("n1", 8))
    proposer = Proposer(_replicated(sm))
    await Retention(sm, proposer, keep_runs=10, keep_for_s=3600).step(now=100.0)
    assert proposer.proposed == []  # nothing finished: nothing to prune


async def test_revoking_an_unknown_token_is_not_found() -> None:
    tokens = Tokens(Proposer(Replicated()), lambda: "c" * 32, lambda: "0" * 64)
    with pytest.raises(errors.NotFound) as e:
        await tokens.revoke("nope")
    assert e.value.title == "token not found"


async def test_code_refuses_a_corrupted_archive_and_unknown_names(tmp_path: Path) -> None:
    code = Code(CodeStore(tmp_path, lambda: "", limit=1 << 20), StateMachine(), "n1", 0, 1 << 20)
    with pytest.raises(errors.Invalid) as e:
        await code.put(b"not gzip", "0" * 64)
    assert e.value.code == "bad_digest"
    with pytest.raises(errors.NotFound):
        code.path("0" * 64)
    with pytest.raises(errors.NotFound):
        code.path("not-a-sha")
