"""``meshgpu agent``: run this host's agent in the foreground."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import socket
from pathlib import Path
from typing import Annotated, Literal

import trio
import typer

from meshgpu.cli._common import err, fail, positive_duration
from meshgpu.datadir import private_dir


def _labels(text: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        k, eq, v = part.partition("=")
        if not eq or not k.strip():
            raise fail(f"--labels takes k=v,k=v; got {part!r}")
        out[k.strip()] = v.strip()
    return out


def _blocks(text: str | None) -> int | Literal["auto"] | None:
    """``--blocks N|auto`` as dstack's fleets take it: a positive whole number or ``auto``."""
    if text is None:
        return None
    value = text.strip().lower()
    if value == "auto":
        return "auto"
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise fail(
        f"--blocks takes a positive whole number (e.g. --blocks 4: four equal shares of this "
        f"host's GPUs, CPUs and memory) or auto (as many as the GPU and CPU counts both divide into); got {text!r}"
    )


def _price(value: float | None) -> float | None:
    """``--price USD_PER_HOUR``: what this host costs, 0 or more."""
    if value is None:
        return None
    if not math.isfinite(value) or value < 0:
        raise fail(
            f"--price takes this host's price in USD per hour, 0 or more (e.g. --price 1.5); "
            f"got {value}"
        )
    return value


