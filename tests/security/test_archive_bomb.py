"""The probe's archive bombs: a few MB of ``.tar.gz`` that expand to gigabytes, archives of too
many entries, and archives whose entries leave the working directory or are not plain files.

Such an archive is refused when it is uploaded (413 or 400, with the reason), walked through in a
worker thread so the agent keeps answering; one that reaches a job anyway (a copy from a member
that never checked it) fails the job with the reason, unpacked in a worker thread within the same
limits. Bombs are built here, from streamed zeros: each tar header and each run of zeros is its
own gzip member (a valid gzip file), so a 3 GiB bomb costs one compression of 100 MiB.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import time
import zlib
from functools import cache
from pathlib import Path

import httpx
import pytest
import trio

from meshgpu.client.archive import (
    ArchiveLimits,
    ArchiveRefused,
    check_archive,
    extract_archive,
    make_archive,
)
from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.runner import ProcessRunner
from meshgpu.runner.code import CodeStore
from meshgpu.runner.executor import Executor
from meshgpu.state import (
    AssignJobs,
    Assignment,
    CodeRef,
    JobFinished,
    RegisterNode,
    StateMachine,
    SubmitRun,
)
from meshgpu.testing import AgentProcess
from tests.security._health import Watch

MiB, GiB = 1 << 20, 1 << 30


@cache
def _zeros(n: int) -> bytes:
    """One gzip member inflating to ``n`` zero bytes, compressed a MiB at a time."""
    co = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(MiB)
    parts = [co.compress(block) for _ in range(n // MiB)]
    parts += [co.compress(bytes(n % MiB)), co.flush()]
    return b"".join(parts)


def _header(name: str, size: int = 0, kind: bytes = tarfile.REGTYPE, **kw: object) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    for k, v in kw.items():
        setattr(info, k, v)
    return gzip.compress(info.tobuf(format=tarfile.PAX_FORMAT), mtime=0)


END = gzip.compress(bytes(1024), mtime=0)


def bomb(files: int, size: int, truncated: bool = False) -> bytes:
    """``files`` files of ``size`` zero bytes each (padded to tar's 512-byte blocks);
    ``truncated``: the headers only, no data (refused before any is needed)."""
    body = b"" if truncated else _zeros(size + (-size % 512))
    return b"".join(_header(f"zeros/{i:04d}.bin", size) + body for i in range(files)) + END


def tar_gz(*members: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as t,
    ):
        for info, data in members:
            info.size = len(data) if info.isreg() else 0
            t.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# -- the check and the unpacking --------------------------------------------------------------


def test_a_plain_working_directory_passes_and_unpacks(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("print('a')\n")
    (src / "link.py").symlink_to("pkg/a.py")
    data, _ = make_archive(src)
    summary = check_archive(data)
    assert summary.files == 2 and summary.bytes == len("print('a')\n")
    out = tmp_path / "out"
    assert extract_archive(data, out) == summary
    assert (out / "link.py").read_text() == "print('a')\n"


def test_a_3_gib_bomb_is_refused_at_its_first_header() -> None:
    data = bomb(1, 3 * GiB, truncated=True)
    t = time.monotonic()
    with pytest.raises(ArchiveRefused) as e:
        check_archive(data, ArchiveLimits(max_bytes=GiB))
    assert time.monotonic() - t < 1.0
    assert e.value.status == 413 and e.value.code == "archive_too_large"
    assert "expands to more than 1 GiB (1073741824 bytes)" in str(e.value)


def test_many_medium_files_are_refused_once_their_total_passes_the_cap(tmp_path: Path) -> None:
    data = bomb(20, 8 * MiB)  # 160 MiB of zeros in a few hundred KB
    assert len(data) < MiB
    limits = ArchiveLimits(max_bytes=32 * MiB)
    with pytest.raises(ArchiveRefused, match="expands to more than 32 MiB"):
        check_archive(data, limits)
    out = tmp_path / "out"
    with pytest.raises(ArchiveRefused, match="expands to more than 32 MiB"):
        extract_archive(data, out, limits)
    assert not out.exists()  # what was unpacked before the cap is gone again
    check_archive(data, ArchiveLimits(max_bytes=160 * MiB))  # within a cap that allows it


def test_too_many_entries_are_refused() -> None:
    data = tar_gz(*((entry(f"f{i}"), b"") for i in range(101)))
    with pytest.raises(ArchiveRefused, match="more than 100 files") as e:
        check_archive(data, ArchiveLimits(max_files=100))
    assert e.value.status == 413
    assert check_archive(data, ArchiveLimits(max_files=101)).files == 101


@pytest.mark.parametrize(
    "member",
    [
        entry("/tmp/meshgpu-absolute"),
        entry("../escaped"),
        entry("a/../../escaped"),
        entry("abs-link", tarfile.SYMTYPE, "/etc/passwd"),
        entry("up-link", tarfile.SYMTYPE, "../../escaped"),
        entry("hard-link", tarfile.LNKTYPE, "../escaped"),
        entry("dev", tarfile.CHRTYPE),
        entry("fifo", tarfile.FIFOTYPE),
    ],
    ids=lambda m: m.name,
)
def test_entries_that_leave_the_directory_or_are_not_files_are_refused(
    tmp_path: Path, member: tarfile.TarInfo
) -> None:
    data = tar_gz((entry("ok.txt"), b"fine"), (member, b"x"))
    with pytest.raises(ArchiveRefused) as e:
        check_archive(data)
    assert e.value.status == 400
    out = tmp_path / "deep" / "out"
    with pytest.raises(ArchiveRefused):
        extract_archive(data, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["deep"]  # nothing outside


def test_an_oversized_extended_header_is_refused_before_it_is_read() -> None:
    data = _header("x", 512 * MiB, tarfile.XHDTYPE) + END  # tarfile would read it into memory
    with pytest.raises(ArchiveRefused, match="extended header"):
        check_archive(data)


@pytest.mark.parametrize(
    "data", [b"", b"plain text", gzip.compress(b"not a tar" * 100)], ids=["empty", "text", "gz"]
)
def test_what_is_not_a_tar_gz_is_refused(data: bytes) -> None:
    with pytest.raises(ArchiveRefused) as e:
        check_archive(data)
    assert e.value.status == 400


# -- the event loop stays free -----------------------------------------------------------------


class Ticker:
    """The longest the event loop went without running this task."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self) -> None:
        last = trio.current_time()
        while True:
            await trio.sleep(0.01)
            now = trio.current_time()
            self.worst = max(self.worst, now - last)
            last = now


async def test_an_upload_is_checked_in_a_worker_thread_and_a_bomb_is_not_stored(
    tmp_path: Path,
) -> None:
    store = CodeStore(tmp_path / "code", limit=8 * MiB, archive_limits=ArchiveLimits(GiB))
    data = bomb(30, 100 * MiB)  # 3 GiB; some 3 MB
    ticker = Ticker()
    async with trio.open_nursery() as n:
        n.start_soon(ticker.run)
        t = trio.current_time()
        with pytest.raises(ArchiveRefused, match="expands to more than 1 GiB") as e:
            await store.put(data)
        took = trio.current_time() - t
        n.cancel_scope.cancel()
    assert e.value.status == 413
    assert not store.has(hashlib.sha256(data).hexdigest()) and not list(store.directory.iterdir())
    assert ticker.worst < 0.5, (ticker.worst, took)  # a second or more of inflating, elsewhere
    assert await store.put(_plain(tmp_path)) is not None  # a real one is stored


def _plain(tmp_path: Path) -> bytes:
    src = tmp_path / "plain"
    src.mkdir(exist_ok=True)
    (src / "train.py").write_text("print('hi')\n")
    return make_archive(src)[0]


def _job_with_code(sha: str, size: int) -> tuple[StateMachine, str]:
    sm = StateMachine()
    sm.apply_command(
        RegisterNode(
            at=1.0,
            node_id="here",
            name="here",
            api_url="http://here:7480",
            cpu_count=16,
            memory_mib=64 * 1024,
            disk_gb=500,
        )
    )
    sm.apply_command(
        SubmitRun(
            at=2.0,
            request_id="req-1",
            run_id="rid",
            run_name="r",
            config=to_json(parse_config("type: task\ncommands: [ls]\n")),
            code=CodeRef(sha256=sha, size=size, node_id="here"),
        )
    )
    job = sm.run_jobs(sm.runs["r"])[0]
    placed = AssignJobs(
        at=3.0, assignments=[Assignment(job_id=job.job_id, node_id="here", gpu_indices=[])]
    )
    assert sm.apply_command(placed).ok
    return sm, job.job_id


async def test_a_bomb_that_reaches_a_job_fails_it_and_the_loop_keeps_running(
    tmp_path: Path,
) -> None:
    store = CodeStore(tmp_path / "code", limit=8 * MiB, archive_limits=ArchiveLimits(64 * MiB))
    data = bomb(20, 16 * MiB)  # 320 MiB
    sha = hashlib.sha256(data).hexdigest()
    store.path(sha).write_bytes(data)  # as a member that never checked it would have it
    sm, job_id = _job_with_code(sha, len(data))
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = Executor("here", sm, runner, None, store.directory, lambda: None, code=store)  # type: ignore[arg-type]
    ticker = Ticker()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                n.start_soon(ticker.run)
                await ex._launch(job_id, sm.jobs[job_id].epoch)
                n.cancel_scope.cancel()
        [report] = ex._reports
        assert isinstance(report, JobFinished) and report.reason == "executor_error"
        assert "was not unpacked" in report.message
        assert "expands to more than 64 MiB" in report.message
        assert not (runner.job_dir(job_id) / "work").exists()  # the partial unpacking is gone
        assert ticker.worst < 0.5
    finally:
        await runner.aclose()


# -- the API ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    a = AgentProcess(
        tmp_path_factory.mktemp("bomb"),
        "agent",
        extra=["--code-limit-mb", "8", "--code-expanded-limit-mb", "1024"],
    )
    a.start()
    yield a
    a.stop()
    a.kill_jobs()


