"""What the fleet controller does on a host, over SSH (asyncssh, on the asyncio loop of
``meshgpu/devenv/aio.py``): check it, install the agent file and start the agent, or stop it and
remove what was installed. Every remote step is a POSIX ``sh`` script; nothing but ``python3`` is
needed on the host.

Where things go on the host (docs/fleets.md): one directory per fleet, ``FLEET`` under
``$MESHGPU_HOME`` when the SSH session sets it, else under ``~/.meshgpu-agent`` of the SSH user --
the agent file (``meshgpu.pyz``), where it unpacks (``shiv/``), the agent's data dir (``data/``),
its environment (``agent.env``, 0600: the fleet's env and the join token), the supervisor
(``run.sh``), its log (``agent.log``); and, where systemd runs and the user is root, the unit
``/etc/systemd/system/meshgpu-agent-FLEET.service``. Nothing is shared between two fleets, so
one host can serve fleets of two meshes (given distinct agent ports).
"""

from __future__ import annotations

import asyncio
import hashlib
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

CONNECT_TIMEOUT_S = 10.0
UNIT_DIR = "/etc/systemd/system"
MIN_PYTHON = (3, 11)
MIN_FREE_MB = 512
# The agent's dependencies whose compiled extension modules are built for one CPython minor
# version and have no pure-Python fallback (docs/fleets.md, "The agent file": cryptography's is
# abi3, msgpack, PyYAML and zeroconf fall back to pure Python).
COMPILED_DEPS = "pydantic-core, cffi"


class HostError(RuntimeError):
    """A host cannot be used (yet); the message is the reason ``meshgpu fleet ls`` shows."""


@dataclass
class Target:
    hostname: str
    port: int
    user: str
    key: str  # the private key (OpenSSH or PEM text)
    proxy: Target | None = None


@dataclass
class HostFacts:
    home: str
    python: str
    python_version: str
    free_mb: int
    systemd: bool
    uid: int
    gpus: list[str] = field(default_factory=list)
    addresses: list[str] = field(default_factory=list)
    pyz_sha: str = ""
    running: bool = False


def _reason(t: Target, e: BaseException) -> str:
    where = f"{t.user}@{t.hostname}:{t.port}"
    if isinstance(e, asyncssh.PermissionDenied):
        return (
            f"{where} refused the fleet's key (permission denied): add its public key to "
            f"~{t.user}/.ssh/authorized_keys on the host, or fix identity_file"
        )
    if isinstance(e, asyncssh.HostKeyNotVerifiable):
        return f"{where}: {e}"
    if isinstance(e, TimeoutError | asyncio.TimeoutError):
        return f"cannot reach {where}: no answer within {CONNECT_TIMEOUT_S:g} s"
    if isinstance(e, ConnectionRefusedError):
        return f"cannot reach {where}: connection refused (is sshd running on port {t.port}?)"
    if isinstance(e, OSError):
        return f"cannot reach {where}: {e.strerror or e}"
    if isinstance(e, asyncssh.Error):
        return f"{where}: SSH error: {e.reason if hasattr(e, 'reason') else e}"
    return f"{where}: {type(e).__name__}: {e}"


async def connect(t: Target, host_key: str = "") -> tuple[asyncssh.SSHClientConnection, str]:
    """A connection to ``t`` (through its proxy when given) and the fingerprint of the host key
    it showed; ``host_key`` (seen before) must match when given."""
    tunnel = None
    try:
        if t.proxy is not None:
            tunnel, _ = await connect(t.proxy)
        conn = await asyncio.wait_for(
            asyncssh.connect(
                t.hostname,
                port=t.port,
                username=t.user,
                client_keys=[asyncssh.import_private_key(t.key)],
                known_hosts=None,  # trust on first use: the fingerprint is kept in the state
                tunnel=tunnel,
                agent_path=None,
                config=[],
                connect_timeout=CONNECT_TIMEOUT_S,
            ),
            CONNECT_TIMEOUT_S + 1,
        )
    except HostError:
        raise
    except (OSError, asyncssh.Error, TimeoutError) as e:
        if tunnel is not None:
            tunnel.close()
        raise HostError(_reason(t, e)) from None
    server_key = conn.get_server_host_key()
    fp = server_key.get_fingerprint() if server_key is not None else ""
    if host_key and fp != host_key:
        conn.close()
        raise HostError(
            f"{t.hostname}: its SSH host key changed ({fp}, was {host_key}): if the host was "
            "reinstalled, delete it from the fleet and add it again"
        )
    return conn, fp


