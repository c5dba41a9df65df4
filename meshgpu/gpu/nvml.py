"""NVIDIA GPUs through NVML (``nvidia-ml-py``, module ``pynvml``).

Every call blocks in the driver, so the agent runs these methods in a worker thread. A value the
device does not support (``NVMLError_NotSupported``) is reported as None rather than failing the
whole sample; a GPU that stops answering (``GPU is lost``) is reported unhealthy.

Health, the checks DCGM's health watches make from NVML (each one a reason in
``GPUTelemetry.reasons``): critical XID events of the last 30 s (an event set registered at
start and drained, without waiting, at each sample, its events kept for every sampler to see;
application faults like XID 13/31/43 are the job's, not the GPU's, and are not counted),
uncorrected volatile ECC errors, retired pages or
remapped rows waiting for a GPU reset, a failed row remapping, hardware thermal or power-brake
slowdown, and a GPU that has fallen off the bus (NVML's ``GPU is lost``, or no answer at all).
How long a GPU stays out once it looks healthy again is the agent's choice
(``meshgpu.gpu.health.HealthTracker``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from meshgpu.gpu._types import (
    LINK_HOSTBRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_SYSTEM,
    GPUInfo,
    GPUProviderUnavailable,
    GPUTelemetry,
)
from meshgpu.gpu.catalog import lookup

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_EVENTS = 256  # XID events read per sample
XID_REPORT_S = 30.0  # how long every sample reports an XID after it was read
# XIDs a program causes (illegal address, MMU fault from the app, a killed context): the job's
# fault, not the GPU's (DCGM does not count them against the GPU either).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 69})
# Clock event reasons that mean the hardware is protecting itself (NVML's bit values).
HW_THERMAL_SLOWDOWN = 0x40
HW_POWER_BRAKE_SLOWDOWN = 0x80


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class NVMLProvider:
    name = "nvml"

    def __init__(self, nvml: Any | None = None) -> None:
        """``nvml`` is the ``pynvml`` module (injectable so the mapping is testable without a GPU)."""
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError as e:  # pragma: no cover - nvidia-ml-py is a dependency
                raise GPUProviderUnavailable(f"nvidia-ml-py is not installed: {e}") from e
        self._n = nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            raise GPUProviderUnavailable(f"NVML unavailable: {type(e).__name__}: {e}") from e
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())
        ]
        self._xid_lock = threading.Lock()  # samples are taken in several worker threads
        self._xids: list[tuple[float, int, int]] = []  # (when read, GPU index, XID)
        self._events = self._xid_events()

    def _xid_events(self) -> Any | None:
        """An event set with every GPU's critical XID events (None: not supported here)."""
        n = self._n
        kind = getattr(n, "nvmlEventTypeXidCriticalError", None)
        if kind is None or not hasattr(n, "nvmlEventSetCreate"):
            return None
        events = self._try(n.nvmlEventSetCreate)
        if events is None:
            return None
        for h in self._handles:
            self._try(n.nvmlDeviceRegisterEvents, h, kind, events)
        return events

    def _drain_xids(self) -> dict[int, list[int]]:
        """The critical XIDs each GPU reported in the last ``XID_REPORT_S`` seconds (index ->
        XIDs): pending events are read (at most ``MAX_EVENTS``, never waiting) and kept that
        long, so every caller's sample shows them -- the health check's, a ``/metrics``
        scrape's and the history's alike, whichever happened to read the event."""
        if self._events is None:
            return {}
        n = self._n
        with self._xid_lock:
            now = time.monotonic()
            for _ in range(MAX_EVENTS):
                try:
                    ev = n.nvmlEventSetWait(self._events, 0)
                except n.NVMLError:  # NVML_ERROR_TIMEOUT: nothing pending (or the set is gone)
                    break
                i = self._try(n.nvmlDeviceGetIndex, ev.device)
                if i is not None and int(ev.eventData) not in APPLICATION_XIDS:
                    self._xids.append((now, i, int(ev.eventData)))
            self._xids = [x for x in self._xids if now - x[0] < XID_REPORT_S][-MAX_EVENTS:]
            out: dict[int, list[int]] = {}
            for _, i, xid in self._xids:
                if xid not in out.get(i, []):
                    out.setdefault(i, []).append(xid)
            return out

    def _lost(self, h: Any) -> bool:
        """True when NVML says the GPU has fallen off the bus."""
        lost = getattr(self._n, "NVMLError_GpuIsLost", None)
        try:
            self._n.nvmlDeviceGetUtilizationRates(h)
        except self._n.NVMLError as e:
            return (lost is not None and isinstance(e, lost)) or "lost" in str(e).lower()
        return False

    def _try(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        try:
            return fn(*args, **kwargs)
        except self._n.NVMLError as e:
            log.debug("nvml call=%s error=%s", getattr(fn, "__name__", fn), e)
            return None

    def _optional(self, name: str, *args: Any) -> Any | None:
        """``_try`` of a function older bindings may not have (None then)."""
        fn = getattr(self._n, name, None)
        return None if fn is None else self._try(fn, *args)

    def driver_version(self) -> str | None:
        v = self._try(self._n.nvmlSystemGetDriverVersion)
        return None if v is None else _text(v)

    def inventory(self) -> list[GPUInfo]:
        n = self._n
        out = []
        for i, h in enumerate(self._handles):
            product = _text(n.nvmlDeviceGetName(h))
            model = lookup(product)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            cc = self._try(n.nvmlDeviceGetCudaComputeCapability, h)
            pci = self._try(n.nvmlDeviceGetPciInfo, h)
            mig = self._try(n.nvmlDeviceGetMigMode, h)
            limit = self._try(n.nvmlDeviceGetEnforcedPowerLimit, h)
            out.append(
                GPUInfo(
                    index=i,
                    uuid=_text(n.nvmlDeviceGetUUID(h)),
                    name=model.name if model else product.removeprefix("NVIDIA ").split()[0],
                    vendor="nvidia",
                    memory_mib=int(mem.total // (1024 * 1024)),
                    product_name=product,
                    compute_capability=f"{cc[0]}.{cc[1]}" if cc else None,
                    pci_bus_id=_text(pci.busId) if pci is not None else None,
                    numa_node=self._try(n.nvmlDeviceGetNumaNodeId, h),
                    mig_enabled=bool(mig and mig[0] == n.NVML_DEVICE_MIG_ENABLE),
                    power_limit_w=limit / 1000 if limit is not None else None,
                )
            )
        return out

    def telemetry(self) -> list[GPUTelemetry]:
        n = self._n
        out = []
        xids = self._drain_xids()
        for i, h in enumerate(self._handles):
            util = self._try(n.nvmlDeviceGetUtilizationRates, h)
            mem = self._try(n.nvmlDeviceGetMemoryInfo, h)
            if util is None and mem is None:
                why = (
                    "fallen off the bus (NVML: GPU is lost)"
                    if self._lost(h)
                    else "GPU does not answer NVML queries"
                )
                reasons = tuple(f"XID {x}" for x in xids.get(i, ())) + (why,)
                out.append(GPUTelemetry(index=i, healthy=False, reasons=reasons))
                continue
            temp = self._try(n.nvmlDeviceGetTemperature, h, n.NVML_TEMPERATURE_GPU)
            power = self._try(n.nvmlDeviceGetPowerUsage, h)
            ecc_u = self._try(
                n.nvmlDeviceGetTotalEccErrors,
                h,
                n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED,
                n.NVML_VOLATILE_ECC,
            )
            ecc_c = self._try(
                n.nvmlDeviceGetTotalEccErrors,
                h,
                n.NVML_MEMORY_ERROR_TYPE_CORRECTED,
                n.NVML_VOLATILE_ECC,
            )
            reasons = [f"XID {x}" for x in xids.get(i, ())]
            if ecc_u:
                reasons.append(f"{ecc_u} uncorrected ECC errors since boot")
            remap = self._try(n.nvmlDeviceGetRemappedRows, h)
            if remap is not None and len(remap) >= 4:
                if remap[2]:
                    reasons.append("row remapping pending (reset the GPU)")
                if remap[3]:
                    reasons.append("row remapping failed")
            pending = self._optional("nvmlDeviceGetRetiredPagesPendingStatus", h)
            if pending is not None and pending == getattr(n, "NVML_FEATURE_ENABLED", 1):
                reasons.append("retired pages pending (reset the GPU)")
            clocks = getattr(n, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
                n, "nvmlDeviceGetCurrentClocksThrottleReasons", None
            )
            slowdown = self._try(clocks, h) if clocks is not None else None
            if slowdown:
                if slowdown & HW_THERMAL_SLOWDOWN:
                    reasons.append("thermal slowdown (hardware)")
                if slowdown & HW_POWER_BRAKE_SLOWDOWN:
                    reasons.append("power brake slowdown (hardware)")
            out.append(
                GPUTelemetry(
                    index=i,
                    utilization_pct=float(util.gpu) if util is not None else None,
                    memory_used_mib=int(mem.used // (1024 * 1024)) if mem is not None else None,
                    temperature_c=float(temp) if temp is not None else None,
                    power_w=power / 1000 if power is not None else None,
                    ecc_uncorrected=ecc_u,
                    ecc_corrected=ecc_c,
                    healthy=not reasons,
                    reasons=tuple(reasons),
                )
            )
        return out

    def links(self) -> list[list[int]]:
        n = self._n
        levels = {
            getattr(n, "NVML_TOPOLOGY_INTERNAL", 0): LINK_NVLINK,
            getattr(n, "NVML_TOPOLOGY_SINGLE", 10): LINK_PCIE_SWITCH,
            getattr(n, "NVML_TOPOLOGY_MULTIPLE", 20): LINK_PCIE_SWITCH,
            getattr(n, "NVML_TOPOLOGY_HOSTBRIDGE", 30): LINK_HOSTBRIDGE,
            getattr(n, "NVML_TOPOLOGY_NODE", 40): LINK_HOSTBRIDGE,
            getattr(n, "NVML_TOPOLOGY_SYSTEM", 50): LINK_NUMA,
        }
        count = len(self._handles)
        out = [[0] * count for _ in range(count)]
        for a in range(count):
            for b in range(a + 1, count):
                ha, hb = self._handles[a], self._handles[b]
                p2p = self._try(n.nvmlDeviceGetP2PStatus, ha, hb, n.NVML_P2P_CAPS_INDEX_NVLINK)
                if p2p == getattr(n, "NVML_P2P_STATUS_OK", 0):
                    level = LINK_NVLINK
                else:
                    common = self._try(n.nvmlDeviceGetTopologyCommonAncestor, ha, hb)
                    level = levels.get(common, LINK_SYSTEM) if common is not None else LINK_SYSTEM
                out[a][b] = out[b][a] = level
        return out

    def close(self) -> None:
        if self._events is not None:
            self._try(self._n.nvmlEventSetFree, self._events)
            self._events = None
        self._try(self._n.nvmlShutdown)
