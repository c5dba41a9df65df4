"""scripts/bench ssh: ``ssh RUN`` through a node that does not run the job, against OpenSSH's sshd.

Two agents on loopback: A (an A100) and B (an H100); a task asking for an H100 runs on B. With
a temporary HOME, ``meshgpu attach RUN --config-only`` against A writes the ``Host RUN`` entry
(``ProxyCommand meshgpu ssh-proxy`` over A's API, which relays to B's SSH server). Then, in the
same run, the real OpenSSH client measures:

- ``ssh RUN true``: the median of N (20) round trips (a fresh connection each, the proxy
  process included) against ``ssh root@127.0.0.1 true`` to a throwaway OpenSSH sshd on loopback
  (its own host key and authorized_keys, ``UsePAM no``, a free port);
- a SIZE MB (200) scp up and down through A against the same via that sshd, the copy back
  checked byte-identical.

``scp_mb_s`` is the lower of the up and down figures (likewise ``sshd_scp_mb_s``); the
directions are reported too. Targets (issue 14): exec p50 <= 3x sshd's, scp >= 0.5x sshd's.
Bounded by ``--budget`` seconds (170); every process and temp dir is cleaned up. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.testing import AgentProcess  # noqa: E402
from tests.devenv._tunnel import openssh_server  # noqa: E402

RUN = "sshbench"
TASK = f"""\
type: task
name: {RUN}
commands:
  - sleep infinity
resources:
  gpu: H100:1
  cpu: 1..
  memory: 0.1GB..
  disk: 1GB..
