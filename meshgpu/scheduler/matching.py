"""Does a host satisfy a job's ``resources``? Which GPUs should the job get?

The dstack grammar (``config/resources.py``): GPU vendor, names, per-GPU memory, count, total
memory and compute capability; CPU count and architecture; memory; ``shm_size``; disk. On a host
shared GPU by GPU (no ``blocks``) the lower bounds are requirements -- the host must have at least
``cpu.min`` CPUs, ``memory.min`` memory (and room for ``shm_size``), ``disk.min`` disk, and enough
healthy GPUs that match vendor, name, per-GPU memory, compute capability and total memory -- and
the job is granted ``gpu.count.min`` GPUs (one if the range is open at the bottom but a GPU is
asked for). GPUs are the exclusive unit there; CPU and memory upper bounds limit what a job may be
given and do not exclude bigger hosts (a 2-CPU job may run on a 96-CPU host). On a host split
into blocks the job's share is what it is given (``blocks.py``).

Which GPUs: the set inside one NUMA node that fits most tightly, and with a known link topology
the best-connected subset (NVLink before PCIe switch before host bridge before NUMA hops).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from meshgpu.config.resources import GPUSpec, ResourcesSpec
from meshgpu.config.spec import Placement
from meshgpu.scheduler.blocks import BlockShape, block_shape, blocks_needed
from meshgpu.scheduler.filters import RunFilters, run_filters
from meshgpu.state.records import GPURecord, JobRecord, NodeRecord

NO_PLACEMENT = Placement()
IMAGE_PLACEMENT = Placement(key='{"image":true}', image=True)


def job_key(job: JobRecord) -> str:
    """A canonical text of the job's requirements: jobs with equal keys fit the same hosts."""
    return job.resources_key or json.dumps(job.resources, sort_keys=True, separators=(",", ":"))


_SPECS: dict[str, ResourcesSpec] = {}


def spec_of(key: str, raw: dict[str, Any]) -> ResourcesSpec:
    """Parsed requirements, once per distinct key (a queue of a thousand identical jobs parses
    one spec)."""
    spec = _SPECS.get(key)
    if spec is None:
        if len(_SPECS) > 10_000:
            _SPECS.clear()
        spec = _SPECS[key] = ResourcesSpec.model_validate(raw)
    return spec


def job_resources(job: JobRecord) -> ResourcesSpec:
    return spec_of(job_key(job), job.resources)


def gpus_wanted(gpu: GPUSpec) -> int:
    lo, hi = gpu.count.min, gpu.count.max
    if hi == 0:
        return 0
    if lo:
        return lo
    # ``0..`` (the default) asks for no GPU; ``..4`` with a name asks for at least one.
    return 1 if (gpu.name or gpu.vendor or gpu.memory or (hi is not None and lo is None)) else 0


