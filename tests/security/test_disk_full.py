"""The probe's disk scenarios: a data dir whose disk fills while the agent runs, and a data dir
the agent cannot use at all.

A full disk must not crash anything. The Raft storage says so plainly (``StorageFull``, never
SQLite's "cannot rollback" in its place); a member whose disk is full keeps answering the
leader's heartbeats, refuses writes at once, and catches up by itself once space returns; a
leader whose disk fills gives way to one that can write; the agent answers writes with a 507
problem and keeps serving reads. A data dir that is a regular file, or read-only, gives one line
on stderr and a non-zero exit.

Full disks are small tmpfs mounts (root only): under ``CI=true`` these tests must run, not skip.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trio

from consensus.core.types import Entry, HardState
from consensus.kv import KVStateMachine, put
from consensus.node import NodeOptions, RaftNode, bootstrap_storage
from consensus.storage import DiskStorage, StorageFull
from meshgpu.client.archive import make_archive
from meshgpu.testing import AgentProcess
from tests.consensus._localnet import LocalNet


def _mount_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to mount a small tmpfs"
    return None


REASON = _mount_reason()
if REASON and os.environ.get("CI") == "true":
    raise RuntimeError(f"under CI these tests must run: {REASON}")
needs_tmpfs = pytest.mark.skipif(bool(REASON), reason=REASON or "ok")


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (made), unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"cannot mount a tmpfs under CI: {r.stderr}")
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path, leave: int = 0) -> Path:
    """Write zeros into ``directory`` until its disk is full (or only ``leave`` bytes are
    free); returns the filler file (delete it to give the space back)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 4096):
            block = bytes(chunk)
            while True:
                st = os.statvfs(directory)
                if leave and st.f_bfree * st.f_frsize - chunk < leave:
                    break
                try:
                    os.write(fd, block)
                except OSError as e:
                    assert e.errno == errno.ENOSPC, e
                    break
    finally:
        os.close(fd)
    return filler


# -- the Raft storage ------------------------------------------------------------------------


@needs_tmpfs
def test_a_write_the_full_disk_refuses_says_so_and_can_be_retried(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "2m") as disk:
        storage = DiskStorage(disk / "raft")
        try:
            storage.save([Entry(1, 1, b"first")], HardState(1, 1, 1))
            filler = fill(disk)
            batch = [Entry(1, i, os.urandom(1000)) for i in range(2, 600)]
            with pytest.raises(StorageFull) as e:
                storage.save(batch, HardState(1, 1, 2))
            # SQLite's own reason, not the ROLLBACK that used to fail after it.
            assert "full" in str(e.value) and "cannot rollback" not in str(e.value)
            assert storage.last_index() == 1 and storage.hard_state.commit == 1  # untouched
            filler.unlink()
            storage.save(batch, HardState(1, 1, 2))  # the same write, once there is room
        finally:
            storage.close()
        with DiskStorage(disk / "raft") as again:
            assert again.last_index() == 599 and again.hard_state.commit == 2


# -- Raft members ----------------------------------------------------------------------------

OPTS = dict(tick_s=0.01, election_tick=10, propose_retry_s=0.5, storage_retry_s=0.1)


