"""AMD GPUs through amdsmi. The PyPI wheel prints to stdout and raises KeyError at import when
``libamd_smi.so`` is missing (reference/python-stack-notes.md §6), so the import is guarded."""

from __future__ import annotations

import contextlib
import io
import logging
from typing import Any

from meshgpu.gpu._types import GPUInfo, GPUProviderUnavailable, GPUTelemetry
from meshgpu.gpu.catalog import lookup

log = logging.getLogger(__name__)


def import_amdsmi() -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            import amdsmi
        except (ImportError, OSError, KeyError) as e:
            raise GPUProviderUnavailable(f"amdsmi unavailable: {type(e).__name__}: {e}") from None
    return amdsmi


class AMDProvider:
    name = "amdsmi"

    def __init__(self, amdsmi: Any | None = None) -> None:
        self._a = amdsmi if amdsmi is not None else import_amdsmi()
        try:
            self._a.amdsmi_init(self._a.AmdSmiInitFlags.INIT_AMD_GPUS)
            self._handles = list(self._a.amdsmi_get_processor_handles())
        except Exception as e:  # AmdSmiException and friends; the library defines many
            raise GPUProviderUnavailable(f"amdsmi init failed: {e}") from e

    def _try(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Exception as e:  # amdsmi raises its own exception tree per call
            log.debug("amdsmi call=%s error=%s", getattr(fn, "__name__", fn), e)
            return None

    def driver_version(self) -> str | None:
        if not self._handles:
            return None
        info = self._try(self._a.amdsmi_get_gpu_driver_info, self._handles[0])
        return info.get("driver_version") if isinstance(info, dict) else None

    def inventory(self) -> list[GPUInfo]:
        out = []
        for i, h in enumerate(self._handles):
            asic = self._try(self._a.amdsmi_get_gpu_asic_info, h) or {}
            product = str(asic.get("market_name") or "AMD GPU")
            model = lookup(product)
            total = self._try(self._a.amdsmi_get_gpu_memory_total, h, self._a.AmdSmiMemoryType.VRAM)
            out.append(
                GPUInfo(
                    index=i,
                    uuid=str(self._try(self._a.amdsmi_get_gpu_device_uuid, h) or f"amd-{i}"),
                    name=model.name if model else product,
                    vendor="amd",
                    memory_mib=int((total or 0) // (1024 * 1024)),
                    product_name=product,
                    pci_bus_id=self._try(self._a.amdsmi_get_gpu_device_bdf, h),
                )
            )
        return out

    def _pending_pages(self, h: Any) -> int:
        """Bad pages waiting to be retired (a reset retires them); 0 when not reported."""
        pages = self._try(self._a.amdsmi_get_gpu_bad_page_info, h)
        if not isinstance(pages, list):
            return 0
        return sum(
            1
            for p in pages
            if isinstance(p, dict) and "PENDING" in str(p.get("status", "")).upper()
        )

    def telemetry(self) -> list[GPUTelemetry]:
        """One sample per GPU. Health: uncorrectable ECC errors, bad pages pending retirement,
        and a GPU that answers none of the queries (gone from the bus, or a hung driver)."""
        out = []
        for i, h in enumerate(self._handles):
            act = self._try(self._a.amdsmi_get_gpu_activity, h)
            vram = self._try(self._a.amdsmi_get_gpu_vram_usage, h)
            power = self._try(self._a.amdsmi_get_power_info, h)
            if act is None and vram is None and power is None:
                out.append(
                    GPUTelemetry(
                        index=i, healthy=False, reasons=("GPU does not answer amdsmi queries",)
                    )
                )
                continue
            act, vram, power = act or {}, vram or {}, power or {}
            ecc = self._try(self._a.amdsmi_get_gpu_total_ecc_count, h) or {}
            ue = ecc.get("uncorrectable_count")
            reasons = [f"{ue} uncorrectable ECC errors"] if ue else []
            if self._pending_pages(h):
                reasons.append("retired pages pending (reset the GPU)")
            out.append(
                GPUTelemetry(
                    index=i,
                    utilization_pct=act.get("gfx_activity"),
                    memory_used_mib=vram.get("vram_used"),
                    power_w=power.get("current_socket_power") or power.get("average_socket_power"),
                    ecc_uncorrected=ue,
                    ecc_corrected=ecc.get("correctable_count"),
                    healthy=not reasons,
                    reasons=tuple(reasons),
                )
            )
        return out

    def links(self) -> list[list[int]]:
        return []

    def close(self) -> None:
        self._try(self._a.amdsmi_shut_down)
