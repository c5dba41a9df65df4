from pathlib import Path

from tests.devenv._sshd import needs_openssh, sshd


@needs_openssh
async def test_exec(tmp_path: Path) -> None:
    async with sshd(tmp_path) as env:
        r = await env.ssh("echo $MESHGPU_RUN_NAME; pwd")
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode().split() == ["dev", str(env.work)]
