"""``image:`` jobs through docker or podman, when the host has a working engine.

The container runs under the same supervisor as a process job (``shim.py``): its command line is
the runtime's ``run`` in the foreground, so output, exit status, stop (SIGTERM is proxied into the
container by the runtime, SIGKILL after the grace period) and re-adoption work the same way.
Host networking, as dstack uses for multi-node jobs; the job's working directory (with the user's
code) is mounted at ``/workflow``. ``registry_auth`` reaches the runtime as a per-job auth file
(``registry_auth.py``): ``docker --config DIR`` or ``podman run --authfile FILE``.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence

from meshgpu.runner.jobenv import join_commands

_HOST_ONLY = {"PATH", "HOME", "LANG", "USER", "TMPDIR"}


def detect_runtime(timeout: float = 5.0) -> str | None:
    """``docker`` or ``podman`` if its engine answers; a bare client does not count."""
    for name in ("docker", "podman"):
        path = shutil.which(name)
        if not path:
            continue
        try:
            ok = (
                subprocess.run(
                    [path, "info"], capture_output=True, timeout=timeout, check=False
                ).returncode
                == 0
            )
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return path
    return None


def container_argv(
    runtime: str,
    *,
    job_id: str,
    image: str,
    commands: Sequence[str],
    env: Mapping[str, str],
    work_dir: str,
    gpu_indices: Sequence[int] = (),
    gpu_vendor: str | None = None,
    shell: str | None = None,
    working_dir: str | None = None,
    shm_size_gb: float | None = None,
    privileged: bool = False,
    user: str | None = None,
    entrypoint: str | None = None,
    auth_file: str | None = None,
    volumes: Sequence[tuple[str, str]] = (),
    pass_env: Sequence[str] = (),
) -> list[str]:
    """``auth_file``: the job's registry credentials (a ``config.json``) to pull ``image``.
    ``pass_env``: variables given by name only (``-e NAME``): the runtime takes their values
    from its own environment -- the job's secrets, which must not be in its command line (nor
    so in ``job.json``)."""
    podman = runtime.rsplit("/", 1)[-1] == "podman"
    argv = [runtime]
    if auth_file and not podman:
        argv += ["--config", auth_file.rsplit("/", 1)[0]]  # docker reads DIR/config.json
    argv += ["run"]
    if auth_file and podman:
        argv += ["--authfile", auth_file]
    argv += [
        "--rm",
        "--init",
        "--name",
        f"meshgpu-{job_id}",
        "--network",
        "host",
        "-v",
        f"{work_dir}:/workflow",
        "-w",
        working_dir or "/workflow",
    ]
    if gpu_indices and gpu_vendor == "nvidia":
        ids = ",".join(str(i) for i in gpu_indices)
        argv += ["--device", f"nvidia.com/gpu={ids}"] if podman else ["--gpus", f'"device={ids}"']
    elif gpu_indices and gpu_vendor == "amd":
        argv += ["--device", "/dev/kfd", "--device", "/dev/dri", "--group-add", "video"]
    if shm_size_gb:
        argv += ["--shm-size", f"{int(shm_size_gb * 1024)}m"]
    for src, dst in volumes:  # instance volumes: the host path bind-mounted in the container
        argv += ["-v", f"{src}:{dst}"]
    if privileged:
        argv.append("--privileged")
    if user:
        argv += ["--user", user]
    args: list[str] = []
    if entrypoint:
        # dstack: the entrypoint's words, then the commands as its arguments (not a shell).
        head, *args = shlex.split(entrypoint) or [""]
        argv += ["--entrypoint", head]
    for key, value in sorted(env.items()):
        if key not in _HOST_ONLY:
            argv += ["-e", f"{key}={value}"]
    for key in pass_env:
        argv += ["-e", key]
    argv.append(image)
    if entrypoint:
        argv += [*args, *commands]
    elif commands:
        argv += [shell or "/bin/sh", "-c", join_commands(commands)]
    return argv
