"""``GET /metrics``: this node in the Prometheus text format (``prometheus_client`` renders it).

Every node serves its own view; scrape each one. Three kinds of series:

* this node's Raft state (term, commit and applied index, role, leader) and this host's GPUs,
  blocks and jobs, labelled ``node``;
* the replicated picture (runs, jobs and nodes by status, GPUs in the mesh), the same on every
  node up to replication lag -- take ``max`` over instances, or scrape one node for them;
* one sample of this host's GPU telemetry from its provider (NVML, amdsmi or fake GPUs) and the
  CPU time and memory of the jobs running here.

Nothing here is cumulative in meshgpu itself, so a registry is built per scrape from a snapshot:
no background collector, no global state.
"""

from __future__ import annotations

import importlib.metadata
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from meshgpu.runner.usage import GroupUsage
from meshgpu.state import JobStatus, RunStatus, StateMachine

# Every name here is a classic one, so the page is the 0.0.4 text format that every Prometheus
# reads (newer clients label theirs 1.0.0, which older servers do not know).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROLES = ("follower", "pre_candidate", "candidate", "leader")
NODE_STATUSES = ("active", "draining", "unreachable", "dead")
MIB = 1 << 20


def _version() -> str:
    try:
        return importlib.metadata.version("meshgpu")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - run from a checkout
        return "unknown"


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def node_families(
    *,
    node: str,
    node_id: str,
    cluster_id: str,
    raft: dict[str, Any],
    state: StateMachine,
    telemetry: list[dict[str, Any]],
    usage: dict[str, GroupUsage],
) -> list[Any]:
    """The metric families of one scrape. ``raft`` is ``RaftNode.status()``, ``telemetry`` this
    host's GPU samples (``GPUTelemetry`` as dicts), ``usage`` job id -> its process group's use."""
    out: list[Any] = []
    info = InfoMetricFamily("meshgpu", "This agent", labels=["node", "node_id", "cluster_id"])
    info.add_metric([node, node_id, cluster_id], {"version": _version()})
    out.append(info)

    # -- this node's Raft state --------------------------------------------------------------
    for name, key, doc in (
        ("meshgpu_raft_term", "term", "Current Raft term"),
        ("meshgpu_raft_commit_index", "commit", "Highest log index known committed"),
        ("meshgpu_raft_applied_index", "applied", "Highest log index applied to the state"),
        ("meshgpu_raft_last_index", "last_index", "Last index in this node's log"),
        ("meshgpu_raft_leader_id", "leader", "Raft id of the leader this node follows (0: none)"),
    ):
        g = _gauge(name, doc, ["node"])
        g.add_metric([node], float(raft.get(key) or 0))
        out.append(g)
    role = _gauge("meshgpu_raft_role", "1 for this node's Raft role", ["node", "role"])
    for r in ROLES:
        role.add_metric([node, r], 1.0 if raft.get("role") == r else 0.0)
    out.append(role)
    members = _gauge("meshgpu_raft_members", "Members of the Raft configuration", ["kind"])
    members.add_metric(["voter"], float(len(raft.get("voters") or ())))
    members.add_metric(["learner"], float(len(raft.get("learners") or ())))
    out.append(members)

    # -- the replicated picture ------------------------------------------------------------------
    runs = Counter(r.status.value for r in state.runs.values())
    g = _gauge("meshgpu_runs", "Runs in the replicated state, by status", ["status"])
    for s in RunStatus:
        g.add_metric([s.value], float(runs.get(s.value, 0)))
    out.append(g)
    jobs = Counter(j.status.value for j in state.jobs.values())
    g = _gauge("meshgpu_jobs", "Jobs in the replicated state, by status", ["status"])
    for s in JobStatus:
        g.add_metric([s.value], float(jobs.get(s.value, 0)))
    out.append(g)
    g = _gauge("meshgpu_jobs_waiting", "Jobs in the scheduler's queue")
    g.add_metric([], float(state.waiting_count))
    out.append(g)
    statuses = Counter(n.status for n in state.nodes.values())
    g = _gauge("meshgpu_nodes", "Hosts of the mesh, by status", ["status"])
    for s in sorted(set(NODE_STATUSES) | set(statuses)):
        g.add_metric([s], float(statuses.get(s, 0)))
    out.append(g)
    total = busy_all = 0
    for n in state.nodes.values():
        if n.status == "dead":
            continue
        total += sum(1 for x in n.gpus if x.healthy)
        busy_all += len(state.gpus_in_use(n.node_id))
    g = _gauge("meshgpu_cluster_gpus", "Healthy GPUs on hosts that are not dead")
    g.add_metric([], float(total))
    out.append(g)
    g = _gauge("meshgpu_cluster_gpus_busy", "GPUs held by jobs, mesh-wide")
    g.add_metric([], float(busy_all))
    out.append(g)

    # -- this host ---------------------------------------------------------------------------
    me = state.nodes.get(node_id)
    held = state.gpus_in_use(node_id)
    gpus = me.gpus if me is not None else []
    for name, value, doc in (
        ("meshgpu_node_gpus", len(gpus), "GPUs this host registered"),
        ("meshgpu_node_gpus_busy", len(held), "GPUs of this host held by jobs"),
        (
            "meshgpu_node_gpus_unhealthy",
            sum(1 for x in gpus if not x.healthy),
            "GPUs of this host marked unhealthy",
        ),
    ):
        g = _gauge(name, doc, ["node"])
        g.add_metric([node], float(value))
        out.append(g)
    blocks = me.block_count() if me is not None else None
    if blocks is not None:
        g = _gauge("meshgpu_node_blocks", "Blocks this host is split into", ["node"])
        g.add_metric([node], float(blocks))
        out.append(g)
        g = _gauge("meshgpu_node_blocks_busy", "Blocks of this host held by jobs", ["node"])
        g.add_metric([node], float(state.blocks_in_use(node_id)))
        out.append(g)
    out.extend(_gpu_families(node, gpus, held, telemetry))
    out.extend(_job_families(node, state, node_id, usage))
    return out