def agent(
    data_dir: Annotated[Path, typer.Option("--data-dir", help="State, logs, jobs")] = Path.home()
    / ".meshgpu",
    name: Annotated[str, typer.Option("--name", help="Node name")] = socket.gethostname(),
    bind: Annotated[
        str, typer.Option("--bind", help="Address to listen on (0.0.0.0 or :: for all)")
    ] = "127.0.0.1",
    api_port: Annotated[int, typer.Option("--api-port")] = 7480,
    peer_port: Annotated[int, typer.Option("--peer-port")] = 7481,
    ssh_port: Annotated[
        int,
        typer.Option("--ssh-port", help="The SSH server into this host's jobs (0: any free port)"),
    ] = 7482,
    advertise: Annotated[
        str | None, typer.Option("--advertise", help="Address peers and jobs use")
    ] = None,
    labels: Annotated[str | None, typer.Option("--labels", help="k=v,k=v (e.g. zone=a)")] = None,
    spot: Annotated[
        bool,
        typer.Option(
            "--spot",
            envvar="MESHGPU_SPOT",
            help="This host is a spot/preemptible instance (label spot=true): runs with "
            "spot_policy spot or auto may use it, on-demand ones (the default) do not",
        ),
    ] = False,
    price: Annotated[
        float | None,
        typer.Option(
            "--price",
            envvar="MESHGPU_PRICE",
            metavar="USD_PER_HOUR",
            help="What this host costs per hour (label price): runs with max_price are placed "
            "only on hosts that say, at or below it",
        ),
    ] = None,
    blocks: Annotated[
        str | None,
        typer.Option(
            "--blocks",
            envvar="MESHGPU_BLOCKS",
            help="Split this host into N equal blocks of GPUs/CPUs/memory, or auto (dstack's blocks)",
        ),
    ] = None,
    fake_gpus: Annotated[
        str | None, typer.Option("--fake-gpus", envvar="MESHGPU_FAKE_GPUS", help="e.g. 8xH100:80GB")
    ] = None,
    gpu_healthy_checks: Annotated[
        int,
        typer.Option(
            "--gpu-healthy-checks",
            envvar="MESHGPU_GPU_HEALTHY_CHECKS",
            help="Healthy checks in a row (one every 2 s) before a GPU found unhealthy "
            "gets new work again",
        ),
    ] = 3,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="MESHGPU_JOIN_TOKEN", help="Join token of an existing mesh"),
    ] = None,
    join: Annotated[str | None, typer.Option("--join", help="host:port of a member")] = None,
    no_mdns: Annotated[bool, typer.Option("--no-mdns", help="Do not use mDNS discovery")] = False,
    code_limit_mb: Annotated[
        int,
        typer.Option("--code-limit-mb", envvar="MESHGPU_CODE_LIMIT_MB", help="Largest code upload"),
    ] = 64,
    code_copies: Annotated[
        int,
        typer.Option(
            "--code-copies",
            envvar="MESHGPU_CODE_COPIES",
            help="Other members an upload is copied to before it is acknowledged",
        ),
    ] = 2,
    code_expanded_limit_mb: Annotated[
        int | None,
        typer.Option(
            "--code-expanded-limit-mb",
            envvar="MESHGPU_CODE_EXPANDED_LIMIT_MB",
            help="Most an uploaded archive may expand to (default: 16 x --code-limit-mb)",
        ),
    ] = None,
    code_max_files: Annotated[
        int,
        typer.Option(
            "--code-max-files",
            envvar="MESHGPU_CODE_MAX_FILES",
            help="Most files and directories an uploaded archive may hold",
        ),
    ] = 100_000,
    min_free_mb: Annotated[
        int,
        typer.Option(
            "--min-free-mb",
            envvar="MESHGPU_MIN_FREE_MB",
            help="Free space kept on the data dir's disk: writes are refused (507) below it",
        ),
    ] = 64,
    tick_ms: Annotated[
        float, typer.Option("--tick-ms", help="Raft tick (election timeout: 10 ticks)")
    ] = 100.0,
    dead_grace: Annotated[
        str, typer.Option("--dead-grace", help="Silence before a host is declared dead")
    ] = "30s",
    keep_runs: Annotated[
        int,
        typer.Option(
            "--keep-runs",
            envvar="MESHGPU_KEEP_RUNS",
            help="Finished runs kept (newest first); older ones are forgotten, logs included",
        ),
    ] = 1000,
    keep_runs_for: Annotated[
        str,
        typer.Option(
            "--keep-runs-for",
            envvar="MESHGPU_KEEP_RUNS_FOR",
            help="Finished runs older than this are forgotten (e.g. 7d)",
        ),
    ] = "7d",
    retention_interval_ms: Annotated[
        float,
        typer.Option(
            "--retention-interval-ms",
            hidden=True,
            help="How often the retention policy is applied (tests shorten it)",
        ),
    ] = 10_000.0,
    history_interval_ms: Annotated[
        float,
        typer.Option(
            "--history-interval-ms",
            hidden=True,
            help="How often this host samples its GPUs and jobs into the metrics history "
            "(tests shorten it)",
        ),
    ] = 10_000.0,
    autostop_interval_ms: Annotated[
        float,
        typer.Option(
            "--autostop-interval-ms",
            hidden=True,
            help="How often auto-stop (inactivity_duration, utilization_policy) checks the "
            "jobs here at least (tests shorten it)",
        ),
    ] = 5_000.0,
    utilization_window_scale: Annotated[
        float,
        typer.Option(
            "--utilization-window-scale",
            hidden=True,
            help="Multiply utilization_policy time windows by this (tests: 0.02 makes 5m 6s)",
        ),
    ] = 1.0,
    gossip: Annotated[
        str,
        typer.Option(
            "--gossip",
            help="Gossip timing: lan (default), wan or local, optionally with knob=value "
            "overrides, e.g. local,probe_interval=0.5",
        ),
    ] = "lan",
    api_tls: Annotated[
        str,
        typer.Option(
            "--api-tls",
            help="on (default): serve the API over TLS with a certificate from the cluster CA; "
            "off: plain HTTP, only behind a proxy that terminates TLS",
        ),
    ] = "on",
    ingress_domain: Annotated[
        str | None,
        typer.Option(
            "--ingress-domain",
            help="Route <run>.DOMAIN to the service <run> of project main (point a wildcard "
            "DNS record *.DOMAIN at the agents)",
        ),
    ] = None,
    activation_timeout: Annotated[
        str,
        typer.Option(
            "--activation-timeout",
            help="How long a request for a service with no ready replica waits for one "
            "(scale from zero), e.g. 300 or 5m",
        ),
    ] = "300",
    data_plane: Annotated[
        str,
        typer.Option(
            "--data-plane",
            help="Who serves the API port: embedded (default: the agent itself) or nginx (a "
            "local nginx the agent drives proxies service traffic; needs the nginx binary)",
        ),
    ] = "embedded",
    nginx_workers: Annotated[
        int,
        typer.Option("--nginx-workers", help="nginx worker processes (--data-plane nginx)"),
    ] = 1,
    job_user: Annotated[
        str,
        typer.Option(
            "--job-user",
            help="OS user process jobs run as (created when root and missing; '' or the "
            "agent's own user: no switch)",
        ),
    ] = "meshgpu-job",
    workspace_dir: Annotated[
        Path | None,
        typer.Option(
            "--workspace-dir",
            help="Where jobs' workspaces go; must be traversable by the job user "
            "(default /var/lib/meshgpu/workspaces as root, else in the data dir)",
        ),
    ] = None,
    no_sandbox: Annotated[
        bool,
        typer.Option(
            "--no-sandbox",
            help="Run process jobs with no sandbox: as the agent's user, no mount namespace, no "
            "cgroups (docs/operations.md says what that gives up)",
        ),
    ] = False,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Run the agent: the first one creates a mesh; it serves the API and runs jobs."""
    from consensus.storage import CorruptStorageError, StorageFull
    from meshgpu.agent import Agent, AgentSettings
    from meshgpu.config import parse_duration
    from meshgpu.datadir import DataDirError
    from meshgpu.gpu import FakeSpecError
    from meshgpu.mesh.gossip import ConfigError as GossipConfigError
    from meshgpu.mesh.gossip import GossipConfig
    from meshgpu.mesh.join import JoinError
    from meshgpu.mesh.membership import MembershipPolicy
    from meshgpu.security import TokenError
    from meshgpu.services.nginx import NginxError

    if token:
        try:
            from meshgpu.security import JoinToken

            JoinToken.parse(token)
        except TokenError as e:
            raise fail(str(e)) from None
    if api_tls not in ("on", "off"):
        raise fail(f"--api-tls takes on or off, not {api_tls!r}")
    if data_plane not in ("embedded", "nginx"):
        raise fail(f"--data-plane takes embedded or nginx, not {data_plane!r}")
    if not 1 <= nginx_workers <= 256:
        raise fail(f"--nginx-workers must be 1..256, not {nginx_workers}")
    if data_plane == "nginx":
        from meshgpu.services.nginx import MISSING, find_nginx

        if find_nginx() is None:
            raise fail(MISSING)
    if keep_runs < 0:
        raise fail(f"--keep-runs must be 0 or more, not {keep_runs}")
    if not retention_interval_ms > 0:
        raise fail(f"--retention-interval-ms must be positive, not {retention_interval_ms}")
    if not 10 <= history_interval_ms <= 3_600_000:
        raise fail(f"--history-interval-ms must be 10..3600000, not {history_interval_ms}")
    if not autostop_interval_ms > 0 or not utilization_window_scale > 0:
        raise fail("--autostop-interval-ms and --utilization-window-scale must be positive")
    for flag, value in (
        ("--code-expanded-limit-mb", code_expanded_limit_mb),
        ("--code-max-files", code_max_files),
    ):
        if value is not None and value <= 0:
            raise fail(f"{flag} must be a positive number, not {value}")
    if min_free_mb < 0:
        raise fail(f"--min-free-mb must be 0 or more, not {min_free_mb}")
    if not 1 <= gpu_healthy_checks <= 10_000:
        raise fail(
            f"--gpu-healthy-checks must be 1..10000, not {gpu_healthy_checks} "
            "(1: a GPU is back as soon as one check finds it healthy)"
        )
    price = _price(price)
    _check_data_dir(data_dir)
    keep_runs_for_s = positive_duration("--keep-runs-for", keep_runs_for, "12h or 7d")
    activation_timeout_s = positive_duration(
        "--activation-timeout", activation_timeout, "300 or 5m"
    )
    if ingress_domain is not None:
        ingress_domain = ingress_domain.strip().strip(".").lower()
        labels_ok = all(
            lbl and len(lbl) <= 63 and lbl.replace("-", "").isalnum() and lbl.isascii()
            for lbl in ingress_domain.split(".")
        )
        if not ingress_domain or not labels_ok:
            raise fail(
                f"--ingress-domain {ingress_domain!r} is not a DNS name (e.g. svc.example.com)"
            )
    try:
        gossip_config = GossipConfig.from_spec(gossip)
    except GossipConfigError as e:
        raise fail(f"--gossip: {e}") from None
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    settings = AgentSettings(
        data_dir=data_dir,
        name=name,
        bind=bind,
        api_port=api_port,
        peer_port=peer_port,
        ssh_port=ssh_port,
        advertise=advertise,
        labels=_labels(labels),
        spot=spot,
        price=price,
        blocks=_blocks(blocks),
        fake_gpus=fake_gpus,
        gpu_healthy_checks=gpu_healthy_checks,
        code_limit=code_limit_mb << 20,
        code_expanded_limit=code_expanded_limit_mb << 20 if code_expanded_limit_mb else None,
        code_max_files=code_max_files,
        min_free=min_free_mb << 20,
        code_copies=max(code_copies, 0),
        token=token,
        join=[j.strip() for j in (join or "").split(",") if j.strip()],
        mdns=not no_mdns,
        tick_s=tick_ms / 1000,
        membership=MembershipPolicy(dead_grace_s=float(parse_duration(dead_grace))),
        gossip=gossip_config,
        keep_runs=keep_runs,
        keep_runs_for_s=float(keep_runs_for_s),
        retention_interval_s=retention_interval_ms / 1000,
        autostop_interval_s=autostop_interval_ms / 1000,
        history_interval_s=history_interval_ms / 1000,
        utilization_window_scale=utilization_window_scale,
        api_tls=api_tls == "on",
        ingress_domain=ingress_domain,
        activation_timeout_s=float(activation_timeout_s),
        data_plane="nginx" if data_plane == "nginx" else "embedded",
        nginx_workers=nginx_workers,
        job_user=None if no_sandbox else (job_user or None),
        workspace_dir=workspace_dir,
        sandbox=not no_sandbox,
    )
    if settings.workspace_dir is None and os.geteuid() == 0:
        from meshgpu.runner.confine import DEFAULT_WORKSPACE_DIR

        settings.workspace_dir = DEFAULT_WORKSPACE_DIR
    if settings.workspace_dir is not None and settings.job_user:
        bad = _untraversable(settings.workspace_dir)
        if bad is not None:
            raise fail(
                f"--workspace-dir {settings.workspace_dir}: {bad} is not traversable by other "
                "users (chmod o+x it, or pick another directory)"
            )
    try:
        ag = Agent(settings)
    except (FakeSpecError, DataDirError) as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"cannot start the agent: {e}") from None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(ag.run)
            err.print(
                f"meshgpu agent {ag.node_name} serving {url}; client profile: {data_dir / 'client.toml'}"
            )
            if ag.join_token:
                err.print(
                    f"join token for other hosts:\n  meshgpu agent --token {ag.join_token} --join {ag.peer_address}"
                )
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    break
            nursery.cancel_scope.cancel()
        await ag.aclose()

    try:
        trio.run(main)
    except KeyboardInterrupt:
        err.print("agent stopped; running jobs keep running and are re-adopted at the next start")
    except BaseException as e:  # noqa: BLE001 - user errors arrive wrapped in exception groups
        leaf = _leaf(e)
        if isinstance(leaf, JoinError):
            raise fail(f"cannot join the mesh: {leaf}") from None
        if isinstance(leaf, CorruptStorageError):
            raise fail(str(leaf)) from None
        if isinstance(leaf, StorageFull):
            raise fail(f"cannot start the agent: {leaf}") from None
        if isinstance(leaf, OSError | NginxError):
            raise fail(f"cannot start the agent: {leaf}") from None
        if isinstance(leaf, KeyboardInterrupt):
            err.print(
                "agent stopped; running jobs keep running and are re-adopted at the next start"
            )
            return
        raise


def _untraversable(path: Path) -> Path | None:
    """The first existing directory above ``path`` that others cannot traverse (None: all can)."""
    for p in reversed(path.absolute().parents):
        try:
            if not p.stat().st_mode & 0o001:
                return p
        except OSError:
            return None
    return None


def _check_data_dir(path: Path) -> None:
    """The data dir must be a directory this process can write (made if missing): otherwise one
    line that says so, not a traceback from wherever the first write happens to be."""
    if path.exists() and not path.is_dir():
        raise fail(f"--data-dir {path} is not a directory; give a directory (made if missing)")
    probe = path / f".meshgpu-write-test-{os.getpid()}"
    try:
        private_dir(path)  # made 0700 if missing: a fresh data dir is private from the start
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)  # written, then the disk filled: not left behind
        raise fail(
            f"--data-dir {path} is not writable ({e.strerror or e}); give a directory this "
            "user can write, on a disk with free space"
        ) from None


def _leaf(exc: BaseException) -> BaseException:
    """The one real error inside nested exception groups (trio wraps errors from nurseries)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
