"""What an agent is started with (``meshgpu agent``'s options): one object, documented defaults."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from meshgpu.client.archive import DEFAULT_CODE_LIMIT
from meshgpu.mesh.gossip import GossipConfig
from meshgpu.mesh.membership import MembershipPolicy


@dataclass
class AgentSettings:
    data_dir: Path = field(default_factory=lambda: Path.home() / ".meshgpu")
    name: str = field(default_factory=socket.gethostname)
    bind: str = "127.0.0.1"
    api_port: int = 7480
    peer_port: int = 7481
    # The SSH server into this host's jobs (meshgpu/devenv/sshd.py); 0: any free port.
    ssh_port: int = 7482
    advertise: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # What the scheduler's ``spot_policy`` and ``max_price`` filters read of this host
    # (``--spot``, ``--price``): registered as its ``spot`` and ``price`` labels, over any
    # ``--labels`` of those names.
    spot: bool = False
    price: float | None = None  # USD per hour; None: not given (max_price runs do not come here)
    # dstack's blocks: split this host into N equal shares (or "auto"); None: GPU by GPU.
    blocks: int | Literal["auto"] | None = None
    fake_gpus: str | None = None
    # A GPU found unhealthy gets new work again after this many healthy checks in a row
    # (--gpu-healthy-checks; meshgpu/gpu/health.py). A check is one gossip telemetry sample.
    gpu_healthy_checks: int = 3
    code_limit: int = DEFAULT_CODE_LIMIT
    # What an archive may expand to (None: 16 x code_limit) and hold (docs/operations.md).
    code_expanded_limit: int | None = None
    code_max_files: int | None = None
    # Free space kept on the data dir's disk: writes are refused (507) below it.
    min_free: int = 64 << 20
    # Other members an upload is copied to before it is acknowledged (docs/operations.md).
    code_copies: int = 2
    tick_s: float = 0.1
    # Serve the REST API over TLS with this node's certificate from the cluster CA (off only
    # behind a proxy that terminates TLS).
    api_tls: bool = True
    write_client_profile: bool = True
    token: str | None = None
    join: list[str] = field(default_factory=list)
    mdns: bool = True
    membership: MembershipPolicy = field(default_factory=MembershipPolicy)
    gossip: GossipConfig = field(default_factory=GossipConfig.lan)
    keep_runs: int = 1000  # finished runs kept in the state (newest first) ...
    keep_runs_for_s: float = 7 * 86400  # ... and for at most this long
    # How often the leader applies that policy, and each host deletes the files it forgot
    # (a hidden option, --retention-interval-ms: tests shorten it).
    retention_interval_s: float = 10.0
    # Auto-stop of dev environments and utilization policies (meshgpu/devenv/monitor.py): how
    # often the jobs here are checked at least (hidden --autostop-interval-ms), and a factor on
    # utilization_policy's time_window (hidden --utilization-window-scale: tests shrink dstack's
    # five-minute minimum window to seconds).
    autostop_interval_s: float = 5.0
    # How often this host samples its GPUs and jobs into its metrics history
    # (meshgpu/ops/history.py; hidden --history-interval-ms: tests shorten it).
    history_interval_s: float = 10.0
    utilization_window_scale: float = 1.0
    # The ingress (meshgpu/services/ingress.py): <run>.<ingress_domain> routes to the run when
    # set; a request for a service with no ready replica is held this long (scale from zero).
    ingress_domain: str | None = None

    def node_labels(self) -> dict[str, str]:
        """The labels this host registers: ``labels``, with ``--spot``/``--price`` as the
        ``spot``/``price`` labels (``scheduler/filters.py``)."""
        out = dict(self.labels)
        if self.spot:
            out["spot"] = "true"
        if self.price is not None:
            out["price"] = f"{self.price:g}"
        return out

    activation_timeout_s: float = 300.0
    # Who serves the API port: "embedded" (the agent's own server, the default) or "nginx" (a
    # local nginx the agent drives proxies service traffic itself: meshgpu/services/nginx.py).
    data_plane: Literal["embedded", "nginx"] = "embedded"
    nginx_workers: int = 1
    # The process-job sandbox (meshgpu/runner/confine.py, docs/operations.md): jobs run as
    # this OS user (``meshgpu agent --job-user``, default meshgpu-job there; None or '' here:
    # as the agent's own user), their workspaces under ``workspace_dir`` (None: in the data
    # dir, reachable only by the agent's own user; ``meshgpu agent`` defaults it to
    # /var/lib/meshgpu/workspaces when it runs as root).
    job_user: str | None = None
    workspace_dir: Path | None = None
    # False (``meshgpu agent --no-sandbox``): no sandbox at all -- jobs run as the agent's user,
    # with no mount namespace and no cgroups (``user:`` and ``volumes:`` then fail the job).
    sandbox: bool = True
