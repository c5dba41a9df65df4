"""GPU providers: fake GPUs, the NVML mapping (against a stand-in pynvml), amdsmi's guard."""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from meshgpu.gpu import (
    LINK_NUMA,
    LINK_NVLINK,
    FakeProvider,
    FakeSpecError,
    GPUProviderUnavailable,
    NoGPUs,
    collect_inventory,
    detect,
    host_info,
    parse_fake_spec,
)
from meshgpu.gpu.amd import AMDProvider, import_amdsmi
from meshgpu.gpu.nvml import NVMLProvider


def test_fake_spec_forms() -> None:
    gpus = parse_fake_spec("8xH100:80GB")
    assert [g.index for g in gpus] == list(range(8))
    assert {g.name for g in gpus} == {"H100"} and gpus[0].memory_mib == 80 * 1024
    assert gpus[0].compute_capability == "9.0" and gpus[0].vendor == "nvidia"
    assert len({g.uuid for g in gpus}) == 8 and all(g.uuid.startswith("GPU-") for g in gpus)
    assert [g.numa_node for g in gpus] == [0, 0, 0, 0, 1, 1, 1, 1]
    mixed = parse_fake_spec("2xMI300X, 1xT4, A100:40GB")
    assert [(g.name, g.vendor, g.memory_mib // 1024) for g in mixed] == [
        ("MI300X", "amd", 192),
        ("MI300X", "amd", 192),
        ("T4", "nvidia", 16),
        ("A100", "nvidia", 40),
    ]
    assert (
        parse_fake_spec("4xH100", seed="a")[0].uuid != parse_fake_spec("4xH100", seed="b")[0].uuid
    )
    assert parse_fake_spec("4xH100", seed="a") == parse_fake_spec("4xH100", seed="a")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("8xH100:80XB", "memory"),
        ("2xWeird", "give its memory"),
        ("0xH100", "1..64"),
        ("8x", "invalid fake"),
    ],
)
def test_fake_spec_errors(spec: str, fragment: str) -> None:
    with pytest.raises(FakeSpecError, match=fragment):
        parse_fake_spec(spec)


