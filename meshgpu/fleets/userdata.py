"""The user data a backend instance boots with: a POSIX shell script (cloud-init runs a user
data that starts with ``#!`` as root at first boot; the ``local`` plugin runs the same script in
its namespace) that fetches the agent file, writes its environment (the single-use join token)
and starts it under the same supervisor an SSH fleet host gets (``ssh.install_script``): systemd
where it runs, else a ``setsid`` loop.

Where the agent file comes from: ``agent_path`` (a file the instance can read: the ``local``
plugin's instances share this machine's filesystem) or ``agent_url`` (the backend's
``agent_url`` setting: an HTTPS location the operator publishes ``dist/meshgpu.pyz`` at, fetched
with curl or, lacking curl, Python's urllib).
"""

from __future__ import annotations

import shlex

from meshgpu.fleets.ssh import install_script

DEFAULT_HOME = "/var/lib/meshgpu-agent"
MAX_USER_DATA = 16 << 10  # EC2 takes 16 KiB


def user_data(
    agent_args: list[str],
    env: dict[str, str],
    *,
    agent_path: str = "",
    agent_url: str = "",
) -> str:
    if not agent_path and not agent_url:
        raise ValueError("an instance needs the agent file: give agent_path or agent_url")
    fetch = (
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
    with_systemd = install_script("$D", agent_args, env, systemd=True, restart=False)
    without = install_script("$D", agent_args, env, systemd=False, restart=False)
    with_systemd, without = _unquote_home(with_systemd), _unquote_home(without)
    script = f"""#!/bin/sh
# meshgpu instance bootstrap (user data): fetch the agent file, start the agent with a
# single-use join token. Written by the fleet controller of the mesh that created this instance.
set -e
D="${{MESHGPU_HOME:-{DEFAULT_HOME}}}"
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
