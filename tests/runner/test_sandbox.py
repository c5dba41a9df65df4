"""The process-job sandbox for real (root, cgroup v1 on this project's machines): the job user
and its workspace, the private mount namespace (volumes, shm_size, hidden GPUs), cgroup limits
and OOM, isolation from the agent and from other jobs, SSH sessions entering the job's sandbox;
cgroup v2 against a fake cgroupfs tree. Everything made here (users, cgroups, directories) is
removed at the end."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio

from meshgpu.config.spec import InstanceVolume, compile_run
from meshgpu.devenv.sshd import load_job_context
from meshgpu.runner import JobLaunch, ProcessRunner
from meshgpu.runner import sandbox as sb
from meshgpu.runner.confine import Confinement, ensure_user, limits_for, resolve_user
from meshgpu.runner.container import container_argv

ROOT = os.geteuid() == 0
pytestmark = pytest.mark.skipif(
    not ROOT and os.environ.get("CI") != "true",
    reason="the sandbox needs root (CI runs it as root)",
)
USERS = ("mgtest-a", "mgtest-b")
PY = "/usr/bin/python3"
ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
V1 = sb.cgroup_version("/sys/fs/cgroup")


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[str, str]]:
    made = []
    for name in USERS:
        try:
            pwd.getpwnam(name)
        except KeyError:
            ensure_user(name)
            made.append(name)
    yield USERS
    for name in made:
        subprocess.run(["userdel", name], check=False, capture_output=True)
    for c in sb.V1_CONTROLLERS:  # the jobs' parent cgroup, when no job of anyone is left in it
        try:
            os.rmdir(f"/sys/fs/cgroup/{c}/meshgpu")
        except OSError:
            pass


@pytest.fixture
def ws() -> Iterator[Path]:
    """A workspace root the job users can traverse (pytest's tmp_path has 0700 parents)."""
    d = Path(tempfile.mkdtemp(prefix="meshgpu-ws-", dir="/tmp"))
    os.chmod(d, 0o711)
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def runner(tmp_path: Path, ws: Path) -> AsyncIterator[ProcessRunner]:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    r = ProcessRunner(data / "jobs", workspace_dir=ws / "workspaces")
    yield r
    for d in r.jobs_dir.iterdir():
        if d.is_dir() and (d / "shim.pid").exists() and r.result(d.name) is None:
            r.stop(d.name, 0)
            with trio.move_on_after(10):
                await r.wait(d.name)
    await r.aclose()


def box_for(conf: Confinement, runner: ProcessRunner, job_id: str, **kw: object) -> dict | None:
    runner.prepare(job_id)
    args: dict = {
        "resources": {},
        "share": None,
        "user": None,
        "volumes": (),
        "shm_size_gb": None,
        "gpu_indices": (),
        "workspace": runner.work_dir(job_id),
    } | kw
    box = conf.for_job(job_id, **args)
    return box


async def run_job(
    runner: ProcessRunner, job_id: str, commands: list[str], box: object, wait: bool = True
) -> tuple[object, str]:
    env = ENV | getattr(box, "env", {})
    await runner.start(
        JobLaunch(
            job_id=job_id,
            commands=tuple(commands),
            env=env,
            shell="/bin/sh",
            sandbox=getattr(box, "spec", None),
        )
    )
    if not wait:
        return None, ""
    with trio.fail_after(30):
        res = await runner.wait(job_id)
    return res, runner.log_path(job_id).read_text()


def cg_dirs(job_id: str) -> list[Path]:
    return [Path("/sys/fs/cgroup", c, "meshgpu", job_id) for c in sb.V1_CONTROLLERS]


async def test_job_runs_as_the_job_user_in_its_own_workspace(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    conf = Confinement(users[0])
    box = box_for(conf, runner, "u1")
    res, out = await run_job(
        runner, "u1", ["id -u", "id -G", "pwd", 'echo "$HOME $USER"', "touch mine"], box
    )
    ent = pwd.getpwnam(users[0])
    work = runner.work_dir("u1")
    lines = out.split("\n")
    assert res.exit_code == 0, out  # type: ignore[attr-defined]
    assert lines[0] == str(ent.pw_uid)
    assert lines[2] == str(work)
    assert lines[3] == f"{work} {users[0]}"  # no usable home: the workspace is HOME
    st = work.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (ent.pw_uid, 0o700)
    assert (work / "mine").stat().st_uid == ent.pw_uid
    assert work == runner.workspace_dir / "u1" / "work"  # outside the agent's data dir
    # ps -v's view of it
    assert box.user == users[0] and "pids 32768" in (box.limits or "")  # type: ignore[union-attr]


async def test_user_field_overrides_and_a_missing_user_fails(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    conf = Confinement(users[0])
    box = box_for(conf, runner, "u2", user="nobody")
    res, out = await run_job(runner, "u2", ["id -u"], box)
    assert out.strip() == str(pwd.getpwnam("nobody").pw_uid)
    box = box_for(conf, runner, "u3", user=f"{users[1]}:{pwd.getpwnam(users[0]).pw_gid}")
    res, out = await run_job(runner, "u3", ["id -u", "id -g"], box)
    a, b = pwd.getpwnam(users[0]), pwd.getpwnam(users[1])
    assert out.split() == [str(b.pw_uid), str(a.pw_gid)]
    with pytest.raises(RuntimeError, match="user 'no-such-user-x' does not exist on this host"):
        box_for(conf, runner, "u4", user="no-such-user-x")
    # the agent's own user (or --job-user ''): no switch
    assert Confinement("").job_user is None
    assert Confinement(pwd.getpwuid(os.geteuid()).pw_name).job_user is None
    assert resolve_user("12345").uid == 12345  # a bare uid, as a container's --user


def test_the_agent_creates_a_missing_job_user_once() -> None:
    name = "mgtest-new"
    subprocess.run(["userdel", name], check=False, capture_output=True)
    try:
        ensure_user(name)
        ensure_user(name)  # there already: nothing to do
        ent = pwd.getpwnam(name)
        assert ent.pw_shell == "/usr/sbin/nologin"
        assert not os.path.exists(ent.pw_dir) or ent.pw_dir == "/"
        assert ent.pw_uid < 1000  # --system
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


async def test_a_job_cannot_read_the_agent_data_or_signal_the_agent_or_other_jobs(
    users: tuple[str, str], runner: ProcessRunner, tmp_path: Path
) -> None:
    data = runner.jobs_dir.parent
    for rel in ("tls/ca.key", "admin.token", "raft/log.db"):
        p = data / rel
        p.parent.mkdir(mode=0o700, exist_ok=True)
        p.write_text("secret")
        p.chmod(0o600)
    conf = Confinement(users[0])
    other = Confinement(users[1])
    # a neighbour running as the other user
    await run_job(
        runner,
        "n1",
        ["echo $$ > /dev/null", "exec sleep 30"],
        box_for(other, runner, "n1"),
        wait=False,
    )
    with trio.fail_after(10):
        while not (runner.job_dir("n1") / "job.pid").exists():
            await trio.sleep(0.01)
    neighbour = json.loads((runner.job_dir("n1") / "job.pid").read_text())["pid"]
    checks = [
        f"cat {data}/tls/ca.key && echo READ-CA",
        f"cat {data}/admin.token && echo READ-TOKEN",
        f"cat {data}/raft/log.db && echo READ-RAFT",
        f"ls {data} && echo LISTED",
        f"ls {runner.workspace_dir} && echo LISTED-WS",
        f"kill -0 {os.getpid()} && echo SIGNALLED-AGENT",
        f"kill -0 {neighbour} && echo SIGNALLED-NEIGHBOUR",
        "echo END",
    ]
    res, out = await run_job(runner, "x1", ["; ".join(checks)], box_for(conf, runner, "x1"))
    assert "END" in out, out
    for word in ("READ-", "LISTED", "SIGNALLED-"):
        assert word not in out, out
    assert "Permission denied" in out
    # With a PID namespace the agent and the neighbour do not exist for the job; without one,
    # the kernel refuses the signal (another user).
    assert ("No such process" if conf.pid_ns else "Operation not permitted") in out, out
    assert runner.result("n1") is None  # the neighbour still runs
    runner.stop("n1", 0)
    with trio.fail_after(10):
        await runner.wait("n1")


async def test_volumes_shm_and_gpus_not_held(
    users: tuple[str, str], runner: ProcessRunner, ws: Path
) -> None:
    src = ws / "volume"
    src.mkdir(mode=0o755)
    (src / "data.txt").write_text("from the host\n")
    (src / "data.txt").chmod(0o644)
    dst = ws / "mnt" / "data"  # made by the job's mount, not there before
    dev = ws / "dev"
    dev.mkdir(mode=0o755)
    for i in range(3):
        (dev / f"nvidia{i}").write_text(f"gpu{i}\n")
        (dev / f"nvidia{i}").chmod(0o644)
    (dev / "nvidiactl").write_text("ctl\n")
    conf = Confinement(users[0], dev_dir=str(dev))
    box = box_for(
        conf,
        runner,
        "v1",
        volumes=(
            InstanceVolume(str(src), str(dst)),
            InstanceVolume("/no/such/dir", "/x", optional=True),
        ),
        shm_size_gb=0.0625,
        gpu_indices=(1,),
    )
    res, out = await run_job(
        runner,
        "v1",
        [
            f"cat {dst}/data.txt",
            "df -k /dev/shm | tail -1",
            f"cat {dev}/nvidia0 {dev}/nvidia1 {dev}/nvidia2 {dev}/nvidiactl",
            f"test -e {dst}/data.txt -a ! -e {dst}/../data/x && echo DONE",
        ],
        box,
    )
    assert res.exit_code == 0, out  # type: ignore[attr-defined]
    lines = out.split("\n")
    assert lines[0] == "from the host"
    assert lines[1].split()[1] == str(64 * 1024)  # the tmpfs size, KB
    assert lines[2:4] == ["gpu1", "ctl"]  # nvidia0 and nvidia2 are /dev/null for this job
    assert not os.path.ismount(dst)  # the host never saw the mount
    assert not (dst / "data.txt").exists()
    with pytest.raises(RuntimeError, match="volumes: /no/such/dir does not exist on this host"):
        box_for(conf, runner, "v2", volumes=(InstanceVolume("/no/such/dir", "/x"),))


@pytest.mark.skipif(V1 is None or V1[0] != "v1", reason="this host has no cgroup v1 memory")
async def test_cgroup_v1_limits_and_an_oom_kill_that_spares_the_neighbour(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    conf = Confinement(users[0])
    assert conf.capabilities() == {
        "user": users[0],
        "cgroup": "v1",
        "mount_ns": True,
        "pid_ns": True,
    }
    box = box_for(conf, runner, "nb", resources={"memory": "1GB", "cpu": 1})
    await run_job(runner, "nb", ["exec sleep 60"], box, wait=False)
    with trio.fail_after(10):
        while not (runner.job_dir("nb") / "job.pid").exists():
            await trio.sleep(0.01)
    mem, cpu, pids = cg_dirs("nb")
    assert (mem / "memory.limit_in_bytes").read_text().strip() == str(1 << 30)
    assert (cpu / "cpu.cfs_quota_us").read_text().strip() == "100000"
    assert (pids / "pids.max").read_text().strip() == "32768"
    nb_pid = json.loads((runner.job_dir("nb") / "job.pid").read_text())["pid"]
    assert str(nb_pid) in (mem / "cgroup.procs").read_text().split()

    box = box_for(conf, runner, "oom", resources={"memory": "64MB..64MB"})
    assert box.limits.startswith("memory 64MB")  # type: ignore[union-attr]
    res, out = await run_job(
        runner, "oom", [f"{PY} -c \"b = b'x' * (400 << 20); print('survived')\""], box
    )
    assert res.reason == "container_exited_with_error", out  # type: ignore[attr-defined]
    assert res.message.startswith("out of memory (limit 64MB)"), res  # type: ignore[attr-defined]
    assert "survived" not in out
    assert not any(d.exists() for d in cg_dirs("oom"))  # removed when it ended
    assert runner.result("nb") is None  # the neighbour keeps running
    runner.stop("nb", 0)
    with trio.fail_after(10):
        res = await runner.wait("nb")
    assert res.reason == "terminated_by_user" and not res.message
    assert not any(d.exists() for d in cg_dirs("nb"))


@pytest.mark.skipif(V1 is None, reason="this host has no cgroup memory controller")
async def test_the_job_end_takes_processes_that_left_its_group(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    conf = Confinement(users[0])
    box = box_for(conf, runner, "esc")
    res, out = await run_job(runner, "esc", ["setsid sleep 300 & sleep 0.2; echo started"], box)
    assert "started" in out
    assert not any(d.exists() for d in cg_dirs("esc"))
    leftover = subprocess.run(["pgrep", "-u", users[0], "-f", "sleep 300"], capture_output=True)
    assert leftover.stdout == b""


def test_limits_follow_the_range_or_the_block_share() -> None:
    assert limits_for({}) == (None, None)  # dstack's defaults 8GB.., 2..: floors, not caps
    assert limits_for({"memory": "16GB", "cpu": 4}) == (16 << 30, 4.0)
    assert limits_for({"memory": "4GB..16GB", "cpu": "1..4"}) == (16 << 30, 4.0)
    assert limits_for({"memory": "24GB"}, share=(32.0, 8.0)) == (32 << 30, 8.0)


def test_cgroup_v2_with_a_fake_tree(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert sb.cgroup_version(str(root)) == ("v2", str(root))
    hybrid = tmp_path / "hybrid"
    (hybrid / "unified").mkdir(parents=True)
    (hybrid / "unified" / "cgroup.controllers").write_text("memory pids\n")
    assert sb.cgroup_version(str(hybrid)) == ("v2", str(hybrid / "unified"))
    bare = tmp_path / "bare"
    (bare / "unified").mkdir(parents=True)
    (bare / "unified" / "cgroup.controllers").write_text("hugetlb\n")
    assert sb.cgroup_version(str(bare)) is None  # no memory anywhere: no cgroups
    conf = Confinement(None, cgroup_root=str(root), root=True)
    assert conf.capabilities()["cgroup"] == "v2"
    cg = {
        "version": "v2",
        "root": str(root),
        "name": "meshgpu/j1",
        "memory_bytes": 1 << 30,
        "cpu_quota_us": 150000,
        "cpu_period_us": 100000,
        "pids_max": 100,
    }
    sb.cgroup_create(cg)
    d = root / "meshgpu" / "j1"
    assert (d / "memory.max").read_text() == str(1 << 30)
    assert (d / "cpu.max").read_text() == "150000 100000"
    assert (d / "pids.max").read_text() == "100"
    assert (root / "cgroup.subtree_control").read_text() == "+memory +cpu +pids"
    sb.cgroup_join(cg, 12345)
    assert (d / "cgroup.procs").read_text() == "12345"
    assert sb.oom_kills(cg) == 0
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n")
    assert sb.oom_kills(cg) == 2


async def test_a_v2_job_end_to_end_reports_its_oom(tmp_path: Path, runner: ProcessRunner) -> None:
    """The whole path over a fake v2 tree: the supervisor makes the cgroup, the child joins it
    (a plain file here), the kernel's count (written beforehand) makes the end an OOM."""
    root = tmp_path / "cg"
    (root / "meshgpu" / "fake").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "meshgpu" / "fake" / "memory.events").write_text("oom 1\noom_kill 1\n")
    # Joining writes the child's pid; reading it back must not name a process (ending the job
    # kills what its cgroup lists, and a fake file would keep a pid the system may reuse).
    (root / "meshgpu" / "fake" / "cgroup.procs").symlink_to("/dev/null")
    conf = Confinement(None, cgroup_root=str(root), root=True)
    box = box_for(conf, runner, "fake", resources={"memory": "2GB"})
    res, out = await run_job(runner, "fake", ["exit 137"], box)
    assert res.message.startswith("out of memory (limit 2GB)")  # type: ignore[attr-defined]
    assert res.reason == "container_exited_with_error"  # type: ignore[attr-defined]
    assert (root / "meshgpu" / "fake" / "memory.max").read_text() == str(2 << 30)


async def test_ssh_sessions_enter_the_job_sandbox(
    users: tuple[str, str], runner: ProcessRunner, ws: Path
) -> None:
    src = ws / "vol"
    src.mkdir(mode=0o755)
    (src / "f").write_text("volume\n")
    (src / "f").chmod(0o644)
    dst = ws / "in-job"
    conf = Confinement(users[0])
    box = box_for(conf, runner, "s1", volumes=(InstanceVolume(str(src), str(dst)),))
    await run_job(runner, "s1", ["exec sleep 60"], box, wait=False)
    with trio.fail_after(10):
        while not (runner.job_dir("s1") / "job.pid").exists():
            await trio.sleep(0.01)
    ctx = load_job_context(runner.jobs_dir, "s1")
    assert ctx.env["HOME"] == str(runner.work_dir("s1")) and ctx.cwd == str(runner.work_dir("s1"))
    assert ctx.pid_ns == conf.pid_ns
    done = subprocess.run(
        ctx.command(["/bin/sh", "-c", f"id -u; pwd; cat {dst}/f; cat /proc/self/cgroup"]),
        cwd=ctx.cwd,
        env=ctx.env,
        preexec_fn=ctx.preexec(tty=False),
        capture_output=True,
        text=True,
        check=False,
    )
    lines = done.stdout.split("\n")
    assert lines[0] == str(pwd.getpwnam(users[0]).pw_uid), done.stderr
    assert lines[1] == str(runner.work_dir("s1"))
    assert lines[2] == "volume"  # the job's mount namespace
    if V1 is not None and V1[0] == "v1":
        assert any(line.endswith(":memory:/meshgpu/s1") for line in lines)
    runner.stop("s1", 0)
    with trio.fail_after(10):
        await runner.wait("s1")


def test_volumes_compile_and_reach_containers() -> None:
    spec = compile_run(
        {
            "type": "task",
            "commands": ["x"],
            "volumes": [
                {"instance_path": "/h", "path": "/j", "optional": False},
                {"name": ["net"], "path": "/n"},
                {"instance_path": "/o", "path": "/p", "optional": True},
                "/s:/t",
            ],
        }
    )
    assert spec.volumes == (
        InstanceVolume("/h", "/j"),
        InstanceVolume("/o", "/p", True),
        InstanceVolume("/s", "/t"),
    )
    argv = container_argv(
        "docker",
        job_id="j",
        image="ubuntu",
        commands=["x"],
        env={},
        work_dir="/w",
        volumes=[("/h", "/j")],
        user="1000:1000",
    )
    assert argv[argv.index("/h:/j") - 1] == "-v" and "--user" in argv


# ---------------------------------------------------------------------------------------------
# The job's PID namespace


def needs_pid_ns() -> None:
    if not Confinement("").pid_ns:
        pytest.skip("this host refuses a PID namespace to jobs")


async def started(runner: ProcessRunner, job_id: str) -> dict:
    with trio.fail_after(10):
        while not (runner.job_dir(job_id) / "job.pid").exists():
            await trio.sleep(0.01)
    return json.loads((runner.job_dir(job_id) / "job.pid").read_text())


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_jobs_of_one_user_neither_see_nor_signal_each_other_or_the_agent(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    """Same job user for both: only the PID namespace stands between them."""
    needs_pid_ns()
    conf = Confinement(users[0])
    await run_job(runner, "pb", ["exec sleep 60"], box_for(conf, runner, "pb"), wait=False)
    rec = await started(runner, "pb")
    assert rec["pid_ns"] is True
    init = rec["pid"]
    assert Path(f"/proc/{init}/comm").read_text().strip() == "meshgpu-init"
    with trio.fail_after(10):
        while not children(init):
            await trio.sleep(0.01)
    (job_b,) = children(init)  # B's own process (sleep), as the host numbers it
    assert Path(f"/proc/{job_b}/comm").read_text().strip() == "sleep"
    assert pwd.getpwnam(users[0]).pw_uid == os.stat(f"/proc/{job_b}").st_uid
    targets = {"AGENT": os.getpid(), "B-INIT": init, "B-JOB": job_b}
    checks = []
    for name, pid in targets.items():
        checks += [
            f"kill -0 {pid} 2>/dev/null && echo SIGNALLED-{name}",
            f"kill -TERM {pid} 2>/dev/null && echo TERMED-{name}",
            f"test -e /proc/{pid} && echo SEES-{name}",
        ]
    checks += ["echo PS", "ps -e -o pid=,comm=", "echo END"]
    res, out = await run_job(runner, "pa", ["; ".join(checks)], box_for(conf, runner, "pa"))
    assert "END" in out, out
    assert "SIGNALLED-" not in out and "TERMED-" not in out and "SEES-" not in out, out
    seen = [line.split() for line in out.split("PS\n", 1)[1].split("END")[0].splitlines()]
    assert seen[0] == ["1", "meshgpu-init"], out  # the job's init, then the job itself
    assert {comm for _, comm in seen[1:]} <= {"sh", "ps"}, out
    assert max(int(pid) for pid, _ in seen) < 10, out
    assert runner.result("pb") is None  # B never noticed
    runner.stop("pb", 0)
    with trio.fail_after(10):
        res = await runner.wait("pb")
    assert (res.reason, res.signal) == ("terminated_by_user", 9)  # type: ignore[attr-defined]
    assert not Path(f"/proc/{job_b}").exists()


async def test_a_graceful_stop_reaches_the_job_then_sigkill_after_the_grace(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    needs_pid_ns()
    conf = Confinement(users[0])
    work = runner.work_dir
    # A trap: the SIGTERM reaches the job (not only its init), which ends how it chooses.
    trap = "trap 'echo term > got-term; exit 7' TERM; echo up > up; while :; do sleep 0.05; done"
    await run_job(runner, "g1", [trap], box_for(conf, runner, "g1"), wait=False)
    await started(runner, "g1")
    with trio.fail_after(10):
        while not (work("g1") / "up").exists():
            await trio.sleep(0.01)
    runner.stop("g1", 10)
    with trio.fail_after(10):
        res = await runner.wait("g1")
    assert (work("g1") / "got-term").read_text() == "term\n"
    assert (res.reason, res.exit_code, res.signal) == ("terminated_by_user", 7, None)  # type: ignore[attr-defined]
    # SIGTERM ignored: SIGKILL after the grace period takes the whole namespace.
    deaf = "trap '' TERM; echo up > up; sh -c 'trap \"\" TERM; sleep 60' & while :; do sleep 0.05; done"
    await run_job(runner, "g2", [deaf], box_for(conf, runner, "g2"), wait=False)
    init = (await started(runner, "g2"))["pid"]
    with trio.fail_after(10):
        while not (work("g2") / "up").exists():
            await trio.sleep(0.01)
    t0 = trio.current_time()
    runner.stop("g2", 0.5)
    with trio.fail_after(10):
        res = await runner.wait("g2")
    assert trio.current_time() - t0 >= 0.5
    assert (res.reason, res.exit_code, res.signal) == ("terminated_by_user", 137, 9)  # type: ignore[attr-defined]
    assert not Path(f"/proc/{init}").exists()
    left = subprocess.run(["pgrep", "-u", users[0], "-f", "sleep 60"], capture_output=True)
    assert left.stdout == b""


async def test_exit_codes_signals_and_max_duration_come_through_the_init(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    needs_pid_ns()
    conf = Confinement(users[0])
    res, out = await run_job(runner, "e1", ["echo out", "exit 3"], box_for(conf, runner, "e1"))
    assert (res.exit_code, res.signal, res.reason) == (3, None, "container_exited_with_error")  # type: ignore[attr-defined]
    assert out == "out\n"
    res, out = await run_job(runner, "e2", ["kill -USR1 $$"], box_for(conf, runner, "e2"))
    assert (res.exit_code, res.signal) == (138, 10)  # type: ignore[attr-defined]
    res, out = await run_job(runner, "e3", ["exit 0"], box_for(conf, runner, "e3"))
    assert (res.exit_code, res.reason) == (0, "done_by_runner")  # type: ignore[attr-defined]
    # an orphan the job leaves behind is reaped by the init, then ends with the job
    res, out = await run_job(
        runner,
        "e4",
        ["(sleep 0.1; echo orphan) & sleep 0.3; echo main"],
        box_for(conf, runner, "e4"),
    )
    assert out.split() == ["orphan", "main"] and res.exit_code == 0  # type: ignore[attr-defined]
    box = box_for(conf, runner, "e5")
    await runner.start(
        JobLaunch(
            job_id="e5",
            commands=("sleep 30",),
            env=ENV | box.env,  # type: ignore[union-attr]
            sandbox=box.spec,  # type: ignore[union-attr]
            max_duration_s=1,
            stop_grace_s=1,
        )
    )
    with trio.fail_after(15):
        res = await runner.wait("e5")
    assert res.reason == "max_duration_exceeded" and res.signal == 15  # type: ignore[attr-defined]


async def test_without_a_pid_namespace_jobs_run_as_before(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    conf = Confinement(users[0], pid_ns=False)
    assert conf.capabilities()["pid_ns"] is False
    box = box_for(conf, runner, "np")
    assert box.spec["pid_ns"] is False  # type: ignore[union-attr]
    await run_job(runner, "np", ["exec sleep 60"], box, wait=False)
    rec = await started(runner, "np")
    assert rec["pid_ns"] is False
    ctx = load_job_context(runner.jobs_dir, "np")
    assert ctx.pid_ns is False and ctx.command(["x"]) == ["x"]
    res, out = await run_job(
        runner, "np2", [f"kill -0 {rec['pid']} && echo SEEN"], box_for(conf, runner, "np2")
    )
    assert "SEEN" in out  # the documented caveat: same user, no namespace
    runner.stop("np", 0)
    with trio.fail_after(10):
        await runner.wait("np")


async def test_ssh_sessions_join_the_pid_namespace(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    needs_pid_ns()
    conf = Confinement(users[0])
    await run_job(runner, "sp", ["exec sleep 60"], box_for(conf, runner, "sp"), wait=False)
    init = (await started(runner, "sp"))["pid"]
    ctx = load_job_context(runner.jobs_dir, "sp")
    assert ctx.pid_ns
    argv = ctx.command(["/bin/sh", "-c", f"ps -e -o pid=,comm=; kill -0 {os.getpid()}; exit 5"])
    assert argv[1:3] == ["--fork", "--"]
    done = subprocess.run(
        argv,
        cwd=ctx.cwd,
        env=ctx.env,
        preexec_fn=ctx.preexec(tty=False),
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 5, done.stderr  # the command's own status, through the fork
    seen = [line.split() for line in done.stdout.splitlines()]
    assert seen[0] == ["1", "meshgpu-init"], done.stdout
    assert [comm for _, comm in seen[1:]] == ["sleep", "sh", "ps"], done.stdout
    assert "No such process" in done.stderr
    # a signal that ends the session's command is its status too
    done = subprocess.run(
        ctx.command(["/bin/sh", "-c", "kill -TERM $$"]),
        env=ctx.env,
        cwd=ctx.cwd,
        preexec_fn=ctx.preexec(tty=False),
        check=False,
    )
    assert done.returncode == -15
    runner.stop("sp", 0)
    with trio.fail_after(10):
        await runner.wait("sp")
    assert not Path(f"/proc/{init}").exists()


async def test_a_sandboxed_job_in_its_pid_namespace_gets_its_secrets(
    users: tuple[str, str], runner: ProcessRunner
) -> None:
    """The secrets reach the job through the init of its PID namespace too (they come to the
    supervisor in memory, never in job.json), and are masked in its log."""
    needs_pid_ns()
    secret = "hf_pidns-s3cr3t-0123"
    box = box_for(Confinement(users[0]), runner, "s1")
    await runner.start(
        JobLaunch(
            job_id="s1",
            commands=('echo "len=${#HF_TOKEN} value=$HF_TOKEN"',),
            env=ENV | box.env,  # type: ignore[union-attr]
            sandbox=box.spec,  # type: ignore[union-attr]
            secret_env={"HF_TOKEN": secret},
            mask=(secret,),
        )
    )
    with trio.fail_after(30):
        res = await runner.wait("s1")
    out = runner.log_path("s1").read_text()
    assert res.reason == "done_by_runner", (res, out)
    assert f"len={len(secret)} value=***" in out and secret not in out
    assert json.loads((runner.job_dir("s1") / "job.pid").read_text())["pid_ns"] is True
