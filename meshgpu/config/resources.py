"""The ``resources`` grammar of dstack 0.22 (``core/models/resources.py``), parsed and printed.

``gpu`` takes an int (count), a range, or ``:``-separated tokens in any order: a vendor
(``nvidia``, ``amd``, ``google``/``tpu``, ``intel``, ``tt``/``tenstorrent``), a comma-separated
list of names (a token that starts with a letter), a per-GPU memory or memory range (a token that
contains a letter but does not start with one) and a count or count range (digits). A GPU given
as a string without a count means ``1..``; no ``gpu`` at all means ``0..`` (CPU-only offers
match). ``cpu`` takes a count, a range, or ``arch:count`` tokens. Memory units are GB.

Each spec prints back to the grammar (``str()``), and ``parse(print(x)) == x`` holds (tested with
Hypothesis); a spec that the short string form cannot express (``total_memory``,
``compute_capability``) prints as a mapping.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from meshgpu.config._units import IntRange, MemoryRange, Shorthand, format_memory, parse_memory
from meshgpu.config.common import MemorySchema

GPUVendor = Literal["nvidia", "amd", "google", "intel", "tenstorrent"]
CPUArch = Literal["x86", "arm"]

_VENDOR_ALIASES: dict[str, GPUVendor] = {
    "nvidia": "nvidia",
    "amd": "amd",
    "google": "google",
    "tpu": "google",
    "intel": "intel",
    "tt": "tenstorrent",
    "tenstorrent": "tenstorrent",
}
_ARCH_ALIASES: dict[str, CPUArch] = {
    "x86": "x86",
    "x86_64": "x86",
    "amd64": "x86",
    "arm": "arm",
    "arm64": "arm",
    "aarch64": "arm",
}
_COMPUTE_CAPABILITY_RE = re.compile(r"^\s*(\d+)\.(\d+)\s*$")

DEFAULT_CPU_COUNT = IntRange(min=2, max=None)
DEFAULT_MEMORY = MemoryRange(min=8.0, max=None)
DEFAULT_DISK = MemoryRange(min=100.0, max=None)
DEFAULT_GPU_COUNT = IntRange(min=1, max=None)
NO_GPU_COUNT = IntRange(min=0, max=None)


def parse_vendor(token: str) -> GPUVendor | None:
    return _VENDOR_ALIASES.get(token.strip().lower())


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CPUSpec(Shorthand, _Spec):
    """CPU requirement: architecture (optional) and a count range."""

    arch: CPUArch | None = None
    count: IntRange = DEFAULT_CPU_COUNT

    @field_validator("arch", mode="before")
    @classmethod
    def _arch(cls, v: Any) -> Any:
        if isinstance(v, str):
            arch = _ARCH_ALIASES.get(v.strip().lower())
            if arch is None:
                raise ValueError(f"unknown CPU architecture {v!r}: use x86 or arm")
            return arch
        return v

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError(
                "expected a CPU count, a range such as 4..8, or arch:count such as arm:8"
            )
        if isinstance(v, (int, float)):
            return {"count": v}
        if isinstance(v, str):
            spec: dict[str, Any] = {}
            for token in v.replace(" ", "").split(":"):
                if not token:
                    raise ValueError(
                        f"CPU spec {v!r} has an empty token: use arch:count, e.g. x86:4.."
                    )
                key = "arch" if token.lower() in _ARCH_ALIASES or token[0].isalpha() else "count"
                if key in spec:
                    raise ValueError(f"CPU spec {v!r} gives the {key} twice")
                spec[key] = token
            return spec
        return v

    def __str__(self) -> str:
        return ":".join(p for p in (self.arch, str(self.count)) if p)


class GPUSpec(Shorthand, _Spec):
    """GPU requirement; all fields are conjunctive constraints on one host's GPUs."""

    vendor: GPUVendor | None = None
    name: list[str] | None = None
    count: IntRange = DEFAULT_GPU_COUNT
    memory: MemoryRange | None = Field(default=None, description="Per-GPU memory, GB")
    total_memory: MemoryRange | None = Field(default=None, description="Sum over the GPUs, GB")
    compute_capability: str | None = Field(default=None, description="Minimum, e.g. 8.0")

    @field_validator("vendor", mode="before")
    @classmethod
    def _vendor(cls, v: Any) -> Any:
        if isinstance(v, str):
            vendor = parse_vendor(v)
            if vendor is None:
                raise ValueError(
                    f"unknown GPU vendor {v!r}: use nvidia, amd, google (tpu), intel or tenstorrent (tt)"
                )
            return vendor
        return v

    @field_validator("name", mode="before")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = v.split(",")
        if isinstance(v, list):
            names = [str(n).strip() for n in v]
            if not names or any(not n for n in names):
                raise ValueError("GPU names must be non-empty, e.g. H100 or H100,A100")
            return names
        return v

    @field_validator("compute_capability", mode="before")
    @classmethod
    def _cc(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, (list, tuple)) and len(v) == 2:
            v = f"{v[0]}.{v[1]}"
        m = _COMPUTE_CAPABILITY_RE.match(str(v))
        if not m or isinstance(v, bool):
            raise ValueError(f"invalid compute capability {v!r}: use major.minor, e.g. 8.0")
        return f"{int(m.group(1))}.{int(m.group(2))}"

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, bool):
            raise ValueError("expected a GPU spec such as 1, A100:8, H100:80GB:2 or 24GB..:1..2")
        if isinstance(v, (int, float)):
            return {"count": v}
        if isinstance(v, str):
            spec: dict[str, Any] = {}

            def put(key: str, value: Any) -> None:
                if key in spec:
                    raise ValueError(f"GPU spec {v!r} gives the {key} twice")
                spec[key] = value

            for token in v.replace(" ", "").split(":"):
                if not token:
                    raise ValueError(f"GPU spec {v!r} has an empty token: use e.g. A100:80GB:8")
                vendor = parse_vendor(token)
                if vendor is not None:
                    put("vendor", vendor)
                elif token[0].isalpha():
                    if token.lower().startswith("tpu-"):
                        # dstack's deprecated TPU form: tpu-v5litepod-8 means google v5litepod-8.
                        put("vendor", "google")
                        token = token[4:]
                    put("name", token.split(","))
                elif any(c.isalpha() for c in token):
                    put("memory", token)
                else:
                    put("count", token)
            return spec
        return v

    def is_string_form(self) -> bool:
        return self.total_memory is None and self.compute_capability is None

    def __str__(self) -> str:
        parts: list[str] = []
        if self.vendor:
            parts.append(self.vendor)
        if self.name:
            parts.append(",".join(self.name))
        if self.memory is not None:
            parts.append(str(self.memory))
        parts.append(str(self.count))
        return ":".join(parts)

    def to_spec(self) -> str | dict[str, Any]:
        """The shortest configuration form that parses back to this spec."""
        if self.is_string_form():
            return str(self)
        out: dict[str, Any] = {"count": str(self.count)}
        if self.vendor:
            out["vendor"] = self.vendor
        if self.name:
            out["name"] = list(self.name)
        for key in ("memory", "total_memory"):
            rng = getattr(self, key)
            if rng is not None:
                out[key] = str(rng)
        if self.compute_capability:
            out["compute_capability"] = self.compute_capability
        return out


