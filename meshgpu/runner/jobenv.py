"""The job's environment and command line, as dstack's runner builds them (so configurations run
unchanged): ``MESHGPU_*`` and the same values under ``DSTACK_*``, GPU pinning through
``CUDA_VISIBLE_DEVICES``/``HIP_VISIBLE_DEVICES``/``ROCR_VISIBLE_DEVICES``, user ``env`` on top."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

_GPU_VARS = {
    "nvidia": ("CUDA_VISIBLE_DEVICES",),
    "amd": ("HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"),
}


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """Where this job sits in its gang: one entry per node, in job order (rank 0 = master)."""

    node_rank: int = 0
    nodes_ips: tuple[str, ...] = ("127.0.0.1",)
    gpus_per_node: tuple[int, ...] = (0,)

    @property
    def nodes_num(self) -> int:
        return len(self.nodes_ips)

    @property
    def master_ip(self) -> str:
        return self.nodes_ips[0]

    def hostfile(self) -> str:
        """MPI hostfile: ``<ip> slots=<gpus>`` for GPU nodes, ``<ip>`` for CPU nodes."""
        return "".join(
            f"{ip} slots={g}\n" if g else f"{ip}\n"
            for ip, g in zip(self.nodes_ips, self.gpus_per_node, strict=True)
        )


@dataclass(frozen=True, slots=True)
class JobIdentity:
    run_name: str
    run_id: str
    job_id: str
    repo_id: str = "local"


@dataclass(frozen=True, slots=True)
class JobEnvInputs:
    identity: JobIdentity
    cluster: ClusterInfo = field(default_factory=ClusterInfo)
    gpu_indices: tuple[int, ...] = ()
    gpu_vendor: str | None = None
    working_dir: str = "."
    hostfile_path: str = ""
    # Services only: the replica's number (``replica_num``, unique in the run) and the port
    # the app must listen on (``MESHGPU_/DSTACK_REPLICA_NUM``, ``MESHGPU_SERVICE_PORT``).
    replica_num: int | None = None
    service_port: int | None = None
    # Where the repo is (``DSTACK_REPO_DIR``; None: the run has none) and the job's venv
    # (``python:``; ``DSTACK_VENV_DIR``, activated through ``PATH`` and ``VIRTUAL_ENV``).
    repo_dir: str | None = None
    venv_dir: str | None = None


def job_environment(
    inputs: JobEnvInputs, user_env: Mapping[str, str], base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """``base`` (the agent's own PATH, HOME, ...) < meshgpu's variables < the user's ``env``."""
    c, ident = inputs.cluster, inputs.identity
    values = {
        "RUN_NAME": ident.run_name,
        "RUN_ID": ident.run_id,
        "JOB_ID": ident.job_id,
        "REPO_ID": ident.repo_id,
        "NODE_RANK": str(c.node_rank),
        "NODES_NUM": str(c.nodes_num),
        "NODES_IPS": "\n".join(c.nodes_ips),
        "MASTER_NODE_IP": c.master_ip,
        "GPUS_PER_NODE": str(len(inputs.gpu_indices)),
        "GPUS_NUM": str(sum(c.gpus_per_node)),
        "MPI_HOSTFILE": inputs.hostfile_path,
        "WORKING_DIR": inputs.working_dir,
    }
    if inputs.replica_num is not None:
        values["REPLICA_NUM"] = str(inputs.replica_num)
    if inputs.repo_dir is not None:
        values["REPO_DIR"] = inputs.repo_dir
    env = dict(base or {})
    if inputs.venv_dir is not None:
        values["VENV_DIR"] = inputs.venv_dir
        env["VIRTUAL_ENV"] = inputs.venv_dir
        env["PATH"] = f"{inputs.venv_dir}/bin:{env.get('PATH') or '/usr/local/bin:/usr/bin:/bin'}"
    for key, value in values.items():
        env["MESHGPU_" + key] = value
        env["DSTACK_" + key] = value
    if inputs.service_port is not None:
        env["MESHGPU_SERVICE_PORT"] = str(inputs.service_port)
    visible = ",".join(str(i) for i in inputs.gpu_indices)
    vendor_vars = _GPU_VARS.get(inputs.gpu_vendor or "", ())
    for var in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES"):
        env.pop(var, None)
    if inputs.gpu_vendor is None or not inputs.gpu_indices:
        # No GPUs granted: hide them all, so a CPU job cannot grab a GPU another job holds.
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        for var in vendor_vars:
            env[var] = visible
    env.update(user_env)
    return env


def join_commands(commands: Sequence[str]) -> str:
    """dstack's join: ``a && b``; a command that ends with ``&`` runs in the background as
    ``{ cmd & }`` so that the ``&&`` chain goes on."""
    parts = []
    for cmd in commands:
        text = cmd.strip()
        parts.append(f"{{ {text} }}" if text.endswith("&") and not text.endswith("&&") else text)
    return " && ".join(parts)


def command_argv(shell: str, commands: Sequence[str]) -> list[str]:
    return [shell, "-c", join_commands(commands)]