def _gpu_families(
    node: str, gpus: list[Any], held: set[int], telemetry: list[dict[str, Any]]
) -> Iterator[Any]:
    labels = ["node", "gpu", "uuid", "name"]
    by_index = {t["index"]: t for t in telemetry}
    static = {g.index: g for g in gpus}
    util = _gauge("meshgpu_gpu_utilization_ratio", "GPU utilization, 0..1", labels)
    mem_used = _gauge("meshgpu_gpu_memory_used_bytes", "GPU memory in use", labels)
    mem_total = _gauge("meshgpu_gpu_memory_total_bytes", "GPU memory", labels)
    temp = _gauge("meshgpu_gpu_temperature_celsius", "GPU temperature", labels)
    power = _gauge("meshgpu_gpu_power_watts", "GPU power draw", labels)
    healthy = _gauge("meshgpu_gpu_healthy", "1 if the GPU is healthy", labels)
    busy = _gauge("meshgpu_gpu_busy", "1 if a job holds the GPU", labels)
    ecc = CounterMetricFamily(
        "meshgpu_gpu_ecc_errors", "ECC errors the driver counts", labels=[*labels, "kind"]
    )
    for index in sorted(set(static) | set(by_index)):
        g = static.get(index)
        t = by_index.get(index, {})
        lv = [node, str(index), g.uuid if g else "", g.name if g else ""]
        if t.get("utilization_pct") is not None:
            util.add_metric(lv, t["utilization_pct"] / 100)
        if t.get("memory_used_mib") is not None:
            mem_used.add_metric(lv, float(t["memory_used_mib"] * MIB))
        if g is not None:
            mem_total.add_metric(lv, float(g.memory_mib * MIB))
        if t.get("temperature_c") is not None:
            temp.add_metric(lv, float(t["temperature_c"]))
        if t.get("power_w") is not None:
            power.add_metric(lv, float(t["power_w"]))
        ok = t.get("healthy", True) and (g is None or g.healthy)
        healthy.add_metric(lv, 1.0 if ok else 0.0)
        busy.add_metric(lv, 1.0 if index in held else 0.0)
        for kind in ("corrected", "uncorrected"):
            if t.get(f"ecc_{kind}") is not None:
                ecc.add_metric([*lv, kind], float(t[f"ecc_{kind}"]))
    yield from (util, mem_used, mem_total, temp, power, healthy, busy, ecc)


def _job_families(
    node: str, state: StateMachine, node_id: str, usage: dict[str, GroupUsage]
) -> Iterable[Any]:
    labels = ["node", "run", "job"]
    cpu = CounterMetricFamily(
        "meshgpu_job_cpu_seconds", "CPU time of a job's processes", labels=labels
    )
    mem = _gauge("meshgpu_job_memory_bytes", "Resident memory of a job's processes", labels)
    procs = _gauge("meshgpu_job_processes", "Live processes of a job", labels)
    gpu = _gauge("meshgpu_job_gpu", "1 for each GPU a job on this host holds", [*labels, "gpu"])
    for j in sorted(state.jobs_on_node(node_id), key=lambda j: (j.run_name, j.job_num)):
        lv = [node, j.run_name, str(j.job_num)]
        for i in j.gpu_indices:
            gpu.add_metric([*lv, str(i)], 1.0)
        u = usage.get(j.job_id)
        if u is not None:
            cpu.add_metric(lv, u.cpu_seconds)
            mem.add_metric(lv, float(u.memory_bytes))
            procs.add_metric(lv, float(u.processes))
    return (cpu, mem, procs, gpu)


class _Snapshot(Collector):
    def __init__(self, families: list[Any]) -> None:
        self.families = families

    def collect(self) -> Iterable[Any]:
        return self.families


def render(families: list[Any]) -> bytes:
    """The text exposition format (version 0.0.4) of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(families))
    return generate_latest(registry)


__all__ = ["CONTENT_TYPE", "node_families", "render"]
