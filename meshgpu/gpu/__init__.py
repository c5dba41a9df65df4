"""GPU inventory and telemetry behind one interface: NVML, amdsmi, or fake GPUs.

``detect(fake_spec)`` picks fake GPUs when a spec is given (``--fake-gpus`` /
``MESHGPU_FAKE_GPUS``), else NVML, else amdsmi, else a host with no GPUs.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from meshgpu.gpu._types import (
    LINK_HOSTBRIDGE,
    LINK_NUMA,
    LINK_NVLINK,
    LINK_PCIE_SWITCH,
    LINK_SYSTEM,
    GPUInfo,
    GPUProvider,
    GPUProviderUnavailable,
    GPUTelemetry,
    HostInfo,
    Inventory,
)
from meshgpu.gpu.fake import FakeProvider, FakeSpecError, parse_fake_spec
from meshgpu.gpu.host import host_info

log = logging.getLogger(__name__)


class NoGPUs:
    """A host without accelerators (or whose driver is missing): CPU-only jobs still run."""

    name = "none"

    def inventory(self) -> list[GPUInfo]:
        return []

    def telemetry(self) -> list[GPUTelemetry]:
        return []

    def links(self) -> list[list[int]]:
        return []

    def driver_version(self) -> str | None:
        return None

    def close(self) -> None:
        pass


def detect(
    fake_spec: str | None = None, *, seed: str = "meshgpu", state_file: str | Path | None = None
) -> GPUProvider:
    spec = fake_spec if fake_spec is not None else os.environ.get("MESHGPU_FAKE_GPUS")
    if spec:
        return FakeProvider(spec, seed=seed, state_file=state_file)
    from meshgpu.gpu.amd import AMDProvider
    from meshgpu.gpu.nvml import NVMLProvider

    for cls in (NVMLProvider, AMDProvider):
        try:
            provider = cls()
        except GPUProviderUnavailable as e:
            log.info("gpu provider=%s unavailable reason=%s", cls.name, e)
            continue
        if provider.inventory():
            return provider
        provider.close()
    return NoGPUs()


def collect_inventory(provider: GPUProvider, data_dir: str | Path = "/") -> Inventory:
    """Blocking: call from a worker thread."""
    return Inventory(
        host=host_info(data_dir),
        gpus=tuple(provider.inventory()),
        provider=provider.name,
        driver_version=provider.driver_version(),
        links=tuple(tuple(row) for row in provider.links()),
    )


__all__ = [
    "LINK_HOSTBRIDGE",
    "LINK_NUMA",
    "LINK_NVLINK",
    "LINK_PCIE_SWITCH",
    "LINK_SYSTEM",
    "FakeProvider",
    "FakeSpecError",
    "GPUInfo",
    "GPUProvider",
    "GPUProviderUnavailable",
    "GPUTelemetry",
    "HostInfo",
    "Inventory",
    "NoGPUs",
    "collect_inventory",
    "detect",
    "host_info",
    "parse_fake_spec",
]
