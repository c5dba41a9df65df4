"""Pure placement: (state) -> decisions. The seed of the full scheduler (queue, gangs, blocks,
priorities, preemption) -- see placement.py for the queue discipline."""

from meshgpu.scheduler.matching import (
    choose_gpus,
    gpu_matches,
    gpus_wanted,
    host_fits,
    resources_of,
)
from meshgpu.scheduler.placement import Plan, plan

__all__ = [
    "Plan",
    "choose_gpus",
    "gpu_matches",
    "gpus_wanted",
    "host_fits",
    "job_resources",
    "plan",
    "resources_of",
]
