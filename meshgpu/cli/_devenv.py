"""Dev environments in the CLI: the IDE links ``apply`` prints, the idle time ``ps -v`` shows,
and the hand-over from ``apply`` to ``meshgpu attach``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from meshgpu.client import Client

# dstack's links (``ide: vscode|cursor|windsurf|zed``): the IDE's Remote-SSH opens ``ssh RUN``
# (the host entry ``meshgpu attach`` writes) at the job's working directory, and installs its
# own server there: nothing is downloaded in the job for the link to work.
_IDE_LINKS = {
    "vscode": ("VS Code", "vscode://vscode-remote/ssh-remote+{host}{path}"),
    "cursor": ("Cursor", "cursor://vscode-remote/ssh-remote+{host}{path}"),
    "windsurf": ("Windsurf", "windsurf://vscode-remote/ssh-remote+{host}{path}"),
    "zed": ("Zed", "zed://ssh/{host}{path}"),
}


def ide_link(ide: str | None, host: str, working_dir: str | None) -> tuple[str, str] | None:
    """(IDE name, link) opening ``working_dir`` over ``ssh host``; None without an IDE."""
    if ide not in _IDE_LINKS:
        return None
    name, template = _IDE_LINKS[ide]
    path = working_dir or "/"
    if not path.startswith("/"):
        path = "/" + path
    return name, template.format(host=host, path=path)


def connect_lines(run: dict[str, Any]) -> list[str]:
    """How to reach a running dev environment: its IDE link and ``ssh RUN``."""
    name = run["name"]
    jobs = run.get("jobs") or [{}]
    dev = run.get("dev_environment") or {}
    lines = []
    link = ide_link(dev.get("ide"), name, jobs[0].get("working_dir"))
    if link is not None:
        lines.append(f"To open in {link[0]}, use this link:\n  {link[1]}")
    lines.append(f"To connect over SSH: ssh {name}   (the host entry comes from meshgpu attach)")
    if dev.get("inactivity_duration"):
        lines.append(
            f"It stops after {human_secs(dev['inactivity_duration'])} with no SSH session "
            "(inactivity_duration)."
        )
    return lines


def human_secs(secs: float) -> str:
    secs = int(secs)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h{(secs % 3600) // 60:02d}m"


def activity_text(job: dict[str, Any], run: dict[str, Any]) -> str:
    """``ps -v``'s word on a running job's SSH activity: attached, or idle for how long (and
    when a dev environment stops for it); '' when there is nothing to say."""
    if job.get("status") != "running":
        return ""
    if job.get("sessions"):
        n = job["sessions"]
        return f"attached ({n} session{'s' if n != 1 else ''})"
    idle = job.get("inactivity_secs")
    limit = (run.get("dev_environment") or {}).get("inactivity_duration")
    if idle is None or (limit is None and run.get("type") != "dev-environment"):
        return ""
    text = f"idle {human_secs(idle)}"
    if limit:
        text += f" of {human_secs(limit)}"
    return text


def wait_running(c: Client, name: str, say: Callable[[str], None]) -> dict[str, Any]:
    """Poll until the run's first job runs (or the run ends); says each new status."""
    last = None
    while True:
        run = c.run(name)
        first = (run.get("jobs") or [{}])[0]
        if first.get("status") == "running" or run["status"] in ("done", "failed", "terminated"):
            return run
        why = first.get("why_pending") or ""
        status = run.get("status_message") or run["status"]
        if (status, why) != last:
            say(f"{name}: {status}" + (f" ({why})" if why else ""))
            last = (status, why)
        time.sleep(0.2)


def attach_hook() -> Callable[[Client, str], int] | None:
    """``meshgpu attach``'s entry point when this build has it (meshgpu/cli/_attach.py:
    ``attach_run(client, name) -> exit code``: SSH config, port forwards, logs until Ctrl-C)."""
    try:
        from meshgpu.cli._attach import attach_run
    except ImportError:
        return None
    return attach_run
