""" "Bare hosts" for SSH fleet tests: a network namespace (``tests/e2e/netns.py``) running only
Debian's OpenSSH ``sshd``, started here on the namespace's address with a generated host key and
an authorized test key. The namespaces share this machine's filesystem, so each host's install
directory is its own (``SetEnv MESHGPU_HOME=...`` in its sshd configuration: what the fleet
controller installs goes there, as it would go to ``~/.meshgpu-agent`` on a real host)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.netns import Host

SSHD = "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


def available() -> str:
    for path in (SSHD, SFTP_SERVER):
        if not os.path.exists(path):
            return f"{path} is missing (apt-get install openssh-server)"
    if shutil.which("ssh-keygen") is None:
        return "ssh-keygen is missing (apt-get install openssh-client)"
    return ""


def keypair(path: Path) -> Path:
    """A fresh ed25519 key at ``path`` (and ``path.pub``)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "meshgpu-test", "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return path


@dataclass
class BareHost:
    host: Host
    root: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def install_dir(self) -> Path:
        return self.root / "install"

    def start(self, authorized: list[Path]) -> BareHost:
        self.root.mkdir(parents=True, exist_ok=True)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        hostkey = self.root / "host_ed25519"
        if not hostkey.exists():
            keypair(hostkey)
        (self.root / "authorized_keys").write_text(
            "".join(p.with_suffix(".pub").read_text() for p in authorized)
        )
        cfg = self.root / "sshd_config"
        cfg.write_text(
            "\n".join(
                [
                    f"ListenAddress {self.host.ip}",
                    "Port 22",
                    f"HostKey {hostkey}",
                    f"PidFile {self.root / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    f"SetEnv MESHGPU_HOME={self.install_dir}",
                    f"Subsystem sftp {SFTP_SERVER}",
                    "",
                ]
            )
        )
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - kept open by the child
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.host.ns, SSHD, "-D", "-e", "-f", str(cfg)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["ip", "netns", "exec", self.host.ns, "ss", "-ltn"],
                capture_output=True,
                text=True,
                check=False,
            )
            if f"{self.host.ip}:22" in r.stdout:
                return self
            time.sleep(0.05)
        raise RuntimeError(
            f"sshd did not start in {self.host.ns}: {(self.root / 'sshd.log').read_text()}"
        )

    def processes(self) -> list[str]:
        """The command lines of every process in this host's namespace."""
        r = subprocess.run(
            ["ip", "netns", "pids", self.host.ns], capture_output=True, text=True, check=False
        )
        out = []
        for pid in r.stdout.split():
            try:
                out.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
            except OSError:
                continue
        return out

    def stop(self) -> None:
        """Stop sshd and anything still running in the namespace."""
        r = subprocess.run(
            ["ip", "netns", "pids", self.host.ns], capture_output=True, text=True, check=False
        )
        for pid in r.stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        if self.proc is not None:
            self.proc.wait(timeout=10)
