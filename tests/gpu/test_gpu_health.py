"""GPU health, DCGM-style: the NVML checks (against a stand-in pynvml), the fake provider's
injectable faults, and the hysteresis that keeps a GPU out until it has been healthy a while."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from meshgpu.gpu import FakeProvider, GPUTelemetry
from meshgpu.gpu.health import HealthTracker
from meshgpu.gpu.nvml import XID_REPORT_S, NVMLProvider
from tests.gpu.test_gpu import _fake_pynvml, _NVMLError


class _Timeout(_NVMLError):
    pass


class _GpuIsLost(_NVMLError):
    pass


def _nvml_with_faults(
    xids: list[tuple[int, int]],
    *,
    pending_pages: set[int] = frozenset(),  # type: ignore[assignment]
    remap_pending: set[int] = frozenset(),  # type: ignore[assignment]
    slowdown: dict[int, int] | None = None,
    lost: int | None = None,
) -> types.SimpleNamespace:
    n = _fake_pynvml()
    queue = list(xids)
    registered: list[tuple[int, int]] = []

    def wait(events: object, timeout_ms: int) -> object:
        assert timeout_ms == 0  # a sample never blocks on events
        if not queue:
            raise _Timeout("Timeout")
        device, xid = queue.pop(0)
        return types.SimpleNamespace(device=device, eventData=xid, eventType=8)

    def util(h: int) -> object:
        if h == lost:
            raise _GpuIsLost("GPU is lost")
        return types.SimpleNamespace(gpu=40 + h, memory=10)

    def mem(h: int) -> object:
        if h == lost:
            raise _GpuIsLost("GPU is lost")
        return types.SimpleNamespace(total=80 * 1024**3, used=1024**3, free=0)

    n.NVMLError_GpuIsLost = _GpuIsLost
    n.NVML_FEATURE_ENABLED = 1
    n.nvmlEventTypeXidCriticalError = 8
    n.nvmlEventSetCreate = lambda: "events"
    n.nvmlEventSetFree = lambda e: None
    n.nvmlDeviceRegisterEvents = lambda h, kind, e: registered.append((h, kind))
    n.nvmlEventSetWait = wait
    n.nvmlDeviceGetIndex = lambda h: h
    n.nvmlDeviceGetUtilizationRates = util
    n.nvmlDeviceGetMemoryInfo = mem
    n.nvmlDeviceGetRetiredPagesPendingStatus = lambda h: int(h in pending_pages)
    n.nvmlDeviceGetRemappedRows = lambda h: (0, 0, int(h in remap_pending), 0)
    n.nvmlDeviceGetCurrentClocksEventReasons = lambda h: (slowdown or {}).get(h, 0)
    n.registered = registered
    return n


def test_nvml_counts_critical_xids_since_the_last_sample() -> None:
    n = _nvml_with_faults([(1, 79), (0, 13), (1, 48)])
    p = NVMLProvider(n)
    assert n.registered == [(0, 8), (1, 8)]  # every GPU's critical XIDs, registered at start
    t = p.telemetry()
    assert t[0].healthy  # XID 13 is the application's fault, not the GPU's
    assert not t[1].healthy and t[1].reasons == ("XID 79", "XID 48")
    # Every sample in the next 30 s reports it (whoever reads the event, the health check sees
    # it), each XID once; then it is gone.
    again = p.telemetry()
    assert again[1].reasons == ("XID 79", "XID 48") and again[0].healthy
    p._xids = [(t - XID_REPORT_S, i, x) for t, i, x in p._xids]  # noqa: SLF001 - age them
    assert all(s.healthy for s in p.telemetry())
    p.close()


def test_nvml_pending_pages_remaps_slowdowns_and_a_lost_gpu() -> None:
    p = NVMLProvider(
        _nvml_with_faults([], pending_pages={0}, remap_pending={0}, slowdown={1: 0x40 | 0x80 | 0x4})
    )
    t = p.telemetry()
    assert t[0].reasons == (
        "row remapping pending (reset the GPU)",
        "retired pages pending (reset the GPU)",
    )
    # SW power capping (0x4) is normal operation; hardware slowdowns are not.
    assert t[1].reasons == ("thermal slowdown (hardware)", "power brake slowdown (hardware)")
    lost = NVMLProvider(_nvml_with_faults([(1, 79)], lost=1)).telemetry()
    assert lost[0].healthy
    assert not lost[1].healthy and lost[1].utilization_pct is None
    assert lost[1].reasons == ("XID 79", "fallen off the bus (NVML: GPU is lost)")


def test_nvml_without_event_support_still_samples() -> None:
    n = _fake_pynvml()  # no event set API at all (old driver, old bindings)
    assert all(s.healthy for s in NVMLProvider(n).telemetry())


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        ({"retired_pages_pending": True}, "retired pages pending (reset the GPU)"),
        ({"row_remap_pending": True}, "row remapping pending (reset the GPU)"),
        ({"thermal_slowdown": True}, "thermal slowdown (hardware)"),
        ({"power_slowdown": True}, "power brake slowdown (hardware)"),
        ({"fallen_off_bus": True}, "fallen off the bus (NVML: GPU is lost)"),
        ({"xid": 79}, "XID 79"),
        ({"ecc_uncorrected": 3}, "3 uncorrected ECC errors"),
    ],
)
def test_fake_faults_from_the_state_file(tmp_path: Path, fault: dict, reason: str) -> None:
    state = tmp_path / "fake-gpu-state.json"
    p = FakeProvider("2xH100", state_file=state)
    state.write_text(json.dumps({"1": fault}))
    t = p.telemetry()
    assert t[0].healthy and not t[1].healthy and t[1].reasons == (reason,)
    if "fallen_off_bus" in fault:
        assert t[1].utilization_pct is None and t[1].temperature_c is None


def _sample(*healthy: bool, why: str = "XID 79") -> list[GPUTelemetry]:
    return [
        GPUTelemetry(index=i, healthy=ok, reasons=() if ok else (why,))
        for i, ok in enumerate(healthy)
    ]


def test_a_gpu_returns_after_the_configured_healthy_checks() -> None:
    h = HealthTracker(recover_after=3)
    assert [t.healthy for t in h.apply(_sample(True, True))] == [True, True]
    assert [t.healthy for t in h.apply(_sample(False, True))] == [False, True]
    seen = []
    for _ in range(3):
        t = h.apply(_sample(True, True))
        seen.append((t[0].healthy, t[0].reasons))
    assert seen == [
        (False, ("recovering (1/3 healthy checks) after: XID 79",)),
        (False, ("recovering (2/3 healthy checks) after: XID 79",)),
        (True, ()),
    ]
    # A fault while recovering starts the count again.
    h.apply(_sample(False, True, why="thermal slowdown (hardware)"))
    h.apply(_sample(True, True))
    t = h.apply(_sample(False, True))
    assert t[0].reasons == ("XID 79",)
    assert h.apply(_sample(True, True))[0].reasons == (
        "recovering (1/3 healthy checks) after: XID 79",
    )
    assert HealthTracker(recover_after=1).apply(_sample(True))[0].healthy
    with pytest.raises(ValueError, match="at least 1"):
        HealthTracker(recover_after=0)


def test_amdsmi_health_from_ecc_pending_pages_and_silence() -> None:
    from meshgpu.gpu.amd import AMDProvider

    class _AmdError(Exception):
        pass

    def gone(h: int) -> dict:
        if h == 2:
            raise _AmdError("AMDSMI_STATUS_NOT_INIT")
        return {"gfx_activity": 30, "vram_used": 1024, "current_socket_power": 300}

    a = types.SimpleNamespace(
        AmdSmiInitFlags=types.SimpleNamespace(INIT_AMD_GPUS=1),
        amdsmi_init=lambda flags: None,
        amdsmi_get_processor_handles=lambda: [0, 1, 2],
        amdsmi_get_gpu_activity=gone,
        amdsmi_get_gpu_vram_usage=gone,
        amdsmi_get_power_info=gone,
        amdsmi_get_gpu_total_ecc_count=lambda h: {
            "uncorrectable_count": 4 if h == 0 else 0,
            "correctable_count": 1,
        },
        amdsmi_get_gpu_bad_page_info=lambda h: (
            [{"page_address": 1, "status": "PENDING"}, {"status": "RESERVED"}] if h == 1 else []
        ),
    )
    t = AMDProvider(a).telemetry()
    assert t[0].reasons == ("4 uncorrectable ECC errors",)
    assert t[1].reasons == ("retired pages pending (reset the GPU)",)
    assert t[1].utilization_pct == 30 and t[1].memory_used_mib == 1024
    assert not t[2].healthy and t[2].reasons == ("GPU does not answer amdsmi queries",)
