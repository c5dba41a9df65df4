"""The way into a job through any node: which SSH server serves a job (the one on the host that
runs it, from its node record) and a TCP connection to it. The API (``meshgpu/api/tunnel.py``)
relays a client's WebSocket over that connection; ``meshgpu ssh-proxy`` is the client's end.

Only the selection is decided here; authentication (the user's key, may this key reach this
project) is the SSH server's, on the host: the tunnel carries SSH bytes it cannot read."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from meshgpu.errors import Conflict, Unavailable, job_not_found, run_not_found
from meshgpu.mesh.address import is_unspecified
from meshgpu.state import JobStatus

if TYPE_CHECKING:
    from meshgpu.state import JobRecord, NodeRecord, StateMachine

CONNECT_TIMEOUT_S = 5.0
_NUMBERED = re.compile(r"^(?P<run>.+)-(?P<job>\d{1,6})$")
# The states in which a job is on its way to running: asked again shortly, it may be reachable.
_STARTING = (JobStatus.SUBMITTED, JobStatus.PROVISIONING, JobStatus.PULLING)


@dataclass(frozen=True, slots=True)
class TunnelTarget:
    job: JobRecord
    node: NodeRecord
    host: str
    port: int


def select_job(state: StateMachine, name: str, job: int | None = None) -> JobRecord:
    """The job ``name`` names: ``RUN`` (job 0, or ``job``), ``RUN-N`` (job N; a run that is
    itself named ``RUN-N`` wins) or a job id. The SSH user name is the same selector, read in the
    same order by the SSH server (``meshgpu/devenv/target.py``)."""
    run = state.runs.get(name)
    if run is None and job is None:
        m = _NUMBERED.match(name)
        if m and m["run"] in state.runs:
            run, job = state.runs[m["run"]], int(m["job"])
        elif (found := state.jobs.get(name)) is not None:
            return found
    if run is None:
        raise run_not_found(name)
    jobs = state.run_jobs(run)
    num = 0 if job is None else job
    if not 0 <= num < len(jobs):
        raise job_not_found(run.run_name, len(jobs))
    return jobs[num]


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` → (host, port); ValueError otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {address!r}")
    return host.strip("[]"), int(port)


class Tunnels:
    """Resolve a selector to the SSH server serving it, and connect to that server."""

    def __init__(self, state: StateMachine, node_id: str) -> None:
        self.state, self.node_id = state, node_id
        # (caller, project) -> may attach there (the policy's, set by the API); None: anyone
        # with a valid token (tests that build tunnels alone).
        self.may_attach: Callable[[Any, str], bool] | None = None

    def target(self, name: str, job: int | None = None, who: Any = None) -> TunnelTarget:
        found = select_job(self.state, name, job)
        run = self.state.runs.get(found.run_name)
        if (
            who is not None
            and self.may_attach is not None
            and (run is None or not self.may_attach(who, run.project))
        ):
            raise run_not_found(name)  # another project's run is no run at all to the caller
        label = f"{found.run_name} job {found.job_num}"
        if found.status.is_finished():
            reason = found.termination_reason or found.status.value
            raise Conflict(
                "job not running",
                f"{label} ended ({reason}); nothing to connect to",
                "job_finished",
            )
        if found.status in _STARTING or found.node_id is None:
            raise Conflict(
                "job not running",
                f"{label} is {found.status.value}, not running yet; try again when "
                "meshgpu ps shows it running",
                "job_not_running",
            )
        if found.status is JobStatus.TERMINATING:
            raise Conflict("job not running", f"{label} is stopping", "job_finished")
        node = self.state.nodes.get(found.node_id)
        if node is None or not node.ssh_address:
            host = node.name if node is not None else found.node_id
            raise Unavailable(
                "no SSH server",
                f"host {host}, which runs {label}, serves no SSH (an agent without --ssh-port?)",
                "no_ssh_server",
            )
        try:
            host, port = split_address(node.ssh_address)
        except ValueError as e:
            raise Unavailable("no SSH server", str(e), "no_ssh_server") from None
        if is_unspecified(host):
            host = "127.0.0.1" if node.node_id == self.node_id else node.internal_ip
        return TunnelTarget(found, node, host, port)

    async def connect(self, target: TunnelTarget) -> trio.SocketStream:
        """A TCP connection to the target's SSH server (TCP_NODELAY: trio sets it)."""
        try:
            with trio.fail_after(CONNECT_TIMEOUT_S):
                return await trio.open_tcp_stream(target.host, target.port)
        except (OSError, trio.TooSlowError) as e:
            why = "no answer" if isinstance(e, trio.TooSlowError) else str(e) or type(e).__name__
            raise Unavailable(
                "SSH server unreachable",
                f"cannot reach the SSH server of {target.node.name} at "
                f"{target.host}:{target.port} from this node: {why}",
                "ssh_unreachable",
            ) from None


__all__ = ["TunnelTarget", "Tunnels", "select_job", "split_address"]
