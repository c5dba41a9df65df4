"""Every scheduler tunable in one object, with the defaults a mesh runs with."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SchedulerPolicy:
    """How the scheduler trades fairness, utilization and protection of waiting work.

    The defaults suit a LAN mesh of a few to a few thousand hosts; none needs tuning to be
    correct, only to change a trade-off.
    """

    # At equal priority, serve the project holding the fewest GPUs first (FIFO inside a
    # project). Off: one FIFO across projects.
    fair_share: bool = True
    # A waiting run may stop lower-priority runs that opted in (``preemptible: true``, or a host
    # labelled ``preemption=always``). Off: nothing is ever preempted.
    preemption: bool = True
    # Upper bounds used to turn ``max_duration`` into a deadline: from assignment to start
    # (dstack's provisioning timeout is 10 minutes), and after ``max_duration`` the graceful stop
    # (the run's ``stop_duration``, 300 s by default) plus this margin for the report to commit.
    start_allowance_s: float = 600.0
    finish_allowance_s: float = 30.0
    # A gang that needs more hosts than can run it at all (a 3-node job on a 2-host mesh) still
    # holds the hosts it could use, so it starts as soon as the mesh grows (a joining host, a
    # cloud fleet scaling up) instead of being starved by smaller jobs. Set False on a fixed
    # mesh to let others use those hosts meanwhile; the gang then waits without a reservation.
    hold_for_oversized_gangs: bool = True
    # How many hosts, at most, are weighed when choosing where a blocked gang's reservation goes
    # (the ones with most free GPUs, and the ones whose work ends first). The choice is always a
    # valid reservation; a bigger number only finds an earlier one, at more cost per plan.
    reservation_candidates: int = 24