def unit_name(fleet: str) -> str:
    """The systemd unit of ``fleet``'s agent (fleet names are ``[a-z0-9-]``: safe as is)."""
    return f"meshgpu-agent-{fleet}"


def dir_script(fleet: str) -> str:
    """Sets ``B`` (where every fleet's directory is) and ``D`` (this fleet's)."""
    return f'B="${{MESHGPU_HOME:-$HOME/.meshgpu-agent}}"; D="$B"/{shlex.quote(fleet)}'


def facts_script(fleet: str) -> str:
    """One ``sh`` run that reports everything the controller decides on (``parse_facts``)."""
    return dir_script(fleet) + CHECK.replace("@UNIT@", unit_name(fleet))


CHECK = r"""
echo "home=$D"
PY=$(command -v python3 || true)
echo "python=$PY"
[ -n "$PY" ] && echo "pyver=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'
fi
if command -v amd-smi >/dev/null 2>&1; then
  amd-smi static --asic 2>/dev/null | sed -n 's/^ *MARKET_NAME: */gpu=/p'
fi
mkdir -p "$D" && chmod 700 "$B" "$D"
echo "free_kb=$(df -Pk "$D" | awk 'NR==2 {print $4}')"
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
   && [ -z "${MESHGPU_NO_SYSTEMD:-}" ]; then echo systemd=1; fi
echo "uid=$(id -u)"
[ -f "$D/meshgpu.pyz" ] && echo "pyz_sha=$(sha256sum "$D/meshgpu.pyz" | cut -d' ' -f1)"
if [ -f "$D/supervisor.pid" ] && kill -0 "$(cat "$D/supervisor.pid")" 2>/dev/null; then
  echo running=1
fi
if [ -d /run/systemd/system ] && systemctl is-active --quiet @UNIT@ 2>/dev/null; then
  echo running=1
fi
(ip -4 -o addr show 2>/dev/null || true) | awk '{print "addr=" $4}'
"""


def parse_facts(text: str) -> HostFacts:
    kv: dict[str, list[str]] = {}
    for line in text.splitlines():
        k, eq, v = line.partition("=")
        if eq:
            kv.setdefault(k.strip(), []).append(v.strip())

    def one(k: str, default: str = "") -> str:
        return kv.get(k, [default])[0]

    return HostFacts(
        home=one("home"),
        python=one("python"),
        python_version=one("pyver"),
        free_mb=int(one("free_kb", "0") or 0) // 1024,
        systemd=one("systemd") == "1",
        uid=int(one("uid", "-1") or -1),
        gpus=kv.get("gpu", []),
        addresses=[a.split("/")[0] for a in kv.get("addr", [])],
        pyz_sha=one("pyz_sha"),
        running=one("running") == "1",
    )


