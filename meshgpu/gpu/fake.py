"""Fake GPUs with the same interface as NVML: every test and demo runs on a machine without one.

Spec (``--fake-gpus`` / ``MESHGPU_FAKE_GPUS``): comma-separated ``[N x]NAME[:MEMORY]`` groups,
e.g. ``8xH100:80GB``, ``2xMI300X:192GB``, ``4xA100:40GB,2xT4``. Memory defaults to the catalog's.

Telemetry is plausible and controllable: GPUs that jobs hold (``set_busy``) show utilization,
heat and power; ``set_state`` (or a JSON state file, re-read at each sample, for tests that drive
an agent process from outside) overrides any value or marks a GPU unhealthy. Faults can be
injected the way NVML reports them: ``{"3": {"xid": 79}}`` (an XID event; a list for several)
or ``{"3": {"ecc_uncorrected": 2}}`` make GPU 3 unhealthy with that reason, as do
``"retired_pages_pending": true``, ``"row_remap_pending": true``, ``"thermal_slowdown": true``,
``"power_slowdown": true`` and ``"fallen_off_bus": true`` (no readings then, as NVML gives none);
``healthy`` given outright wins; removing the entry (or ``{}``) heals it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
import uuid
from pathlib import Path
from typing import Any

from meshgpu.gpu._types import (
    LINK_NUMA,
    LINK_NVLINK,
    GPUInfo,
    GPUTelemetry,
)
from meshgpu.gpu.catalog import lookup

_FIELDS = frozenset(f.name for f in dataclasses.fields(GPUTelemetry)) - {"index"}

# Boolean faults of the state file, each with the reason NVML's checks give (meshgpu/gpu/nvml.py).
FAULTS = {
    "retired_pages_pending": "retired pages pending (reset the GPU)",
    "row_remap_pending": "row remapping pending (reset the GPU)",
    "thermal_slowdown": "thermal slowdown (hardware)",
    "power_slowdown": "power brake slowdown (hardware)",
    "fallen_off_bus": "fallen off the bus (NVML: GPU is lost)",
}

_GROUP = re.compile(
    r"^\s*(?:(\d+)\s*[xX*]\s*)?([A-Za-z][A-Za-z0-9_-]*)\s*(?::\s*([0-9.]+\s*[A-Za-z]*))?\s*$"
)


class FakeSpecError(ValueError):
    """A ``--fake-gpus`` spec that cannot be understood."""


def parse_fake_spec(spec: str, seed: str = "meshgpu") -> list[GPUInfo]:
    """Turn ``8xH100:80GB`` into GPU inventory with stable UUIDs (derived from ``seed``)."""
    from meshgpu.config import parse_memory  # the same memory grammar users write

    gpus: list[GPUInfo] = []
    if not spec.strip():
        return gpus
    for group in spec.split(","):
        m = _GROUP.match(group)
        if not m:
            raise FakeSpecError(
                f"invalid fake GPU spec {group!r}: use [COUNT x]NAME[:MEMORY], e.g. 8xH100:80GB or 2xMI300X"
            )
        count = int(m.group(1) or 1)
        if not 1 <= count <= 64:
            raise FakeSpecError(f"fake GPU count must be 1..64, got {count}")
        model = lookup(m.group(2))
        name = model.name if model else m.group(2)
        if m.group(3):
            try:
                memory_gb = parse_memory(m.group(3))
            except ValueError as e:
                raise FakeSpecError(str(e)) from None
        elif model:
            memory_gb = model.memory_gb
        else:
            raise FakeSpecError(f"unknown GPU {name!r}: give its memory, e.g. {count}x{name}:24GB")
        vendor = model.vendor if model else "nvidia"
        for j in range(count):
            i = len(gpus)
            digest = hashlib.sha256(f"{seed}/{i}/{name}".encode()).digest()[:16]
            gpus.append(
                GPUInfo(
                    index=i,
                    uuid=("GPU-" if vendor == "nvidia" else "") + str(uuid.UUID(bytes=digest)),
                    name=name,
                    vendor=vendor,
                    memory_mib=int(round(memory_gb * 1024)),
                    product_name=f"{'NVIDIA' if vendor == 'nvidia' else vendor.upper()} {name} (fake)",
                    compute_capability=model.compute_capability if model else None,
                    pci_bus_id=f"00000000:{0x10 + i:02X}:00.0",
                    numa_node=0 if j < max(1, (count + 1) // 2) else 1,
                    power_limit_w=float(model.power_w if model else 300),
                )
            )
    return gpus


class FakeProvider:
    """GPUs that exist only in memory; see the module docstring."""

    name = "fake"

    def __init__(
        self, spec: str, *, seed: str = "meshgpu", state_file: str | Path | None = None
    ) -> None:
        self._gpus = parse_fake_spec(spec, seed)
        self._rng = random.Random(seed)
        self._busy: set[int] = set()
        self._overrides: dict[int, dict[str, Any]] = {}
        self._state_file = Path(state_file) if state_file else None

    def inventory(self) -> list[GPUInfo]:
        return list(self._gpus)

    def driver_version(self) -> str | None:
        return "fake-1.0"

    def links(self) -> list[list[int]]:
        """An HGX-like box: all GPUs NVLinked when there are 8 or fewer of one model, else
        NVLink within a NUMA node."""
        n = len(self._gpus)
        out = [[0] * n for _ in range(n)]
        for a in self._gpus:
            for b in self._gpus:
                if a.index != b.index:
                    same = a.name == b.name and (n <= 8 or a.numa_node == b.numa_node)
                    out[a.index][b.index] = LINK_NVLINK if same else LINK_NUMA
        return out

    def set_busy(self, indices: set[int]) -> None:
        """GPUs held by running jobs (the runner tells us), so telemetry looks alive."""
        self._busy = set(indices)

    def set_state(self, index: int, **values: Any) -> None:
        """Override telemetry fields of one GPU, e.g. ``healthy=False, reasons=("xid 79",)``."""
        self._overrides.setdefault(index, {}).update(values)

    def _file_overrides(self) -> dict[int, dict[str, Any]]:
        if self._state_file is None or not self._state_file.exists():
            return {}
        try:
            raw = json.loads(self._state_file.read_text() or "{}")
        except (OSError, ValueError):
            return {}
        return {int(k): v for k, v in raw.items() if isinstance(v, dict)}

    def telemetry(self) -> list[GPUTelemetry]:
        file_overrides = self._file_overrides()
        out = []
        for g in self._gpus:
            busy = g.index in self._busy
            util = (85.0 + self._rng.uniform(-10, 10)) if busy else self._rng.uniform(0, 1)
            limit = g.power_limit_w or 300.0
            values: dict[str, Any] = {
                "index": g.index,
                "utilization_pct": round(util, 1),
                "memory_used_mib": int(g.memory_mib * (0.7 if busy else 0.0)) + 1,
                "temperature_c": round(32 + 0.45 * util + self._rng.uniform(-1, 1), 1),
                "power_w": round(0.1 * limit + util / 100 * 0.8 * limit, 1),
                "ecc_uncorrected": 0,
                "ecc_corrected": 0,
                "healthy": True,
                "reasons": (),
            }
            overrides = self._overrides.get(g.index, {}) | file_overrides.get(g.index, {})
            values.update({k: v for k, v in overrides.items() if k in _FIELDS})
            reasons = list(values.get("reasons") or ())
            # Faults as NVML reports them: an XID event or uncorrected ECC errors make the GPU
            # unhealthy, unless the override says outright whether it is healthy.
            xids = overrides.get("xid")
            for xid in xids if isinstance(xids, list) else [xids] if xids else []:
                reasons.append(f"XID {xid}")
            if values.get("ecc_uncorrected"):
                reasons.append(f"{values['ecc_uncorrected']} uncorrected ECC errors")
            reasons += [why for key, why in FAULTS.items() if overrides.get(key)]
            if overrides.get("fallen_off_bus"):  # a lost GPU answers nothing
                for key in ("utilization_pct", "memory_used_mib", "temperature_c", "power_w"):
                    values[key] = None
                values["ecc_uncorrected"] = values["ecc_corrected"] = None
            values["reasons"] = tuple(reasons)
            if "healthy" not in overrides:
                values["healthy"] = not reasons
            out.append(GPUTelemetry(**values))
        return out

    def close(self) -> None:
        pass