"""
EXEC_TARGET = 3.0  # ssh_exec_p50_ms <= 3x sshd's
SCP_TARGET = 0.5  # scp_mb_s >= 0.5x sshd's


class OverBudget(Exception):
    pass


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise RuntimeError("condition not met in time")
        time.sleep(interval)
    return value


def timed(argv: list[str], env: dict[str, str] | None = None, timeout: float = 60) -> float:
    t = time.perf_counter()
    r = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    dt = time.perf_counter() - t
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:1] + argv[-2:])} failed: {r.stderr.strip()}")
    return dt


def blob(path: Path, size_mb: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size_mb):
            f.write(os.urandom(1 << 20))


def same_file(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while chunk := fa.read(1 << 22):
            if chunk != fb.read(1 << 22):
                return False
    return True


def measure(
    label: str, exec_argv: list[str], scp_base: list[str], up: str, down: str,
    src: Path, back: Path, runs: int, env: dict[str, str] | None,
) -> dict[str, Any]:  # fmt: skip
    """Exec p50 over ``runs`` (after one warm-up) and scp up then down (``up``/``down``: the
    remote path, host-qualified)."""
    timed(exec_argv, env)
    ms = [timed(exec_argv, env) * 1000 for _ in range(runs)]
    mb = src.stat().st_size / 1e6
    up_s = timed(["scp", *scp_base, str(src), up], env, timeout=120)
    down_s = timed(["scp", *scp_base, down, str(back)], env, timeout=120)
    ok = same_file(src, back)
    back.unlink()
    log(
        f"{label:6s} exec p50 {statistics.median(ms):7.1f} ms (min {min(ms):.1f}, max "
        f"{max(ms):.1f})  scp up {mb / up_s:7.1f} MB/s  down {mb / down_s:7.1f} MB/s"
    )
    return {
        "exec_p50_ms": round(statistics.median(ms), 1),
        "scp_up_mb_s": round(mb / up_s, 1),
        "scp_down_mb_s": round(mb / down_s, 1),
        "identical": ok,
    }


def main(args: argparse.Namespace) -> dict[str, Any]:
    for tool in ("ssh", "scp", "ssh-keygen"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install openssh-client)")
    if not os.path.exists(shutil.which("sshd") or "/usr/sbin/sshd"):
        raise SystemExit("sshd is not installed (apt-get install openssh-server)")

    def over_budget(signum: int, frame: Any) -> None:
        raise OverBudget(f"over the {args.budget} s budget")

    signal.signal(signal.SIGALRM, over_budget)
    signal.alarm(args.budget)
    root = Path(tempfile.mkdtemp(prefix="bench-ssh-"))
    a = AgentProcess(root, "a", fake_gpus="1xA100:40GB")
    b = AgentProcess(root, "b", fake_gpus="1xH100:80GB")
    t0 = time.monotonic()
    try:
        a.start()
        b.start(a.join_token(), a.url)
        wait_for(lambda: len(a.client().nodes()) == 2, 60)
        proj, home = root / "proj", root / "home"
        proj.mkdir()
        home.mkdir()
        (proj / "task.yml").write_text(TASK)
        r = a.cli("apply", "-f", "task.yml", "-y", "-d", cwd=proj, env={"HOME": str(home)})
        if r.returncode != 0:
            raise RuntimeError(f"apply failed: {r.stdout}{r.stderr}")
        c = a.client()
        run = wait_for(lambda: (x := c.run(RUN)) and x["status"] == "running" and x, 60)
        node = run["jobs"][0]["node"]
        if node != "b":
            raise RuntimeError(f"the job runs on {node!r}, not on b")
        r = a.cli("attach", RUN, "--config-only", env={"HOME": str(home)})
        if r.returncode != 0:
            raise RuntimeError(f"attach failed: {r.stdout}{r.stderr}")
        log(f"setup (2 agents, job on b, attach via a): {time.monotonic() - t0:.1f} s")

        src, back = root / "blob", root / "back"
        blob(src, args.size_mb)
        env = a.cli_env() | {"HOME": str(home)}
        # OpenSSH reads ~/.ssh/config from the passwd entry's home, not $HOME: name the file
        mesh = ["-F", str(home / ".ssh" / "config"), "-o", "BatchMode=yes"]
        ours = measure(
            "meshgpu", ["ssh", *mesh, RUN, "true"], mesh,
            f"{RUN}:up.bin", f"{RUN}:up.bin", src, back, args.runs, env,
        )  # fmt: skip
        with openssh_server(root) as sshd:
            direct = [
                "-F", "/dev/null", "-i", str(sshd.key), "-o", "IdentitiesOnly=yes",
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
            ]  # fmt: skip
            dest = root / "sshd-dest"
            dest.mkdir()
            theirs = measure(
                "sshd", ["ssh", *direct, "-p", str(sshd.port), "root@127.0.0.1", "true"],
                [*direct, "-P", str(sshd.port)],
                f"root@127.0.0.1:{dest}/up.bin", f"root@127.0.0.1:{dest}/up.bin",
                src, back, args.runs, None,
            )  # fmt: skip
    finally:
        signal.alarm(0)
        a.close()
        b.close()
        shutil.rmtree(root, ignore_errors=True)

    scp = min(ours["scp_up_mb_s"], ours["scp_down_mb_s"])
    sshd_scp = min(theirs["scp_up_mb_s"], theirs["scp_down_mb_s"])
    exec_ratio = round(ours["exec_p50_ms"] / theirs["exec_p50_ms"], 2)
    scp_ratio = round(scp / sshd_scp, 2)
    res: dict[str, Any] = {
        "ssh_exec_p50_ms": ours["exec_p50_ms"],
        "sshd_exec_p50_ms": theirs["exec_p50_ms"],
        "scp_mb_s": scp,
        "sshd_scp_mb_s": sshd_scp,
        "scp_up_mb_s": ours["scp_up_mb_s"],
        "scp_down_mb_s": ours["scp_down_mb_s"],
        "sshd_scp_up_mb_s": theirs["scp_up_mb_s"],
        "sshd_scp_down_mb_s": theirs["scp_down_mb_s"],
        "exec_ratio": exec_ratio,
        "scp_ratio": scp_ratio,
        "exec_target_ratio_max": EXEC_TARGET,
        "scp_target_ratio_min": SCP_TARGET,
        "exec_target_met": exec_ratio <= EXEC_TARGET,
        "scp_target_met": scp_ratio >= SCP_TARGET,
        "scp_byte_identical": ours["identical"] and theirs["identical"],
        "runs": args.runs,
        "size_mb": args.size_mb,
        "wall_s": round(time.monotonic() - t0, 1),
    }
    log(
        f"exec: {res['ssh_exec_p50_ms']} ms vs sshd {res['sshd_exec_p50_ms']} ms = "
        f"{exec_ratio}x (target <= {EXEC_TARGET}x: {'met' if res['exec_target_met'] else 'MISSED'})"
    )
    log(
        f"scp (lower of up/down): {scp} MB/s vs sshd {sshd_scp} MB/s = {scp_ratio}x "
        f"(target >= {SCP_TARGET}x: {'met' if res['scp_target_met'] else 'MISSED'})"
    )
    return res


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=20, help="ssh RUN true round trips (20)")
    p.add_argument("--size-mb", type=int, default=200, help="scp size in MB (200)")
    p.add_argument("--budget", type=int, default=170, help="abort after this many seconds")
    print(json.dumps(main(p.parse_args())))