class Trio3:
    """Three in-process members; ``dirs`` says where each keeps its log."""

    def __init__(self, nursery: trio.Nursery, dirs: dict[int, Path]) -> None:
        self.nursery, self.dirs = nursery, dirs
        self.net = LocalNet()
        self.nodes: dict[int, RaftNode] = {}
        self.crashed: list[BaseException] = []

    async def start(self, nid: int) -> RaftNode:
        storage = bootstrap_storage(str(self.dirs[nid]), sorted(self.dirs))
        node = RaftNode(nid, storage, KVStateMachine(), options=NodeOptions(seed=nid, **OPTS))  # type: ignore[arg-type]
        self.net.join(node)
        self.nodes[nid] = node

        async def run(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await node.run(task_status=task_status)
            except BaseException as e:  # what the old code did: the member died
                self.crashed.append(e)
                raise
            finally:
                storage.close()

        await self.nursery.start(run)
        return node

    async def leader(self, among: list[int] | None = None, timeout: float = 10) -> RaftNode:
        ids = among or list(self.nodes)
        with trio.fail_after(timeout):
            while True:
                leaders = [self.nodes[i] for i in ids if self.nodes[i].role.name == "LEADER"]
                if len(leaders) == 1 and all(self.nodes[i].leader == leaders[0].id for i in ids):
                    return leaders[0]
                await trio.sleep(0.01)


async def _until(predicate, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


@needs_tmpfs
async def test_a_member_whose_disk_fills_answers_heartbeats_refuses_writes_and_catches_up(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with tmpfs(tmp_path / "disk3", "4m") as disk:
        c = Trio3(nursery, {1: tmp_path / "n1", 2: tmp_path / "n2", 3: disk / "n3"})
        for i in (1, 2, 3):
            await c.start(i)
        c.nodes[1].campaign()
        leader = await c.leader()
        assert leader.id == 1
        third = c.nodes[3]
        await leader.propose(put("before", 1), timeout=5)
        filler = fill(disk)
        value = "v" * 2000
        for i in range(200):  # until member 3's disk refuses the log
            await leader.propose(put(f"k{i}", value), timeout=5)  # a quorum without it
            if third.storage_error is not None:
                break
        assert third.storage_error is not None and "full" in third.storage_error
        # It refuses writes at once, with the reason ...
        t = trio.current_time()
        with pytest.raises(StorageFull, match="full"):
            await third.propose(put("through-3", 1), timeout=5)
        assert trio.current_time() - t < 0.5
        # ... and keeps answering the leader's heartbeats: the leader hears it throughout.
        for _ in range(30):
            await trio.sleep(OPTS["tick_s"] * 5)
            assert trio.current_time() - leader.last_heard[3] < OPTS["tick_s"] * 10
            assert third.leader == 1 and third.storage_error is not None
        await leader.propose(put("during", 1), timeout=5)
        assert not c.crashed
        filler.unlink()
        await _until(lambda: third.fsm.get("during") == 1)  # caught up by itself
        assert third.storage_error is None and third.fsm.get("k0") == value
        assert await third.propose(put("after", 1), timeout=5) is True
        await _until(lambda: leader.fsm.get("after") == 1)
        assert not c.crashed


@needs_tmpfs
async def test_a_leader_whose_disk_fills_gives_way_and_catches_up(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with tmpfs(tmp_path / "disk1", "4m") as disk:
        c = Trio3(nursery, {1: disk / "n1", 2: tmp_path / "n2", 3: tmp_path / "n3"})
        for i in (1, 2, 3):
            await c.start(i)
        c.nodes[1].campaign()
        old = await c.leader()
        assert old.id == 1
        filler = fill(disk)
        value = "v" * 2000
        with pytest.raises(StorageFull):  # its own disk refuses the entry (it may already be
            for i in range(200):  # in the others' logs: they take over with it)
                await old.propose(put(f"k{i}", value), timeout=5)
        new = await c.leader([2, 3])
        assert await new.propose(put("under-new", 1), timeout=5) is True
        await _until(lambda: old.role.name != "LEADER")
        assert not c.crashed
        filler.unlink()
        await _until(lambda: old.fsm.get("under-new") == 1 and old.storage_error is None)
        assert await old.propose(put("after", 1), timeout=5) is True
        assert not c.crashed


# -- the agent -------------------------------------------------------------------------------

BIG_TASK = """\
type: task
commands: [echo hi]
env:
  PAD: {pad}
resources:
  gpu: A100:8
"""  # never placed (the host has one H100): no job files, only Raft writes


class Api:
    def __init__(self, agent: AgentProcess) -> None:
        self.agent = agent
        self.http = httpx.Client(
            base_url=agent.url,
            verify=agent.verify,
            headers={"Authorization": f"Bearer {agent.token}"},
            timeout=30,
        )

    def close(self) -> None:
        self.http.close()

    def submit(self, i: int, pad: int = 100_000) -> httpx.Response:
        body = {
            "config": BIG_TASK.format(pad="x" * pad),
            "request_id": f"fill-{i:08d}",
            "name": f"fill-{i}",
        }
        return self.http.post("/api/v1/runs", json=body)

    def upload(self, tmp_path: Path) -> httpx.Response:
        src = tmp_path / "project"
        src.mkdir(exist_ok=True)
        (src / "train.py").write_text("print('hi')\n" * 1000)
        return self.http.post("/api/v1/code", content=make_archive(src)[0])

    def reads_answer_quickly(self) -> None:
        for path in ("/healthz", "/api/v1/status", "/api/v1/runs"):
            t = time.monotonic()
            r = self.http.get(path)
            assert r.status_code == 200, (path, r.text)
            assert time.monotonic() - t < 1.0, path


@pytest.fixture
def disk_agent(tmp_path: Path) -> Iterator[tuple[AgentProcess, Path]]:
    with tmpfs(tmp_path / "agent", "24m") as disk:
        agent = AgentProcess(tmp_path, "agent", extra=["--min-free-mb", "0"])
        try:
            agent.start()
            yield agent, disk
        finally:
            agent.stop()
            agent.kill_jobs()


def _is_507(r: httpx.Response) -> bool:
    if r.status_code != 507:
        assert r.status_code == 201, r.text  # nothing else: no 500, no dropped connection
        return False
    doc = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert doc["code"] == "insufficient_storage" and "full" in doc["detail"], doc
    return True


@needs_tmpfs
def test_an_agent_whose_disk_fills_answers_507_serves_reads_and_recovers(
    disk_agent: tuple[AgentProcess, Path], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    agent, disk = disk_agent
    api = Api(agent)
    request.addfinalizer(api.close)
    assert api.submit(0).status_code == 201
    filler = fill(disk)
    refused = next((i for i in range(1, 300) if _is_507(api.submit(i))), None)
    assert refused is not None, "the full disk never refused a write"
    assert agent.alive(), agent.log_tail()
    # Refused at once from now on, and reads are served as ever.
    t = time.monotonic()
    assert _is_507(api.submit(1000))
    assert time.monotonic() - t < 1.0
    api.reads_answer_quickly()
    code = api.upload(tmp_path)
    assert code.status_code == 507 and code.json()["code"] == "insufficient_storage", code.text
    time.sleep(2)  # a while on a full disk: still up, still serving
    assert agent.alive(), agent.log_tail()
    api.reads_answer_quickly()
    filler.unlink()
    deadline = time.monotonic() + 20
    while True:  # recovers by itself
        r = api.submit(2000)
        if r.status_code == 201:
            break
        assert _is_507(r) and time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert agent.alive()
    for name in ("fill-0", "fill-2000"):
        assert api.http.get(f"/api/v1/runs/{name}").status_code == 200
    assert "Traceback" not in agent.log_tail(100_000)


@needs_tmpfs
def test_an_agent_under_its_free_space_reserve_refuses_writes_before_the_disk_is_full(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    with tmpfs(tmp_path / "agent", "32m") as disk:
        agent = AgentProcess(tmp_path, "agent", extra=["--min-free-mb", "8"])
        try:
            agent.start()
            api = Api(agent)
            request.addfinalizer(api.close)
            assert api.submit(0, pad=10).status_code == 201
            filler = fill(disk, leave=4 << 20)
            time.sleep(0.6)  # the node looks at free space at most twice a second
            r = api.submit(1, pad=10)
            assert r.status_code == 507, r.text
            assert "reserve" in r.json()["detail"] and r.json()["code"] == "insufficient_storage"
            code = api.upload(tmp_path)
            assert code.status_code == 507 and "reserve" in code.json()["detail"], code.text
            api.reads_answer_quickly()
            filler.unlink()
            time.sleep(0.6)
            assert api.submit(2, pad=10).status_code == 201
            assert api.upload(tmp_path).status_code == 201
            assert agent.alive()
        finally:
            agent.stop()
            agent.kill_jobs()


# -- a data dir the agent cannot use ---------------------------------------------------------


def _agent_cli(data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "meshgpu",
            "agent",
            "--data-dir",
            str(data_dir),
            "--api-port",
            "0",
            "--peer-port",
            "0",
            "--no-mdns",
            "--fake-gpus",
            "1xH100:80GB",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _one_clear_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a_regular_file_as_data_dir_fails_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    _one_clear_line(_agent_cli(f), "--data-dir", str(f), "not a directory")
    _one_clear_line(_agent_cli(f / "below"), "--data-dir", "not writable")


def test_a_read_only_data_dir_fails_in_one_line(tmp_path: Path) -> None:
    if os.geteuid() == 0:  # root writes through permission bits: a read-only mount
        with tmpfs(tmp_path / "ro", "1m", "ro") as ro:
            _one_clear_line(_agent_cli(ro), "--data-dir", "not writable", "Read-only")
        return
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        _one_clear_line(_agent_cli(ro), "--data-dir", "not writable")
    finally:
        ro.chmod(0o755)