def check_facts(facts: HostFacts, pyz_python: str) -> None:
    """Why the host cannot run the agent, as a HostError; nothing when it can."""
    if not facts.python:
        raise HostError("no python3 on the host: install Python >= 3.11 (apt-get install python3)")
    try:
        ver = tuple(int(x) for x in facts.python_version.split("."))
    except ValueError:
        raise HostError(
            f"cannot tell the host's Python version ({facts.python_version!r})"
        ) from None
    if ver < MIN_PYTHON:
        raise HostError(
            f"the host's python3 is {facts.python_version}: the agent needs Python >= 3.11"
        )
    if pyz_python and facts.python_version != pyz_python:
        raise HostError(
            f"the host's python3 is {facts.python_version} and the agent file is built for "
            f"Python {pyz_python}: its compiled dependencies ({COMPILED_DEPS}) load only "
            f"in Python {pyz_python}. Either install python{pyz_python} on the host as "
            f"python3 (e.g. apt-get install python{pyz_python}), or build the agent file "
            f"with Python {facts.python_version} (scripts/build on a machine with it) and "
            "set MESHGPU_AGENT_PYZ=/path/to/that/meshgpu.pyz for the members' agents"
        )
    if facts.free_mb < MIN_FREE_MB:
        raise HostError(
            f"only {facts.free_mb} MB free under {facts.home}: the agent needs {MIN_FREE_MB} MB"
        )


async def run(conn: asyncssh.SSHClientConnection, script: str, timeout: float = 60) -> str:
    r = await asyncio.wait_for(conn.run("sh -s", input=script, check=False), timeout)
    if r.exit_status != 0:
        raise HostError(
            f"a step on the host failed (exit {r.exit_status}): "
            f"{str(r.stderr or r.stdout).strip()[-500:]}"
        )
    return str(r.stdout)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def agent_command(args: list[str]) -> str:
    return " ".join(shlex.quote(a) for a in args)


def unit_text(fleet: str, home: str) -> str:
    """The systemd unit that supervises ``fleet``'s agent installed in ``home``."""
    return f"""[Unit]
Description=meshgpu agent (SSH fleet {fleet})
After=network-online.target

[Service]
Environment=MESHGPU_SUPERVISED_BY_SYSTEMD=1
ExecStart=/bin/sh {home}/run.sh
Restart=always
RestartSec=2
KillMode=control-group

[Install]
WantedBy=multi-user.target
"""


def install_script(
    fleet: str,
    home: str,
    agent_args: list[str],
    env: dict[str, str],
    systemd: bool,
    restart: bool,
    unit_dir: str = UNIT_DIR,
) -> str:
    """Write the environment and the supervisor, and (re)start ``fleet``'s agent."""
    d = shlex.quote(home)
    env_lines = "\n".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items()))
    cmd = agent_command(agent_args)
    unit = unit_name(fleet)
    unit_file = shlex.quote(f"{unit_dir}/{unit}.service")
    run_sh = f"""#!/bin/sh
# The meshgpu agent of fleet {fleet}, written by the fleet controller of the mesh that installed it.
D={d}
set -a; . "$D/agent.env"; set +a
export SHIV_ROOT="$D/shiv"
cd "$D"
# agent.env was written under umask 077; what the agent creates outside this (0700) directory
# -- the jobs' workspaces under /var/lib/meshgpu as root -- must stay traversable by the job user
umask 022
while :; do
  python3 "$D/meshgpu.pyz" {cmd} >>"$D/agent.log" 2>&1
  [ -f "$D/stop" ] && exit 0
  [ -n "$MESHGPU_SUPERVISED_BY_SYSTEMD" ] && exit 1
  sleep 2
done
"""
    parts = [
        f"D={d}",
        'cd "$D"',
        "umask 077",
        f"cat > agent.env.tmp <<'MESHGPU_EOF'\n{env_lines}\nMESHGPU_EOF",
        "mv agent.env.tmp agent.env",
        f"cat > run.sh.tmp <<'MESHGPU_EOF'\n{run_sh}MESHGPU_EOF",
        "mv run.sh.tmp run.sh",
        "rm -f stop",
    ]
    if systemd:
        parts += [
            f"cat > {unit_file} <<'MESHGPU_EOF'\n{unit_text(fleet, home)}MESHGPU_EOF",
            f"chmod 644 {unit_file}",
            "systemctl daemon-reload",
            f"systemctl enable {unit} >/dev/null 2>&1 || true",
            f"systemctl {'restart' if restart else 'start'} {unit}",
        ]
    else:
        parts += [
            'if [ -f supervisor.pid ] && kill -0 "$(cat supervisor.pid)" 2>/dev/null; then',
            f"  if [ {int(restart)} = 1 ]; then",
            '    kill -TERM -- -"$(cat supervisor.pid)" 2>/dev/null || true',
            '    i=0; while kill -0 "$(cat supervisor.pid)" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done',
            '    kill -KILL -- -"$(cat supervisor.pid)" 2>/dev/null || true',
            "  else exit 0; fi",
            "fi",
            # its own session: the agent outlives this SSH connection, and the whole group stops
            # at once (kill -- -PID)
            'setsid sh "$D/run.sh" </dev/null >/dev/null 2>&1 &',
            "echo $! > supervisor.pid",
        ]
    return "\n".join(parts) + "\n"


