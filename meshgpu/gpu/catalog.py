"""Known accelerators: vendor, memory, compute capability and power, for fake GPUs and matching."""

from __future__ import annotations

from dataclasses import dataclass

from meshgpu.gpu._types import Vendor


@dataclass(frozen=True, slots=True)
class GPUModel:
    name: str
    vendor: Vendor
    memory_gb: int
    compute_capability: str | None
    power_w: int


_MODELS = [
    GPUModel("H100", "nvidia", 80, "9.0", 700),
    GPUModel("H200", "nvidia", 141, "9.0", 700),
    GPUModel("B200", "nvidia", 180, "10.0", 1000),
    GPUModel("GB200", "nvidia", 186, "10.0", 1200),
    GPUModel("A100", "nvidia", 80, "8.0", 400),
    GPUModel("A10G", "nvidia", 24, "8.6", 300),
    GPUModel("A10", "nvidia", 24, "8.6", 150),
    GPUModel("L40S", "nvidia", 48, "8.9", 350),
    GPUModel("L40", "nvidia", 48, "8.9", 300),
    GPUModel("L4", "nvidia", 24, "8.9", 72),
    GPUModel("RTX4090", "nvidia", 24, "8.9", 450),
    GPUModel("RTX6000", "nvidia", 48, "8.9", 300),
    GPUModel("A6000", "nvidia", 48, "8.6", 300),
    GPUModel("V100", "nvidia", 32, "7.0", 300),
    GPUModel("T4", "nvidia", 16, "7.5", 70),
    GPUModel("MI300X", "amd", 192, None, 750),
    GPUModel("MI325X", "amd", 256, None, 1000),
    GPUModel("MI355X", "amd", 288, None, 1400),
    GPUModel("MI250X", "amd", 128, None, 560),
    GPUModel("Gaudi2", "intel", 96, None, 600),
    GPUModel("Gaudi3", "intel", 128, None, 900),
]
CATALOG: dict[str, GPUModel] = {m.name.lower(): m for m in _MODELS}


def lookup(name: str) -> GPUModel | None:
    """Find a model by a name as users and drivers write it (``NVIDIA H100 80GB HBM3`` -> H100)."""
    key = name.lower().replace(" ", "").replace("-", "")
    if key in CATALOG:
        return CATALOG[key]
    # Driver names carry a vendor prefix and a memory/form-factor suffix; prefer the longest hit.
    hits = [m for k, m in CATALOG.items() if k in key]
    return max(hits, key=lambda m: len(m.name)) if hits else None
