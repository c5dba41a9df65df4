"""What a host has (inventory) and how it is doing (telemetry), independent of the vendor API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

Vendor = Literal["nvidia", "amd", "google", "intel", "tenstorrent"]

# Link levels between two GPUs, best first; the scheduler prefers sets with low levels.
# NVLink/xGMI < same PCIe switch < same host bridge / NUMA node < across NUMA nodes.
LINK_NVLINK = 0
LINK_PCIE_SWITCH = 1
LINK_HOSTBRIDGE = 2
LINK_NUMA = 3
LINK_SYSTEM = 4


@dataclass(frozen=True, slots=True)
class GPUInfo:
    """Static facts about one GPU; ``index`` is what CUDA/HIP_VISIBLE_DEVICES take."""

    index: int
    uuid: str
    name: str  # canonical short name, as configurations write it: H100, MI300X
    vendor: Vendor
    memory_mib: int
    product_name: str | None = None  # what the driver says: "NVIDIA H100 80GB HBM3"
    compute_capability: str | None = None
    pci_bus_id: str | None = None
    numa_node: int | None = None
    mig_enabled: bool = False
    power_limit_w: float | None = None

    @property
    def memory_gb(self) -> float:
        return self.memory_mib / 1024


@dataclass(frozen=True, slots=True)
class GPUTelemetry:
    """One sample of one GPU; None where the device or driver does not report the value."""

    index: int
    utilization_pct: float | None = None
    memory_used_mib: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_uncorrected: int | None = None
    ecc_corrected: int | None = None
    healthy: bool = True
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class HostInfo:
    hostname: str
    cpu_count: int
    cpu_arch: Literal["x86", "arm"]
    memory_mib: int
    disk_total_gb: float
    disk_free_gb: float


@dataclass(frozen=True, slots=True)
class Inventory:
    """Everything a node registers about itself; goes through Raft (authoritative)."""

    host: HostInfo
    gpus: tuple[GPUInfo, ...] = ()
    provider: str = "none"
    driver_version: str | None = None
    # links[i][j] is the LINK_* level between GPU i and GPU j (diagonal 0); empty if unknown.
    links: tuple[tuple[int, ...], ...] = field(default=())


class GPUProvider(Protocol):
    """A source of GPU facts. Calls block (vendor C libraries): run them in a worker thread."""

    name: str

    def inventory(self) -> list[GPUInfo]: ...

    def telemetry(self) -> list[GPUTelemetry]: ...

    def links(self) -> list[list[int]]: ...

    def driver_version(self) -> str | None: ...

    def close(self) -> None: ...


class GPUProviderUnavailable(RuntimeError):
    """The vendor library or driver is not present on this host."""