def uninstall_script(fleet: str, unit_dir: str = UNIT_DIR) -> str:
    """Stop ``fleet``'s agent and everything it started, and remove what was installed (the
    directory of every fleet goes too once it is empty)."""
    unit = unit_name(fleet)
    unit_file = shlex.quote(f"{unit_dir}/{unit}.service")
    return (
        dir_script(fleet)
        + rf"""
[ -d "$D" ] || {{ rmdir "$B" 2>/dev/null; exit 0; }}
touch "$D/stop"
if [ -f {unit_file} ] && grep -qF "$D/run.sh" {unit_file}; then
  systemctl disable --now {unit} >/dev/null 2>&1 || true
  rm -f {unit_file}
  systemctl daemon-reload || true
fi
if [ -f "$D/supervisor.pid" ]; then
  P=$(cat "$D/supervisor.pid")
  kill -TERM -- -"$P" 2>/dev/null || true
  i=0; while kill -0 "$P" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.2; i=$((i+1)); done
  kill -KILL -- -"$P" 2>/dev/null || true
fi
kill_sh() {{
  for p in /proc/[0-9]*; do
    pid=${{p#/proc/}}
    [ "$pid" = "$$" ] && continue
    cwd=$(readlink "$p/cwd" 2>/dev/null) || continue
    case "$cwd/" in "$D"/*) kill -KILL "$pid" 2>/dev/null || true; continue;; esac
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -qF "$D/"; then kill -KILL "$pid" 2>/dev/null || true; fi
  done
}}
# what the agent started (jobs run in their own sessions, under its data dir): one pass over
# /proc in python3 (a fork or three per process in sh takes seconds on a busy host), sh if not
python3 - "$D" <<'MESHGPU_PY' 2>/dev/null || kill_sh
import os, signal, sys
d = sys.argv[1].rstrip("/") + "/"
skip = {{os.getpid(), os.getppid()}}
for pid in os.listdir("/proc"):
    if not pid.isdigit() or int(pid) in skip:
        continue
    try:
        hit = (os.readlink(f"/proc/{{pid}}/cwd") + "/").startswith(d)
        if not hit:
            with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                hit = d.encode() in f.read().replace(b"\0", b" ")
        if hit:
            os.kill(int(pid), signal.SIGKILL)
    except OSError:
        continue
MESHGPU_PY
rm -rf "$D"
rmdir "$B" 2>/dev/null || true
"""
    )


async def log_tail(conn: asyncssh.SSHClientConnection, fleet: str, lines: int = 15) -> str:
    r = await conn.run(
        dir_script(fleet) + f'\ntail -n {lines} "$D/agent.log" 2>/dev/null', check=False
    )
    return str(r.stdout or "").strip()


async def put_file(conn: asyncssh.SSHClientConnection, local: Path, remote: str) -> None:
    async with conn.start_sftp_client() as sftp:
        await sftp.put(str(local), remote + ".part")
        await sftp.posix_rename(remote + ".part", remote)
