"""The member list follows the replicated state onto disk (``node.json``, for restarts) in a
worker thread, never in the task that called it (the Raft owner task no longer runs it at all:
``meshgpu/replica/follow.py``); a write the disk refuses is tried again at the next change."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from meshgpu.host import identity as identity_module
from meshgpu.host.identity import HostIdentity
from meshgpu.settings import AgentSettings
from meshgpu.state.cluster import ClusterState, Member


def _cluster(*rids: int) -> ClusterState:
    cluster = ClusterState()
    for rid in rids:
        cluster.members[rid] = Member(
            raft_id=rid,
            node_id=f"n{rid}",
            name=f"h{rid}",
            peer_address=f"10.0.0.{rid}:7481",
            api_url="",
            joined_at=0.0,
        )
    return cluster


async def test_the_member_list_is_written_in_a_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ident = HostIdentity(AgentSettings(data_dir=tmp_path / "d", name="h1"))
    ident.data["raft_id"] = 1
    writes: list[str] = []
    real = identity_module.write_private

    def write_private(path: Path, text: str) -> None:
        writes.append(threading.current_thread().name)
        if len(writes) == 1:
            raise OSError(28, "No space left on device")
        real(path, text)

    monkeypatch.setattr(identity_module, "write_private", write_private)
    node: Any = SimpleNamespace(addresses={})
    await ident.follow_members(_cluster(1, 2), node, None)
    assert ident.data.get("peers") is None  # refused: not claimed as saved
    assert not ident.path.exists()
    await ident.follow_members(_cluster(1, 2), node, None)  # the next change tries again
    assert json.loads(ident.path.read_text())["peers"] == {
        "1": "10.0.0.1:7481",
        "2": "10.0.0.2:7481",
    }
    assert len(writes) == 2 and threading.main_thread().name not in writes
