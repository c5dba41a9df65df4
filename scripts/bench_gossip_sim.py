"""scripts/bench gossip-sim: the SWIM + Lifeguard core at scale, in the deterministic simulator.

Runs real gossip cores (meshgpu.mesh.gossip) for ``--members`` members in virtual time and
measures, with the memberlist profile named by ``--profile``:

* join: a new member joins a converged cluster through one seed; time (and gossip rounds) until
  99% of the members know it;
* death: a member crashes; time until 99% of the survivors declare it dead, next to memberlist's
  expected detection time for the same profile and size (``formula_s``: SWIM's e/(e-1) probe
  periods to the first failed probe, plus memberlist's suspicion timeout; dissemination of the
  verdict comes on top, printed separately);
* bytes: payload bytes each member sends per second (pings, acks, gossip, push/pull streams);
* false deaths: ``--loss`` packet loss and one member whose event loop is busy (each pass of
  ``Exp(--pass-mean)`` seconds fires its timers but reads one packet), nobody failing, for
  ``--duration`` seconds, with Lifeguard on and off. ``false_deaths`` counts "dead" verdicts
  (observer, subject) about healthy members with Lifeguard on, the metric of the Lifeguard paper;
  verdicts about the slow member itself are reported separately.

The last line is JSON (keys in INTERFACE.md). Same seed, same numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshgpu.mesh.gossip import GossipConfig  # noqa: E402
from meshgpu.mesh.gossip.sim import (  # noqa: E402
    BusyLoop,
    NetworkModel,
    measure_death,
    measure_false_deaths,
    measure_join,
)


def _r(x: float | None, nd: int = 2) -> float | None:
    return None if x is None else round(x, nd)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=1000)
    ap.add_argument("--profile", choices=("lan", "wan", "local"), default="lan")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--duration", type=float, default=60.0, help="false-death run, seconds")
    ap.add_argument("--loss", type=float, default=0.05, help="datagram loss, false-death run")
    ap.add_argument(
        "--pass-mean", type=float, default=0.1, help="slow member's mean loop pass, seconds"
    )
    args = ap.parse_args()
    n = args.members
    cfg = GossipConfig.profile(args.profile)
    started = time.perf_counter()

    print(
        f"gossip-sim: {n} members, {args.profile} profile (probe {cfg.probe_interval:g} s, "
        f"gossip {cfg.gossip_interval * 1000:g} ms x {cfg.gossip_nodes}, suspicion "
        f"{cfg.suspicion_min(n):.1f}-{cfg.suspicion_max(n):.1f} s, retransmit "
        f"{cfg.retransmit_limit(n)}), seed {args.seed}"
    )

    join = measure_join(n, cfg, args.seed, NetworkModel())
    join_rounds = join.reached_99_s / cfg.gossip_interval if join.reached_99_s else None
    print(
        f"join: 99% of {n} members knew the new member after {join.reached_99_s:.2f} s "
        f"({join_rounds:.1f} gossip rounds); all after {join.reached_all_s:.2f} s "
        f"[{join.wall_s:.1f} s wall]"
    )

    death = measure_death(n, cfg, args.seed, NetworkModel())
    formula = cfg.expected_detection_time(n)
    dissemination = cfg.expected_dissemination_time(n)
    spread = (
        death.reached_99_s - death.first_verdict_s
        if death.reached_99_s is not None and death.first_verdict_s is not None
        else None
    )
    print(
        f"death: first suspicion {death.first_suspect_s:.2f} s after the crash, first 'dead' "
        f"verdict {death.first_verdict_s:.2f} s, 99% of {n - 1} survivors {death.reached_99_s:.2f} s"
        f" (all {death.reached_all_s:.2f} s) [{death.wall_s:.1f} s wall]"
    )
    print(
        f"  memberlist formula: e/(e-1) x {cfg.probe_interval:g} s probe + suspicion timeout "
        f"{cfg.suspicion_min(n):.2f} s = {formula:.2f} s to the first verdict; "
        f"measured {death.first_verdict_s:.2f} s"
    )
    print(
        f"  verdict reached 99% {spread:.2f} s after the first ({spread / cfg.gossip_interval:.1f} "
        f"gossip rounds; epidemic estimate {dissemination:.2f} s): death_99 {death.reached_99_s:.2f}"
        f" s vs formula + dissemination {formula + dissemination:.2f} s"
    )
    print(
        f"bytes: {death.bytes_per_member_s:.0f} B per member per s over the run "
        f"({death.steady_bytes_per_member_s:.0f} before the crash; "
        f"payload only, push/pull every {cfg.push_pull_period(n):g} s included); "
        f"{death.packets_per_member_s:.1f} packets per member per s"
    )

    slow = BusyLoop(pass_mean=args.pass_mean)
    fd = {}
    for lifeguard in (True, False):
        fd[lifeguard] = measure_false_deaths(
            n,
            cfg.replace(lifeguard=lifeguard),
            args.seed,
            duration=args.duration,
            loss=args.loss,
            slow=slow,
        )
    print(
        f"false deaths: {args.duration:g} s, {args.loss:.0%} datagram loss, member 1's event loop "
        f"busy (passes of Exp({args.pass_mean:g} s), one packet read per pass), nobody failing"
    )
    for lifeguard in (True, False):
        r = fd[lifeguard]
        print(
            f"  Lifeguard {'on ' if lifeguard else 'off'}: {r.healthy_verdicts} 'dead' verdicts "
            f"about healthy members ({r.healthy_incidents} distinct), {r.slow_verdicts} about the "
            f"slow member ({r.slow_incidents} distinct); suspicions of healthy members "
            f"{r.healthy_suspicions}; slow member's health score {r.slow_member_health:.1f} "
            f"[{r.wall_s:.1f} s wall]"
        )
    elapsed = time.perf_counter() - started
    print(f"total wall time {elapsed:.1f} s")

    on, off = fd[True], fd[False]
    result = {
        "members": n,
        "join_99_s": _r(join.reached_99_s),
        "death_99_s": _r(death.reached_99_s),
        "formula_s": _r(formula),
        "false_deaths": on.healthy_verdicts,
        "bytes_per_member_s": round(death.bytes_per_member_s),
        "false_deaths_no_lifeguard": off.healthy_verdicts,
        "false_deaths_slow_member": on.slow_verdicts,
        "false_deaths_slow_member_no_lifeguard": off.slow_verdicts,
        "false_suspicions": on.healthy_suspicions,
        "false_suspicions_no_lifeguard": off.healthy_suspicions,
        "join_99_rounds": _r(join_rounds, 1),
        "join_all_s": _r(join.reached_all_s),
        "death_first_suspect_s": _r(death.first_suspect_s),
        "death_first_verdict_s": _r(death.first_verdict_s),
        "death_all_s": _r(death.reached_all_s),
        "dissemination_estimate_s": _r(dissemination),
        "steady_bytes_per_member_s": round(death.steady_bytes_per_member_s),
        "packets_per_member_s": _r(death.packets_per_member_s, 1),
        "profile": args.profile,
        "seed": args.seed,
        "false_death_duration_s": args.duration,
        "loss": args.loss,
        "slow_pass_mean_s": args.pass_mean,
        "wall_s": round(elapsed, 1),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
