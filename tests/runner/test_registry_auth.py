"""``registry_auth``: the runtime pulls with a per-job auth file (Docker's ``config.json`` with one
base64 entry for the image's registry), written 0600 in the job's record directory, handed to
``docker --config`` / ``podman run --authfile``, and removed when the job ends. No engine is
needed: the command line and the file are what is checked."""

from __future__ import annotations

import base64
import json
import stat
from pathlib import Path

import pytest

from meshgpu.runner import ProcessRunner
from meshgpu.runner.container import container_argv
from meshgpu.runner.executor import Executor
from meshgpu.runner.registry_auth import auth_config, image_registry, remove_auth, write_auth
from tests.runner.test_executor import _assign, _state, _submit


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("ubuntu", "docker.io"),
        ("ubuntu:22.04", "docker.io"),
        ("me/app:1", "docker.io"),
        ("ghcr.io/me/app:1", "ghcr.io"),
        ("nvcr.io/nvidia/pytorch:24.01-py3", "nvcr.io"),
        ("localhost:5000/app", "localhost:5000"),
        ("localhost/app", "localhost"),
        ("registry.local/a/b@sha256:" + "0" * 64, "registry.local"),
    ],
)
def test_the_registry_of_an_image(image: str, registry: str) -> None:
    assert image_registry(image) == registry


def test_the_auth_entry_is_base64_user_colon_password() -> None:
    doc = auth_config("ghcr.io/me/app", "me", "p@ss:word")
    assert doc == {"auths": {"ghcr.io": {"auth": base64.b64encode(b"me:p@ss:word").decode()}}}
    hub = auth_config("me/app", "me", "$${{ literal }}")
    assert set(hub["auths"]) == {"https://index.docker.io/v1/", "docker.io"}  # type: ignore[arg-type]
    entry = hub["auths"]["docker.io"]["auth"]  # type: ignore[index]
    assert base64.b64decode(entry) == b"me:${{ literal }}"  # an escaped reference, unescaped


def test_the_file_is_private_and_removed(tmp_path: Path) -> None:
    record = tmp_path / "jobs" / "j1"
    record.mkdir(parents=True)
    path = write_auth(record, "ghcr.io/me/app", ("me", "tok"))
    assert path == record / "registry-auth" / "config.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert (
        json.loads(path.read_text())["auths"]["ghcr.io"]["auth"]
        == base64.b64encode(b"me:tok").decode()
    )
    remove_auth(record)
    assert not path.parent.exists()
    remove_auth(record)  # nothing there: no error


def test_docker_and_podman_are_given_the_file() -> None:
    common = {
        "job_id": "j",
        "image": "ghcr.io/me/app",
        "commands": ["x"],
        "env": {},
        "work_dir": "/w",
    }
    docker = container_argv(
        "/usr/bin/docker", auth_file="/d/jobs/j/registry-auth/config.json", **common
    )  # type: ignore[arg-type]
    assert docker[:4] == ["/usr/bin/docker", "--config", "/d/jobs/j/registry-auth", "run"]
    podman = container_argv(
        "/usr/bin/podman", auth_file="/d/jobs/j/registry-auth/config.json", **common
    )  # type: ignore[arg-type]
    assert podman[:4] == [
        "/usr/bin/podman",
        "run",
        "--authfile",
        "/d/jobs/j/registry-auth/config.json",
    ]
    plain = container_argv("docker", **common)  # type: ignore[arg-type]
    assert plain[:2] == ["docker", "run"] and "--config" not in plain and "--authfile" not in plain


PRIVATE = """\
type: task
image: ghcr.io/me/private:1
commands: [python train.py]
registry_auth:
  username: me
  password: ghp_secret
"""


async def test_the_executor_writes_the_file_for_the_job_and_passes_it(tmp_path: Path) -> None:
    sm = _state()
    [job] = _submit(sm, "private", PRIVATE)
    _assign(sm, [(job, "n1", [0])])
    runner = ProcessRunner(tmp_path / "jobs", use_launcher=False)
    try:
        ex = Executor(
            "n1",
            sm,
            runner,
            propose=None,  # type: ignore[arg-type]
            code_dir=Path("/nonexistent"),
            gpu_vendor=lambda: "nvidia",
            container_runtime="/usr/bin/podman",
        )
        job = sm.jobs[job.job_id]
        run = sm.runs["private"]
        launch = ex._prepare(job, run.run_args, run.spec, job.epoch)  # noqa: SLF001
        path = runner.job_dir(job.job_id) / "registry-auth" / "config.json"
        assert launch.argv is not None
        assert launch.argv[launch.argv.index("--authfile") + 1] == str(path)
        assert "ghp_secret" not in " ".join(launch.argv)  # never on a command line
        assert "ghp_secret" not in json.dumps(launch.env)
        auth = json.loads(path.read_text())["auths"]["ghcr.io"]["auth"]
        assert base64.b64decode(auth) == b"me:ghp_secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # Without registry_auth: no file, no option.
        [other] = _submit(sm, "public", PRIVATE.split("registry_auth")[0])
        _assign(sm, [(other, "n2", [0])])
        other = sm.jobs[other.job_id]
        plain = ex._prepare(other, [], sm.runs["public"].spec, other.epoch)  # noqa: SLF001
        assert plain.argv is not None and "--authfile" not in plain.argv
        assert not (runner.job_dir(other.job_id) / "registry-auth").exists()
    finally:
        await runner.aclose()
