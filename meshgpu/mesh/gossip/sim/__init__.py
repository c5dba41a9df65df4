"""Deterministic discrete-event simulation of many gossip cores (see :mod:`.simulator`) and the
measurements built on it (:mod:`.scenarios`)."""

from .scenarios import (
    FalseDeathResult,
    SpreadResult,
    measure_death,
    measure_false_deaths,
    measure_join,
)
from .simulator import (
    BusyLoop,
    NetworkModel,
    SimInvariantError,
    SimMember,
    Simulator,
    Slowness,
    Stalls,
)

__all__ = [
    "BusyLoop",
    "FalseDeathResult",
    "NetworkModel",
    "SimInvariantError",
    "SimMember",
    "Simulator",
    "Slowness",
    "Stalls",
    "SpreadResult",
    "measure_death",
    "measure_false_deaths",
    "measure_join",
]
