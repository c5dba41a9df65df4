"""The agent's SSH server (in-process, loopback) against OpenSSH's own sshd on the same machine:
``ssh HOST true`` round trip (median) and a scp up and down (MB env var, default 200 MB).
Prints one JSON line. Needs root, openssh-server and openssh-client. The through-a-non-hosting-
node figure is ``scripts/bench ssh`` (the tunnel's); this one isolates the server.

    .venv/bin/python scripts/bench_sshd.py
"""

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.devenv._sshd import run, sshd  # noqa: E402

SIZE = int(os.environ.get("MB", "200")) << 20
N = int(os.environ.get("N", "20"))


def start_openssh(tmp: Path, pub: str) -> tuple[subprocess.Popen, int, str]:
    from meshgpu.testing import free_port

    port = free_port()
    hk = tmp / "sshd_hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(hk)], check=True)
    ak = tmp / "authorized_keys"
    ak.write_text(pub)
    os.chmod(ak, 0o600)
    cfg = tmp / "sshd_config"
    cfg.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {hk}
AuthorizedKeysFile {ak}
PermitRootLogin yes
PasswordAuthentication no
UsePAM no
StrictModes no
PidFile {tmp}/sshd.pid
Subsystem sftp /usr/lib/openssh/sftp-server
""")
    os.makedirs("/run/sshd", exist_ok=True)
    with open(tmp / "sshd.log", "wb") as logf:
        p = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)], stderr=logf)
    time.sleep(0.5)
    return p, port, Path(str(hk) + ".pub").read_text()


async def timeit(argv, n=N):
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        r = await run(argv)
        ts.append(time.perf_counter() - t)
        assert r.returncode == 0, r.stderr
    return statistics.median(ts) * 1000


async def main():
    tmp = Path(tempfile.mkdtemp())
    async with sshd(tmp) as env:
        pub = env.key.with_suffix(".pub").read_text()
        proc, sport, shk = start_openssh(tmp, pub)
        known2 = tmp / "known2"
        known2.write_text(f"[127.0.0.1]:{sport} {shk}")
        opts2 = [
            "-F",
            "/dev/null",
            "-i",
            str(env.key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            f"UserKnownHostsFile={known2}",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "BatchMode=yes",
        ]
        try:
            big = tmp / "big"
            big.write_bytes(os.urandom(SIZE))
            res = {}
            res["ours_exec_ms"] = await timeit(env.ssh_argv("dev", "true"))
            res["sshd_exec_ms"] = await timeit(
                ["ssh", *opts2, "-p", str(sport), "root@127.0.0.1", "true"]
            )
            for name, opts, port, user, dest in [
                ("ours", env.ssh_opts(), env.port, "dev", str(env.work)),
                ("sshd", opts2, sport, "root", str(tmp / "sshd_dest")),
            ]:
                os.makedirs(dest, exist_ok=True)
                t = time.perf_counter()
                r = await run(
                    ["scp", *opts, "-P", str(port), str(big), f"{user}@127.0.0.1:{dest}/big"],
                    timeout=300,
                )
                assert r.returncode == 0, r.stderr
                up = SIZE / (time.perf_counter() - t) / 1e6
                t = time.perf_counter()
                r = await run(
                    [
                        "scp",
                        *opts,
                        "-P",
                        str(port),
                        f"{user}@127.0.0.1:{dest}/big",
                        str(tmp / "back"),
                    ],
                    timeout=300,
                )
                assert r.returncode == 0, r.stderr
                down = SIZE / (time.perf_counter() - t) / 1e6
                assert (tmp / "back").read_bytes() == big.read_bytes()
                res[f"{name}_scp_up_mb_s"] = round(up)
                res[f"{name}_scp_down_mb_s"] = round(down)
            print(json.dumps(res))
        finally:
            proc.terminate()


if __name__ == "__main__":
    trio.run(main)
