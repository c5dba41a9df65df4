"""dstack's ``blocks``: a host split into N equal shares of its GPUs, CPUs and memory.

A job on such a host takes the *smallest* number of whole blocks whose share satisfies its
``resources`` (dstack ``services/offers.py::generate_shared_offer``): the share's GPU count must lie
in the requested count range, its CPUs and memory must reach the requested minimums, and the disk
is shared whole. A job of a multi-node gang takes the whole host (all blocks, none busy), as in
dstack, whose cluster jobs use host networking. Hosts without ``blocks`` are shared GPU by GPU
instead (see ``matching.py``): finer than dstack, which gives such a host to one job.
"""

from __future__ import annotations

from dataclasses import dataclass

from meshgpu.config.resources import ResourcesSpec
from meshgpu.state.records import NodeRecord


@dataclass(frozen=True, slots=True)
class BlockShape:
    """One block of a host: ``total`` blocks of ``gpus`` GPUs, ``cpus`` CPUs, ``memory_gb``."""

    total: int
    gpus: int
    cpus: float
    memory_gb: float


def block_shape(node: NodeRecord) -> BlockShape | None:
    total = node.block_count()
    if total is None:
        return None
    return BlockShape(
        total=total,
        gpus=len(node.gpus) // total,
        cpus=node.cpu_count / total,
        memory_gb=node.memory_mib / 1024 / total,
    )


def blocks_needed(res: ResourcesSpec, shape: BlockShape, exclusive: bool) -> tuple[int, str]:
    """The fewest blocks whose share satisfies ``res`` (and why none does: ``(0, reason)``)."""
    lo = res.gpu.count.min or 0
    hi = res.gpu.count.max
    wanted = range(shape.total, shape.total + 1) if exclusive else range(1, shape.total + 1)
    for k in wanted:
        gpus = k * shape.gpus
        if gpus < lo or (hi is not None and gpus > hi):
            continue
        if res.cpu.count.min and k * shape.cpus < res.cpu.count.min:
            continue
        if res.memory.min and k * shape.memory_gb < res.memory.min:
            continue
        if res.shm_size and k * shape.memory_gb < res.shm_size:
            continue
        return k, ""
    whole = " (a multi-node job takes the whole host)" if exclusive else ""
    return 0, (
        f"no share of its {shape.total} blocks ({shape.gpus} GPUs, {shape.cpus:g} CPUs, "
        f"{shape.memory_gb:.0f}GB each) matches{whole}"
    )