@lru_cache(maxsize=4096)
def _names(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(n.lower() for n in names)


def gpu_matches(spec: GPUSpec, g: GPURecord) -> bool:
    if not g.healthy:
        return False
    if spec.vendor and g.vendor != spec.vendor:
        return False
    if spec.name and g.name.lower() not in _names(tuple(spec.name)):
        return False
    if spec.memory is not None and not spec.memory.contains(g.memory_mib / 1024):
        return False
    if spec.compute_capability and g.compute_capability:
        want = tuple(int(x) for x in spec.compute_capability.split("."))
        have = tuple(int(x) for x in g.compute_capability.split("."))
        if have < want:
            return False
    return True


def describe(res: ResourcesSpec) -> str:
    """What a job asks of one host, for people: ``8xH100:80GB``, ``2xGPU``, ``CPU only``."""
    n = gpus_wanted(res.gpu)
    if not n:
        return "CPU only"
    g = res.gpu
    what = ",".join(g.name) if g.name else (g.vendor or "GPU")
    mem = f":{g.memory}" if g.memory is not None else ""
    return f"{n}x{what}{mem}"


@dataclass(frozen=True, slots=True)
class Req:
    """What one job asks of a host: its resources, its run's filters, and whether it takes a
    host split into blocks whole (a job of a multi-node gang)."""

    key: str
    res: ResourcesSpec
    filters: RunFilters
    exclusive: bool = False


def req_of(res: ResourcesSpec, placement: Placement | None = None, exclusive: bool = False) -> Req:
    filters = run_filters(placement or NO_PLACEMENT)
    key = json.dumps(res.to_spec(), sort_keys=True) + filters.key + ("!" if exclusive else "")
    return Req(key, res, filters, exclusive)


@dataclass(frozen=True, slots=True)
class StaticFit:
    """Can a host (ever) run the job, and what would the job take there?"""

    reason: str = ""  # '' if it can
    units: int = 0  # GPUs on a host shared GPU by GPU, blocks on a host split into blocks
    gpus: int = 0  # GPUs the job is granted
    matching: frozenset[int] = frozenset()  # healthy GPUs the job may be given
    all_match: bool = True  # every healthy GPU matches (no need to filter free GPUs)

    @property
    def ok(self) -> bool:
        return not self.reason


def static_fit(req: Req, node: NodeRecord, shape: BlockShape | None = None) -> StaticFit:
    """Would the job fit ``node`` were the node idle? (Health counts: unhealthy GPUs are not
    there.) ``shape`` is ``block_shape(node)``, passed by callers that have it."""
    res = req.res
    why = req.filters.reject(node, by_name=False)
    if why:
        return StaticFit(why)
    if res.cpu.arch and res.cpu.arch != node.cpu_arch:
        return StaticFit(f"{node.name} is {node.cpu_arch}, the job needs {res.cpu.arch}")
    if res.disk.size.min and node.disk_gb < res.disk.size.min:
        return StaticFit(f"{node.name} has {node.disk_gb:.0f}GB disk, the job needs {res.disk}")
    if shape is None:
        shape = block_shape(node)
    if shape is None:
        if res.cpu.count.min and node.cpu_count < res.cpu.count.min:
            return StaticFit(
                f"{node.name} has {node.cpu_count} CPUs, the job needs {res.cpu.count}"
            )
        mem = node.memory_mib / 1024
        if res.memory.min and mem < res.memory.min:
            return StaticFit(f"{node.name} has {mem:.0f}GB memory, the job needs {res.memory}")
        if res.shm_size and mem < res.shm_size:
            return StaticFit(f"{node.name} has {mem:.0f}GB memory, less than shm_size")
        n = units = gpus_wanted(res.gpu)
    else:
        units, why = blocks_needed(res, shape, req.exclusive)
        if not units:
            return StaticFit(f"{node.name}: {why}")
        n = units * shape.gpus
    healthy = [g for g in node.gpus if g.healthy]
    if not n:
        return StaticFit("", units, 0, frozenset(g.index for g in healthy), True)
    matching = [g for g in healthy if gpu_matches(res.gpu, g)]
    if len(matching) < n:
        return StaticFit(
            f"{node.name} has {len(matching)} matching GPUs, the job needs {n} ({res.gpu.to_spec()})"
        )
    if res.gpu.total_memory is not None:
        total = sum(sorted((g.memory_mib for g in matching), reverse=True)[:n]) / 1024
        if not res.gpu.total_memory.contains(total):
            return StaticFit(
                f"{node.name}'s {n} GPUs have {total:.0f}GB in total, the job needs {res.gpu.total_memory}"
            )
    return StaticFit(
        "", units, n, frozenset(g.index for g in matching), len(matching) == len(healthy)
    )


def host_fits(res: ResourcesSpec, node: NodeRecord, image: bool = False) -> str:
    """Why this host can never run the job ('' if it could, were it idle)."""
    return static_fit(req_of(res, IMAGE_PLACEMENT if image else None), node).reason


@dataclass(frozen=True, slots=True)
class Fit:
    gpu_indices: tuple[int, ...] | None  # None: does not fit
    reason: str = ""


def choose_gpus(
    res: ResourcesSpec, node: NodeRecord, free: set[int], count: int | None = None
) -> Fit:
    """Pick ``count`` (default: what ``res`` asks for) free matching GPUs, topology-aware."""
    n = gpus_wanted(res.gpu) if count is None else count
    if n == 0:
        return Fit(())
    candidates = [g for g in node.gpus if g.index in free and gpu_matches(res.gpu, g)]
    if len(candidates) < n:
        return Fit(None, f"{len(candidates)} free")
    return Fit(pick_gpus(node, candidates, n))


def pick_gpus(node: NodeRecord, pool: list[GPURecord], n: int) -> tuple[int, ...]:
    """``n`` of ``pool`` (free, matching GPUs of ``node``): inside the NUMA node that fits most
    tightly (so big holes stay whole for big jobs), else over the fewest NUMA nodes; then, with
    a known topology, the best-connected subset."""
    if len(pool) == n:
        return tuple(sorted(g.index for g in pool))
    by_numa: dict[int | None, list[GPURecord]] = {}
    for g in pool:
        by_numa.setdefault(g.numa_node, []).append(g)
    groups = list(by_numa.values())
    fitting = [grp for grp in groups if len(grp) >= n]
    if fitting:
        chosen_pool = min(fitting, key=lambda grp: (len(grp), grp[0].index))
    else:
        chosen_pool = []
        for grp in sorted(groups, key=lambda grp: (-len(grp), grp[0].index)):
            chosen_pool.extend(grp)
            if len(chosen_pool) >= n:
                break
    links = node.gpu_links
    if links and len(chosen_pool) > n:
        chosen = _best_connected([g.index for g in chosen_pool], n, links)
    else:
        chosen = [g.index for g in chosen_pool[:n]]
    return tuple(sorted(chosen))


def _best_connected(pool: list[int], n: int, links: list[list[int]]) -> list[int]:
    """Greedy: from each start GPU, add the GPU with the lowest total link level to the set;
    keep the cheapest set. Equal levels everywhere (an all-NVLink box): the first ``n``."""
    if len({links[a][b] for a in pool for b in pool if a != b}) <= 1:
        return pool[:n]
    best: list[int] = []
    best_cost = None
    for start in pool:
        chosen = [start]
        rest = [g for g in pool if g != start]
        while len(chosen) < n:
            nxt = min(rest, key=lambda g: (sum(links[g][c] for c in chosen), g))
            chosen.append(nxt)
            rest.remove(nxt)
        cost = sum(links[a][b] for a in chosen for b in chosen)
        if best_cost is None or cost < best_cost:
            best, best_cost = chosen, cost
    return best
