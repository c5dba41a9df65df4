"""Does a host satisfy a job's ``resources``? Which GPUs should the job get?

On a shared host the lower bounds are requirements (the host must have at least ``cpu.min``
CPUs, ``memory.min`` memory, ``disk.min`` disk; the GPUs must match vendor, name, per-GPU memory,
compute capability and total memory) and the job is granted ``gpu.count.min`` GPUs (one if the
range is open at the bottom but a GPU is asked for). Upper bounds of cpu/memory/disk limit what a
job may be given; they do not exclude bigger hosts -- a 2-CPU job may run on a 96-CPU host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from meshgpu.config.resources import GPUSpec, ResourcesSpec
from meshgpu.state.records import GPURecord, JobRecord, NodeRecord


def resources_of(raw: dict[str, Any]) -> ResourcesSpec:
    return ResourcesSpec.model_validate(raw)


def job_key(job: JobRecord) -> str:
    """A canonical text of the job's requirements: jobs with equal keys fit the same hosts."""
    return job.resources_key or json.dumps(job.resources, sort_keys=True, separators=(",", ":"))


_SPECS: dict[str, ResourcesSpec] = {}


def job_resources(job: JobRecord) -> ResourcesSpec:
    """The job's parsed requirements; parsed once per distinct requirement (a queue of a
    thousand identical jobs parses one spec)."""
    key = job_key(job)
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) > 10_000:
            _SPECS.clear()
        spec = _SPECS[key] = ResourcesSpec.model_validate(job.resources)
    return spec


def gpus_wanted(gpu: GPUSpec) -> int:
    lo, hi = gpu.count.min, gpu.count.max
    if hi == 0:
        return 0
    if lo:
        return lo
    # ``0..`` (the default) asks for no GPU; ``..4`` with a name asks for at least one.
    return 1 if (gpu.name or gpu.vendor or gpu.memory or (hi is not None and lo is None)) else 0


def gpu_matches(spec: GPUSpec, g: GPURecord) -> bool:
    if not g.healthy:
        return False
    if spec.vendor and g.vendor != spec.vendor:
        return False
    if spec.name and g.name.lower() not in {n.lower() for n in spec.name}:
        return False
    if spec.memory is not None and not spec.memory.contains(g.memory_mib / 1024):
        return False
    if spec.compute_capability and g.compute_capability:
        want = tuple(int(x) for x in spec.compute_capability.split("."))
        have = tuple(int(x) for x in g.compute_capability.split("."))
        if have < want:
            return False
    return True


@dataclass(frozen=True, slots=True)
class Fit:
    gpu_indices: tuple[int, ...] | None  # None: does not fit
    reason: str = ""


def host_fits(res: ResourcesSpec, node: NodeRecord, image: bool = False) -> str:
    """Why this host can never run the job ('' if it could, were it idle)."""
    if image and not node.container_runtime:
        return f"{node.name} has no container runtime (docker/podman) for image jobs"
    if res.cpu.arch and res.cpu.arch != node.cpu_arch:
        return f"{node.name} is {node.cpu_arch}, the job needs {res.cpu.arch}"
    if res.cpu.count.min and node.cpu_count < res.cpu.count.min:
        return f"{node.name} has {node.cpu_count} CPUs, the job needs {res.cpu.count}"
    if res.memory.min and node.memory_mib / 1024 < res.memory.min:
        return f"{node.name} has {node.memory_mib / 1024:.0f}GB memory, the job needs {res.memory}"
    if res.disk.size.min and node.disk_gb < res.disk.size.min:
        return f"{node.name} has {node.disk_gb:.0f}GB disk, the job needs {res.disk}"
    n = gpus_wanted(res.gpu)
    if n:
        matching = [g for g in node.gpus if gpu_matches(res.gpu, g)]
        if len(matching) < n:
            return f"{node.name} has {len(matching)} matching GPUs, the job needs {n} ({res.gpu.to_spec()})"
        if res.gpu.total_memory is not None:
            total = sum(sorted((g.memory_mib for g in matching), reverse=True)[:n]) / 1024
            if not res.gpu.total_memory.contains(total):
                return f"{node.name}'s {n} GPUs have {total:.0f}GB in total, the job needs {res.gpu.total_memory}"
    return ""


def choose_gpus(res: ResourcesSpec, node: NodeRecord, free: set[int]) -> Fit:
    """Pick ``n`` free matching GPUs, preferring a set inside one NUMA node and, with a known
    topology, the best-connected one."""
    n = gpus_wanted(res.gpu)
    if n == 0:
        return Fit(())
    candidates = [g for g in node.gpus if g.index in free and gpu_matches(res.gpu, g)]
    if len(candidates) < n:
        return Fit(None, f"{len(candidates)} free")
    by_numa: dict[int | None, list[GPURecord]] = {}
    for g in candidates:
        by_numa.setdefault(g.numa_node, []).append(g)
    groups = sorted((grp for grp in by_numa.values() if len(grp) >= n), key=len)
    pool = groups[0] if groups else candidates
    chosen = _best_connected(pool, n, node.gpu_links) if node.gpu_links else pool[:n]
    return Fit(tuple(sorted(g.index for g in chosen)))


def _best_connected(pool: list[GPURecord], n: int, links: list[list[int]]) -> list[GPURecord]:
    """Greedy: start from each GPU, add the GPU with the lowest total link level to the set."""
    best: list[GPURecord] | None = None
    best_cost = None
    for start in pool:
        chosen = [start]
        rest = [g for g in pool if g is not start]
        while len(chosen) < n:
            nxt = min(rest, key=lambda g: (sum(links[g.index][c.index] for c in chosen), g.index))
            chosen.append(nxt)
            rest.remove(nxt)
        cost = sum(links[a.index][b.index] for a in chosen for b in chosen)
        if best_cost is None or cost < best_cost:
            best, best_cost = chosen, cost
    assert best is not None
    return best