class DiskSpec(Shorthand, _Spec):
    size: MemoryRange = DEFAULT_DISK

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, v: Any) -> Any:
        if isinstance(v, dict) and "size" in v:
            return v
        if isinstance(v, (str, int, float)) and not isinstance(v, bool):
            return {"size": v}
        return v

    def __str__(self) -> str:
        return str(self.size)


class ResourcesSpec(_Spec):
    """What one job needs from one host."""

    cpu: CPUSpec = CPUSpec()
    memory: MemoryRange = DEFAULT_MEMORY
    shm_size: Annotated[float | None, MemorySchema] = Field(
        default=None, description="Shared memory, GB"
    )
    gpu: GPUSpec = GPUSpec(count=NO_GPU_COUNT)
    disk: DiskSpec = DiskSpec()

    @field_validator("shm_size", mode="before")
    @classmethod
    def _shm(cls, v: Any) -> Any:
        return None if v is None else parse_memory(v)

    @field_validator("gpu", mode="before")
    @classmethod
    def _gpu(cls, v: Any) -> Any:
        # An explicit ``gpu:`` with no value keeps dstack's "no GPU requirement" default.
        return GPUSpec(count=NO_GPU_COUNT) if v is None else v

    def to_spec(self) -> dict[str, Any]:
        """Configuration form (the ``resources:`` mapping) that parses back to this spec."""
        out: dict[str, Any] = {
            "cpu": str(self.cpu),
            "memory": str(self.memory),
            "gpu": self.gpu.to_spec(),
            "disk": str(self.disk),
        }
        if self.shm_size is not None:
            out["shm_size"] = format_memory(self.shm_size)
        return out

    def summary(self) -> str:
        """One line for plan tables: ``cpu=2.. mem=8GB.. disk=100GB.. gpu=H100:80GB:8``."""
        parts = [f"cpu={self.cpu}", f"mem={self.memory}", f"disk={self.disk}"]
        if self.gpu.count.max != 0:
            parts.append(f"gpu={self.gpu.to_spec()}")
        if self.shm_size is not None:
            parts.append(f"shm={format_memory(self.shm_size)}")
        return " ".join(parts)


def parse_resources(value: Any) -> ResourcesSpec:
    return ResourcesSpec.model_validate(value if value is not None else {})