async def test_a_gzip_bomb_upload_is_refused_and_the_agent_keeps_answering(
    agent: AgentProcess, tmp_path: Path
) -> None:
    data = bomb(30, 100 * MiB)  # 3 GiB in some 3 MB: under the 8 MiB upload limit
    assert len(data) < 4 * MiB
    sha = hashlib.sha256(data).hexdigest()
    auth = {"Authorization": f"Bearer {agent.token}"}
    watch = Watch(agent)
    async with (
        httpx.AsyncClient(verify=agent.verify, timeout=60, headers=auth) as c,
        trio.open_nursery() as n,
    ):
        n.start_soon(watch.run, c)
        await trio.sleep(0.2)
        up = await c.post(f"{agent.url}/api/v1/code", content=data)
        pushed = await c.put(f"{agent.url}/api/v1/code/{sha}", content=data)
        await trio.sleep(0.2)
        n.cancel_scope.cancel()
        for r in (up, pushed):
            assert r.status_code == 413, r.text
            assert r.headers["content-type"] == "application/problem+json"
            doc = r.json()
            assert doc["code"] == "archive_too_large"
            assert "expands to more than 1 GiB (1073741824 bytes)" in doc["detail"]
        assert (await c.get(f"{agent.url}/api/v1/code/{sha}")).status_code == 404
        good = _plain(tmp_path)
        ok = await c.post(f"{agent.url}/api/v1/code", content=good)
        assert ok.status_code == 201 and ok.json()["sha256"] == hashlib.sha256(good).hexdigest()
    assert watch.samples > 10 and watch.worst < 1.0, (watch.samples, watch.worst)


