"""A deterministic discrete-event simulator over real Raft cores, with invariant checks.

``python -m consensus.sim run --seeds N`` runs N seeded fault schedules;
``python -m consensus.sim replay SEED`` reproduces one, bit for bit, with its trace.
"""

from .checker import Violation
from .simulator import SeedResult, Simulator, run_seed

__all__ = ["SeedResult", "Simulator", "Violation", "run_seed"]