def test_fake_telemetry_follows_busy_gpus_and_overrides(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    p = FakeProvider("4xH100", state_file=state)
    p.set_busy({1})
    t = {s.index: s for s in p.telemetry()}
    assert t[1].utilization_pct > 50 > t[0].utilization_pct
    assert t[1].power_w > t[0].power_w and t[1].temperature_c > t[0].temperature_c
    assert all(s.healthy for s in t.values())
    p.set_state(2, healthy=False, reasons=["xid 79"])
    state.write_text(json.dumps({"3": {"temperature_c": 95.0}}))
    t = {s.index: s for s in p.telemetry()}
    assert not t[2].healthy and t[2].reasons == ("xid 79",)
    assert t[3].temperature_c == 95.0
    assert p.links()[0][1] == LINK_NVLINK


def test_fake_faults_are_injected_like_nvml_reports_them(tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    p = FakeProvider("4xH100", state_file=state)
    state.write_text(
        json.dumps(
            {
                "0": {"xid": 79},
                "1": {"ecc_uncorrected": 2},
                "2": {"xid": [48, 63], "healthy": True},  # said outright: healthy wins
                "3": {"bogus": 1},  # unknown knobs are ignored, not a crash
            }
        )
    )
    t = {s.index: s for s in p.telemetry()}
    assert not t[0].healthy and t[0].reasons == ("XID 79",)
    assert not t[1].healthy and t[1].reasons == ("2 uncorrected ECC errors",)
    assert t[2].healthy and t[2].reasons == ("XID 48", "XID 63")
    assert t[3].healthy
    state.write_text("{}")  # the fault clears
    assert all(s.healthy for s in p.telemetry())


def test_fake_links_split_by_numa_for_big_boxes() -> None:
    links = FakeProvider("16xH100").links()
    assert links[0][7] == LINK_NVLINK and links[0][8] == LINK_NUMA and links[3][3] == 0


def test_detect_and_inventory(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MESHGPU_FAKE_GPUS", "2xA100:40GB")
    p = detect()
    inv = collect_inventory(p, tmp_path)
    assert inv.provider == "fake" and len(inv.gpus) == 2 and inv.links[0][1] == LINK_NVLINK
    assert inv.host.cpu_count >= 1 and inv.host.memory_mib > 0 and inv.host.disk_total_gb > 0
    monkeypatch.delenv("MESHGPU_FAKE_GPUS")
    # This machine has no GPU driver: NVML and amdsmi both decline, and the host is CPU-only.
    assert isinstance(detect(), NoGPUs)


def test_host_info_on_missing_dir(tmp_path: Path) -> None:
    h = host_info(tmp_path / "not" / "yet")
    assert h.cpu_arch in ("x86", "arm") and h.disk_free_gb <= h.disk_total_gb


def test_amdsmi_import_is_guarded_and_quiet(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(GPUProviderUnavailable, match="amdsmi unavailable"):
        import_amdsmi()
    assert capsys.readouterr().out == ""
    with pytest.raises(GPUProviderUnavailable):
        AMDProvider()


# --- NVML mapping, against a stand-in for the pynvml module ------------------------------


class _NVMLError(Exception):
    pass


class _NotSupported(_NVMLError):
    pass


def _fake_pynvml(ecc_uncorrected: int = 0, lost: int | None = None) -> types.SimpleNamespace:
    def not_supported(*_: object) -> None:
        raise _NotSupported("Not Supported")

    def util(h: int) -> object:
        if h == lost:
            raise _NVMLError("GPU is lost")
        return types.SimpleNamespace(gpu=40 + h, memory=10)

    def mem(h: int, **_: object) -> object:
        if h == lost:
            raise _NVMLError("GPU is lost")
        return types.SimpleNamespace(total=80 * 1024**3, used=(1 + h) * 1024**3, free=0)

    return types.SimpleNamespace(
        NVMLError=_NVMLError,
        NVML_DEVICE_MIG_ENABLE=1,
        NVML_TEMPERATURE_GPU=0,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_MEMORY_ERROR_TYPE_CORRECTED=0,
        NVML_VOLATILE_ECC=0,
        NVML_P2P_CAPS_INDEX_NVLINK=3,
        NVML_P2P_STATUS_OK=0,
        NVML_TOPOLOGY_SYSTEM=50,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlSystemGetDriverVersion=lambda: b"550.54.15",
        nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
        nvmlDeviceGetUUID=lambda h: f"GPU-0000-{h}",
        nvmlDeviceGetMemoryInfo=mem,
        nvmlDeviceGetCudaComputeCapability=lambda h: (9, 0),
        nvmlDeviceGetPciInfo=lambda h: types.SimpleNamespace(
            busId=f"00000000:{h:02X}:00.0".encode()
        ),
        nvmlDeviceGetNumaNodeId=not_supported,
        nvmlDeviceGetMigMode=lambda h: (1 if h == 1 else 0, 0),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700000,
        nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetTemperature=lambda h, s: 50 + h,
        nvmlDeviceGetPowerUsage=lambda h: 300000,
        nvmlDeviceGetTotalEccErrors=lambda h, t, c: ecc_uncorrected if t == 1 else 3,
        nvmlDeviceGetRemappedRows=lambda h: (0, 0, 0, 0),
        nvmlDeviceGetP2PStatus=lambda a, b, i: 0,
        nvmlDeviceGetTopologyCommonAncestor=lambda a, b: 50,
    )


def test_nvml_inventory_and_telemetry_mapping() -> None:
    p = NVMLProvider(_fake_pynvml())
    inv = p.inventory()
    assert [(g.name, g.product_name, g.memory_mib, g.compute_capability) for g in inv][0] == (
        "H100",
        "NVIDIA H100 80GB HBM3",
        81920,
        "9.0",
    )
    assert inv[0].numa_node is None  # NotSupported becomes None, not a failure
    assert [g.mig_enabled for g in inv] == [False, True]
    assert inv[1].pci_bus_id == "00000000:01:00.0" and inv[0].power_limit_w == 700.0
    assert p.driver_version() == "550.54.15"
    t = p.telemetry()
    assert (t[1].utilization_pct, t[1].memory_used_mib, t[1].temperature_c, t[1].power_w) == (
        41.0,
        2048,
        51.0,
        300.0,
    )
    assert t[0].healthy and t[0].ecc_corrected == 3
    assert p.links() == [[0, LINK_NVLINK], [LINK_NVLINK, 0]]


def test_nvml_health() -> None:
    t = NVMLProvider(_fake_pynvml(ecc_uncorrected=2, lost=1)).telemetry()
    assert not t[0].healthy and "uncorrected ECC" in t[0].reasons[0]
    assert not t[1].healthy and "fallen off the bus" in t[1].reasons[0]


def test_nvml_unavailable_here() -> None:
    with pytest.raises(GPUProviderUnavailable, match="NVML unavailable"):
        NVMLProvider()