async def test_an_unsafe_upload_is_refused_with_the_entry_named(agent: AgentProcess) -> None:
    data = tar_gz((entry("ok.txt"), b"fine"), (entry("up", tarfile.SYMTYPE, "../../etc"), b""))
    async with httpx.AsyncClient(
        verify=agent.verify, headers={"Authorization": f"Bearer {agent.token}"}
    ) as c:
        r = await c.post(f"{agent.url}/api/v1/code", content=data)
    assert r.status_code == 400 and r.json()["code"] == "bad_archive"
    assert "'up'" in r.json()["detail"]


def test_a_bomb_already_on_a_host_fails_the_job_that_uses_it(agent: AgentProcess) -> None:
    data = bomb(1, 3 * GiB, truncated=True)
    sha = hashlib.sha256(data).hexdigest()
    (agent.data / "code" / f"{sha}.tar.gz").write_bytes(data)  # from an older member
    auth = {"Authorization": f"Bearer {agent.token}"}
    with httpx.Client(base_url=agent.url, verify=agent.verify, headers=auth, timeout=30) as c:
        r = c.post(
            "/api/v1/runs",
            json={
                "config": "type: task\ncommands: [ls]\n",
                "request_id": "bomb-job-1",
                "name": "bombed",
                "code_sha256": sha,
            },
        )
        assert r.status_code == 201, r.text
        deadline = time.monotonic() + 30
        while True:
            run = c.get("/api/v1/runs/bombed").json()
            if run["status"] in ("failed", "terminated", "done"):
                break
            assert time.monotonic() < deadline, run
            time.sleep(0.1)
    [job] = run["jobs"]
    assert run["status"] == "failed" and job["termination_reason"] == "executor_error", run
    assert "was not unpacked" in job["termination_message"]
    assert "expands to more than 1 GiB" in job["termination_message"]
