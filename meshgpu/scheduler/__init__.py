"""The scheduler: pure, deterministic placement -- (state, now) -> decisions.

``plan`` decides what to start (``AssignJobs``), what to preempt (``PreemptJobs``) and why every
waiting job waits (``SetPendingReasons``); ``offer`` answers where a request would fit now. See
``placement.py`` for the queue discipline, backfill rule and preemption policy.
"""

from meshgpu.scheduler.capacity import Reservation
from meshgpu.scheduler.index import SchedulerIndex
from meshgpu.scheduler.matching import (
    choose_gpus,
    gpu_matches,
    gpus_wanted,
    host_fits,
    job_resources,
)
from meshgpu.scheduler.offer import Offer, no_offer_reason, offer
from meshgpu.scheduler.placement import QUEUED, Plan, plan
from meshgpu.scheduler.policy import SchedulerPolicy

__all__ = [
    "QUEUED",
    "Offer",
    "Plan",
    "Reservation",
    "SchedulerIndex",
    "SchedulerPolicy",
    "choose_gpus",
    "gpu_matches",
    "gpus_wanted",
    "host_fits",
    "job_resources",
    "no_offer_reason",
    "offer",
    "plan",
]
