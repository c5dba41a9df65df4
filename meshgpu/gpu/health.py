"""How long a GPU stays out: a GPU the provider reports unhealthy is unhealthy at once, and is
healthy again only after ``recover_after`` healthy checks in a row (DCGM-style hysteresis, so a
GPU that flaps -- an XID now and then, a thermal slowdown that comes and goes -- gets no new work
until it has been quiet for a while). Until then its reasons say what it was and how far along
it is: ``recovering (1/3 healthy checks) after: XID 79``.

The agent runs every sample that feeds gossip (what the leader turns into replicated health, and
the scheduler into placements) through one tracker; see ``meshgpu/agent.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from meshgpu.gpu._types import GPUTelemetry

DEFAULT_RECOVER_AFTER = 3


class HealthTracker:
    """Per-GPU hysteresis over provider samples; see the module docstring. Not thread-safe: one
    caller (the gossip's sampling task) feeds it."""

    def __init__(self, recover_after: int = DEFAULT_RECOVER_AFTER) -> None:
        if recover_after < 1:
            raise ValueError(f"recover_after must be at least 1, got {recover_after}")
        self.recover_after = recover_after
        # index -> (the last unhealthy reasons, healthy checks since)
        self._out: dict[int, tuple[tuple[str, ...], int]] = {}

    def apply(self, samples: Iterable[GPUTelemetry]) -> list[GPUTelemetry]:
        """The samples with health as the scheduler should see it."""
        out = []
        for t in samples:
            if not t.healthy:
                self._out[t.index] = (t.reasons or ("unhealthy",), 0)
                out.append(t)
                continue
            held = self._out.get(t.index)
            if held is None:
                out.append(t)
                continue
            reasons, good = held[0], held[1] + 1
            if good >= self.recover_after:
                del self._out[t.index]
                out.append(t)
                continue
            self._out[t.index] = (reasons, good)
            why = f"recovering ({good}/{self.recover_after} healthy checks) after: " + "; ".join(
                reasons
            )
            out.append(dataclasses.replace(t, healthy=False, reasons=(why,)))
        return out


__all__ = ["DEFAULT_RECOVER_AFTER", "HealthTracker"]
