"""Code archives between hosts (meshgpu/runner/code.py): where a host looks for an archive it
lacks, what it accepts (only bytes with the right SHA-256), that concurrent jobs fetch once, that
a fetch gives up in bounded time naming whom it asked, and that an upload's copies stand in for
each other. The link between members is an in-process fake (the peer port's own is tested in
tests/peer/); the files are real."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import NO_SPEC
from meshgpu.runner import ProcessRunner
from meshgpu.runner.code import (
    CodeDigestError,
    CodeFetchError,
    CodeStore,
    CodeUnavailable,
    Source,
    fetch_sources,
    push_targets,
)
from meshgpu.runner.executor import Executor
from meshgpu.state import (
    AssignJobs,
    Assignment,
    CodeRef,
    JobFinished,
    NodeRecord,
    RegisterNode,
    StateMachine,
    SubmitRun,
)


def _tar_gz(files: dict[str, bytes]) -> bytes:
    """A small real archive (stores check what they are given)."""
    buf = io.BytesIO()
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz,
        tarfile.open(fileobj=gz, mode="w") as tar,
    ):
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


ARCHIVE = _tar_gz({"data.txt": b"payload\n"})
SHA = hashlib.sha256(ARCHIVE).hexdigest()
SRC = [Source(f"id{i}", f"n{i}", f"http://n{i}:7480") for i in range(3)]


class FakeLink:
    """``handler(method, src_name, sha, data)`` answers each call: bytes for a fetch, or raise
    ``CodeUnavailable``; it may be async."""

    def __init__(self, handler: Callable[..., object]) -> None:
        self.handler = handler

    async def _call(self, *args: object) -> object:
        result = self.handler(*args)
        if hasattr(result, "__await__"):
            result = await result  # type: ignore[misc]
        return result

    async def fetch(self, src: Source, sha: str, cap: int, timeout: float) -> bytes:
        data = await self._call("GET", src.name, sha, b"")
        assert isinstance(data, bytes)
        if len(data) > cap:  # the peer client stops reading there
            raise CodeUnavailable(f"sent more than the archive's {cap} bytes")
        return data

    async def push(self, src: Source, sha: str, data: bytes, timeout: float) -> None:
        await self._call("PUT", src.name, sha, data)


def _store(tmp_path: Path, handler: Callable[..., object], **kw: object) -> CodeStore:
    kw = {"fetch_for_s": 5.0, "backoff_s": (0.01, 0.05), **kw}
    return CodeStore(
        tmp_path / "code",
        FakeLink(handler),
        limit=1 << 20,
        **kw,  # type: ignore[arg-type]
    )


def _leftovers(store: CodeStore) -> list[str]:
    return sorted(p.name for p in store.directory.iterdir())


async def test_fetch_skips_missing_and_corrupt_copies_and_stores_a_verified_one(
    tmp_path: Path,
) -> None:
    asked: list[str] = []

    def handler(method: str, name: str, sha: str, data: bytes) -> bytes:
        asked.append(name)
        assert (method, sha) == ("GET", SHA)
        if name == "n0":
            raise CodeUnavailable("does not have it")
        if name == "n1":
            return ARCHIVE + b"tampered"
        return ARCHIVE

    store = _store(tmp_path, handler)
    path = await store.fetch(SHA, len(ARCHIVE) + 100, lambda: SRC)
    assert asked == ["n0", "n1", "n2"]
    assert path.read_bytes() == ARCHIVE and store.has(SHA)
    assert _leftovers(store) == [f"{SHA}.tar.gz"]  # no partial file left behind
    await store.fetch(SHA, len(ARCHIVE), lambda: SRC)  # present now: nobody is asked again
    assert asked == ["n0", "n1", "n2"]


async def test_a_wrong_hash_is_refused_and_the_job_learns_whom_it_asked(tmp_path: Path) -> None:
    rounds = []

    def handler(method: str, name: str, sha: str, data: bytes) -> bytes:
        rounds.append(name)
        if name == "n1":
            raise CodeUnavailable("connection refused")
        return b"not the archive"

    store = _store(tmp_path, handler, fetch_for_s=0.5)
    with pytest.raises(CodeFetchError) as e:
        await store.fetch(SHA, None, lambda: SRC[:2])
    msg = str(e.value)
    assert f"code archive {SHA[:12]} could not be fetched" in msg
    assert "from n0, n1" in msg and "SHA-256" in msg and "connection refused" in msg
    assert rounds.count("n0") > 1  # retried with backoff, not given up at the first failure
    assert not store.has(SHA) and _leftovers(store) == []


async def test_more_bytes_than_the_archive_has_are_refused(tmp_path: Path) -> None:
    store = _store(tmp_path, lambda *a: ARCHIVE, fetch_for_s=0.2)
    with pytest.raises(CodeFetchError, match="more than the archive's 5 bytes"):
        await store.fetch(SHA, 5, lambda: SRC[:1])


async def test_concurrent_jobs_of_a_run_fetch_once(tmp_path: Path) -> None:
    gets = 0

    async def handler(*args: object) -> bytes:
        nonlocal gets
        gets += 1
        await trio.sleep(0.05)  # still in flight when the other jobs ask
        return ARCHIVE

    store = _store(tmp_path, handler)
    paths: list[Path] = []

    async def job() -> None:
        paths.append(await store.fetch(SHA, None, lambda: SRC))

    async with trio.open_nursery() as n:
        for _ in range(4):
            n.start_soon(job)
    assert gets == 1 and len(set(paths)) == 1 and paths[0].read_bytes() == ARCHIVE


async def test_put_refuses_bytes_that_do_not_match_the_claimed_hash(tmp_path: Path) -> None:
    store = _store(tmp_path, lambda *a: b"")
    with pytest.raises(CodeDigestError):
        await store.put(b"other bytes", SHA)
    assert not store.has(SHA)
    assert await store.put(ARCHIVE, SHA) == SHA and store.path(SHA).read_bytes() == ARCHIVE
    assert not store.has("../" + SHA[3:]) and not store.has(SHA.upper())
    with pytest.raises(ValueError):
        store.path("../../etc/passwd")


async def test_a_failed_copy_is_replaced_by_the_next_member(tmp_path: Path) -> None:
    received: dict[str, bytes] = {}

    def handler(method: str, name: str, sha: str, data: bytes) -> None:
        assert (method, sha) == ("PUT", SHA)
        if name == "n0":
            raise CodeUnavailable("refused (507 insufficient storage)")
        received[name] = data

    store = _store(tmp_path, handler)
    assert await store.push(SHA, ARCHIVE, SRC, 0) == []
    got = await store.push(SHA, ARCHIVE, SRC, 2)
    assert sorted(got) == ["id1", "id2"] and store.holders(SHA) == ["id1", "id2"]
    assert received == {"n1": ARCHIVE, "n2": ARCHIVE}


def _node(node_id: str, status: str = "active", zone: str | None = None) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        name=f"name-{node_id}",
        api_url=f"http://{node_id}:7480/",
        status=status,
        labels={"zone": zone} if zone else {},
    )


def test_fetchers_ask_the_origin_then_the_holders_then_everyone_else() -> None:
    nodes = {n.node_id: n for n in map(_node, ["a", "b", "me", "c", "origin", "h1", "h2"])}
    nodes["h1"].status = "dead"
    ref = CodeRef(sha256=SHA, size=1, node_id="origin", holders=["h1", "h2", "gone"])
    order = [s.node_id for s in fetch_sources(ref, nodes, "me")]
    assert order == ["origin", "h2", "a", "b", "c", "h1"]  # dead last, unknown and self never
    assert fetch_sources(ref, nodes, "me")[0].api_url == "http://origin:7480"
    assert CodeRef.model_validate({"sha256": SHA, "size": 1, "node_id": "x"}).holders == []


def test_copies_go_to_other_zones_first_and_never_to_dead_hosts() -> None:
    nodes = {
        n.node_id: n
        for n in [
            _node("me", zone="a"),
            _node("same", zone="a"),
            _node("other", zone="b"),
            _node("none"),
            _node("dead", status="dead", zone="c"),
        ]
    }
    for _ in range(10):
        order = [s.node_id for s in push_targets(nodes, "me")]
        assert sorted(order[:2]) == ["none", "other"] and order[2:] == ["same"]


def _one_job_placed_here() -> tuple[StateMachine, str]:
    """A run with uploaded code, accepted by "origin", whose job is placed on "here"."""
    sm = StateMachine()
    for node_id in ("origin", "here"):
        sm.apply_command(
            RegisterNode(
                at=1.0,
                node_id=node_id,
                name=node_id,
                api_url=f"http://{node_id}:7480",
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
            config=to_json(parse_config("type: task\ncommands: [cat data.txt]\n")),
            code=CodeRef(sha256=SHA, size=len(ARCHIVE), node_id="origin"),
        )
    )
    job = sm.run_jobs(sm.runs["r"])[0]
    result = sm.apply_command(
        AssignJobs(
            at=3.0, assignments=[Assignment(job_id=job.job_id, node_id="here", gpu_indices=[])]
        )
    )
    assert result.ok and not result.value["refused"], result
    return sm, job.job_id


def _executor(sm: StateMachine, store: CodeStore, runner: ProcessRunner) -> Executor:
    return Executor("here", sm, runner, None, store.directory, lambda: None, code=store)  # type: ignore[arg-type]


async def test_a_job_whose_code_cannot_be_fetched_fails_with_executor_error(
    tmp_path: Path,
) -> None:
    sm, job_id = _one_job_placed_here()

    def handler(*args: object) -> bytes:
        raise CodeUnavailable("connection refused")

    store = _store(tmp_path, handler, fetch_for_s=0.2)
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = _executor(sm, store, runner)
    await ex._launch(job_id, sm.jobs[job_id].epoch)
    [report] = ex._reports
    assert isinstance(report, JobFinished) and report.reason == "executor_error"
    assert "could not be fetched" in report.message and "from origin" in report.message
    runner.mark_reported(job_id)  # a job that never got a directory: nothing to mark
    assert not runner.job_dir(job_id).exists() and not ex._fetching
    await runner.aclose()


async def test_a_job_stopped_while_its_code_is_fetched_never_starts(tmp_path: Path) -> None:
    sm, job_id = _one_job_placed_here()
    asked = trio.Event()

    async def handler(*args: object) -> bytes:
        asked.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    store = _store(tmp_path, handler)  # would retry for 5 s
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    ex = _executor(sm, store, runner)
    with trio.fail_after(3):  # well before the fetch would give up
        async with trio.open_nursery() as n:
            n.start_soon(ex._launch, job_id, sm.jobs[job_id].epoch)
            await asked.wait()
            ex._stop(job_id, abort=False, spec=NO_SPEC)
    [report] = ex._reports
    assert isinstance(report, JobFinished) and report.reason == "terminated_by_server"
    assert not runner.job_dir(job_id).exists() and not ex._fetching
    await runner.aclose()


def test_an_unchanged_directory_gives_the_same_archive(tmp_path: Path) -> None:
    import os
    import time

    from meshgpu.client.archive import extract_archive, make_archive

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.py").write_text("print('a')\n")
    (tmp_path / "b.txt").write_text("b\n")
    first = make_archive(tmp_path)
    time.sleep(1.1)  # the gzip header's time would differ by a second
    os.utime(tmp_path / "b.txt")
    assert make_archive(tmp_path) == first
    (tmp_path / "b.txt").write_text("changed\n")
    assert make_archive(tmp_path)[1] != first[1]
    out = tmp_path / "out"
    extract_archive(first[0], out)
    assert (out / "src" / "a.py").read_text() == "print('a')\n"


async def test_archives_no_run_refers_to_are_collected_once_old(tmp_path: Path) -> None:
    import os

    store = CodeStore(tmp_path / "code", limit=1 << 20)
    kept = await store.put(_tar_gz({"kept": b""}))
    old = await store.put(_tar_gz({"old": b""}))
    fresh = await store.put(_tar_gz({"fresh": b""}))
    past = os.stat(store.path(old)).st_mtime - 7200
    for sha in (kept, old):
        os.utime(store.path(sha), (past, past))
    assert store.collect({kept}) == 1
    assert store.has(kept) and store.has(fresh) and not store.has(old)


def test_an_archive_leaves_out_what_it_is_told(tmp_path: Path) -> None:
    """A service's configuration file stays out of its archive: editing only its replicas
    changes no code (the update applies without a redeploy)."""
    from meshgpu.client.archive import make_archive

    (tmp_path / "app.py").write_text("print(1)\n")
    (tmp_path / "service.yml").write_text("replicas: 1\n")
    _, sha = make_archive(tmp_path, exclude=["service.yml"])
    (tmp_path / "service.yml").write_text("replicas: 3\n")
    data, again = make_archive(tmp_path, exclude=["service.yml"])
    assert sha == again
    assert make_archive(tmp_path)[1] != sha
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert tar.getnames() == ["app.py"]
