"""The user data a backend instance boots with: a POSIX shell script (cloud-init runs a user
data that starts with ``#!`` as root at first boot; the ``local`` plugin runs the same script in
its namespace) that fetches the agent file, writes its environment (the single-use join token)
and starts it under the same supervisor an SSH fleet host gets (``ssh.install_script``): systemd
where it runs, else a ``setsid`` loop.

Where the agent file comes from, by default: the mesh itself (``download``): the script asks
the members' APIs in turn for ``GET /api/v1/agent/meshgpu.pyz`` with a download secret of its
own (``X-Meshgpu-Download``; its sha256 is in the instance's record, good until it joins), over
TLS that trusts only the cluster CA written into the script (as the join pins the CA by the
fingerprint in the token: ``mesh/join.py`` ``pinned_context``), with Python's urllib (the host
needs Python >= 3.11 for the agent anyway). Otherwise ``agent_url`` (the backend's
``agent_url`` setting: an HTTPS location the operator publishes ``dist/meshgpu.pyz`` at, fetched
with curl or, lacking curl, Python's urllib), or ``agent_path`` (a file the instance can read).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from meshgpu.fleets.ssh import install_script

DEFAULT_HOME = "/var/lib/meshgpu-agent"
MAX_USER_DATA = 16 << 10  # EC2 takes 16 KiB


@dataclass(frozen=True)
class Download:
    """The agent file from the mesh's members (``GET /api/v1/agent/meshgpu.pyz``)."""

    urls: tuple[str, ...]  # the members' API URLs
    secret: str  # X-Meshgpu-Download
    ca_pem: str  # the cluster CA: the only one trusted


DOWNLOAD_PATH = "/api/v1/agent/meshgpu.pyz"
MAX_FILE = 1 << 30
# Python, not curl: curl cannot trust a CA while skipping the host name check (a member's
# certificate proves membership, whatever address it is reached at: ``pinned_context``).
_FETCH = """\
import ssl, sys, time, urllib.request
CA, URLS, KEY, PATH, LIMIT = {ca!r}, {urls!r}, {key!r}, {path!r}, {limit}
ctx = ssl.create_default_context(cadata=CA)
ctx.check_hostname = False
errors = []
for attempt in range(40):
    for url in URLS:
        try:
            req = urllib.request.Request(url + PATH, headers={{"X-Meshgpu-Download": KEY}})
            tls = ctx if url.startswith("https://") else None
            with urllib.request.urlopen(req, context=tls, timeout=60) as r, open(sys.argv[1], "wb") as out:
                size, got = int(r.headers.get("Content-Length") or 0), 0
                while True:
                    chunk = r.read(1 << 20)
                    if not chunk:
                        break
                    got += len(chunk)
                    if got > LIMIT:
                        raise ValueError("over %d bytes" % LIMIT)
                    out.write(chunk)
            if size and got != size:
                raise ValueError("got %d of %d bytes" % (got, size))
            sys.exit(0)
        except Exception as e:
            errors.append("%s: %s" % (url, e))
            if getattr(e, "code", 0) == 403:
                sys.exit("meshgpu: the mesh refused the download: " + str(e))
    time.sleep(min(15, 1 + attempt))
sys.exit("meshgpu: cannot download the agent file: " + "; ".join(errors[-len(URLS):]))
"""


def user_data(
    agent_args: list[str],
    env: dict[str, str],
    *,
    fleet: str,
    agent_path: str = "",
    agent_url: str = "",
    download: Download | None = None,
) -> str:
    if not agent_path and not agent_url and download is None:
        raise ValueError("an instance needs the agent file: give download, agent_url or agent_path")
    if download is not None and not agent_url and not agent_path:
        code = _FETCH.format(
            ca=download.ca_pem,
            urls=list(download.urls),
            key=download.secret,
            path=DOWNLOAD_PATH,
            limit=MAX_FILE,
        )
        fetch = "python3 - \"$D/meshgpu.pyz.part\" <<'MESHGPU_FETCH'\n" + code + "MESHGPU_FETCH"
    else:
        fetch = _fetch_file(agent_path, agent_url)
    return _script(fleet, agent_args, env, fetch)


def _fetch_file(agent_path: str, agent_url: str) -> str:
    return (
        f'cp {shlex.quote(agent_path)} "$D/meshgpu.pyz.part"'
        if agent_path
        else (
            "if command -v curl >/dev/null 2>&1; then "
            f'curl -fsSL --retry 5 -o "$D/meshgpu.pyz.part" {shlex.quote(agent_url)}; '
            "else python3 -c 'import sys, urllib.request; "
            "urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' "
            f'{shlex.quote(agent_url)} "$D/meshgpu.pyz.part"; fi'
        )
    )


def _script(fleet: str, agent_args: list[str], env: dict[str, str], fetch: str) -> str:
    # The fleet's own unit and directory, as on an SSH fleet host (``ssh.install_script``).
    with_systemd = install_script(fleet, "$D", agent_args, env, systemd=True, restart=False)
    without = install_script(fleet, "$D", agent_args, env, systemd=False, restart=False)
    with_systemd, without = _unquote_home(with_systemd), _unquote_home(without)
    script = f"""#!/bin/sh
# meshgpu instance bootstrap (user data): fetch the agent file, start the agent with a
# single-use join token. Written by the fleet controller of the mesh that created this instance.
set -e
D="${{MESHGPU_HOME:-{DEFAULT_HOME}}}"/{shlex.quote(fleet)}
mkdir -p "$D" && chmod 700 "$D"
if [ ! -f "$D/meshgpu.pyz" ]; then
  {fetch}
  mv "$D/meshgpu.pyz.part" "$D/meshgpu.pyz"
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \\
   && [ -z "${{MESHGPU_NO_SYSTEMD:-}}" ]; then
{with_systemd}
else
{without}
fi
"""
    if len(script.encode()) > MAX_USER_DATA:
        raise ValueError(f"the user data is {len(script)} bytes: clouds take {MAX_USER_DATA}")
    return script


def _unquote_home(script: str) -> str:
    """``install_script`` writes a fixed home; here it is ``$D``, chosen when the script runs:
    run.sh finds it from its own path, the systemd unit gets it expanded."""
    marker = "installed it.\nD='$D'"
    script = script.replace(marker, 'installed it.\nD=$(cd "$(dirname "$0")" && pwd)')
    script = script.replace("D='$D'", 'D="$D"').replace("'$D'", '"$D"')
    return script.replace("<<'MESHGPU_EOF'\n[Unit]", "<<MESHGPU_EOF\n[Unit]")
