"""Scalar grammars shared by every configuration: ranges, memory sizes and durations.

These follow dstack 0.22 exactly (``core/models/resources.py`` and ``duration.py``):

* a **range** is ``a..b`` with either end open (``2..``, ``..8``), a bare scalar ``8`` meaning
  ``8..8``, or a mapping ``{min, max}``; ``..`` alone and ``min > max`` are errors;
* a **memory size** is a number of GB, or a number with a case-insensitive ``MB``/``GB``/``TB``
  suffix (MB divides by 1024, TB multiplies by 1024);
* a **duration** is an int of seconds or ``<n><s|m|h|d|w>`` (compound ``1h30m`` is also taken).

Every parser raises ``ValueError`` with a message that says what was expected; pydantic turns
that into a located error.
"""

from __future__ import annotations

import math
import re
import typing
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, GetJsonSchemaHandler, model_serializer, model_validator
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema

T = TypeVar("T", int, float)

_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")
_MEMORY_UNITS = {"": 1.0, "gb": 1.0, "mb": 1.0 / 1024, "tb": 1024.0}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"^(?:\d+[smhdw])+$")
_DURATION_PART_RE = re.compile(r"(\d+)([smhdw])")


def parse_memory(value: Any) -> float:
    """Parse one memory size into GB (float)."""
    if isinstance(value, bool):
        raise ValueError(f"expected a memory size such as 24GB, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0 or not math.isfinite(value):
            raise ValueError(f"memory size must be a non-negative number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"expected a memory size such as 24GB, got {type(value).__name__}")
    m = _MEMORY_RE.match(value)
    if not m or m.group(2).lower() not in _MEMORY_UNITS:
        raise ValueError(
            f"invalid memory size {value!r}: use a number with an MB, GB or TB suffix, e.g. 512MB, 80GB, 2TB"
        )
    return float(m.group(1)) * _MEMORY_UNITS[m.group(2).lower()]


def format_memory(gb: float) -> str:
    """Print a memory size in the unit that keeps it whole, so parse(format(x)) == x."""
    if gb >= 1024 and (gb / 1024).is_integer():
        return f"{int(gb // 1024)}TB"
    if float(gb).is_integer():
        return f"{int(gb)}GB"
    mb = gb * 1024
    if mb.is_integer():
        return f"{int(mb)}MB"
    return f"{gb!r}GB"


def parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*\d+\s*", value):
        return int(value)
    raise ValueError(f"expected an integer, got {value!r}")


def parse_duration(value: Any) -> int:
    """Parse a duration into whole seconds."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration such as 30s, 5m, 2h, 1d, 1w, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        text = value.strip().replace(" ", "")
        if text.isdigit():
            return int(text)
        if _DURATION_RE.match(text):
            return sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART_RE.findall(text))
    raise ValueError(
        f"invalid duration {value!r}: use seconds (3600) or a number with s, m, h, d or w (30s, 5m, 2h, 1d, 1w)"
    )


def format_duration(seconds: int) -> str:
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


class Shorthand:
    """Mixin for models that also accept a short scalar form (``"A100:8"``, ``8080``, ``2..``).

    The JSON Schema then offers the short forms beside the mapping, so an editor does not flag
    the way people actually write these fields.
    """

    shorthand_schema: typing.ClassVar[list[dict[str, Any]]] = [
        {"type": "string"},
        {"type": "integer"},
    ]

    @classmethod
    def __get_pydantic_json_schema__(
        cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        mapping = handler(core_schema)
        return {"anyOf": [*cls.shorthand_schema, mapping]}


class _Range(Shorthand, BaseModel, Generic[T]):
    """A closed or half-open interval ``min..max``; ``None`` is an open end."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min: T | None = None
    max: T | None = None

    @classmethod
    def _parse_scalar(cls, value: Any) -> T:  # pragma: no cover - overridden
        raise NotImplementedError

    @classmethod
    def _format_scalar(cls, value: T) -> str:
        return str(value)

    @model_validator(mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if isinstance(value, _Range):
            return {"min": value.min, "max": value.max}
        if isinstance(value, dict):
            out = dict(value)
            for k in ("min", "max"):
                if out.get(k) is not None:
                    out[k] = cls._parse_scalar(out[k])
            return out
        if isinstance(value, str) and ".." in value:
            text = value.replace(" ", "")
            lo, _, hi = text.partition("..")
            if not lo and not hi:
                raise ValueError("a range needs at least one end: use 2.., ..8 or 2..8")
            if ".." in hi:
                raise ValueError(f"invalid range {value!r}: use min..max, e.g. 2..8")
            return {
                "min": cls._parse_scalar(lo) if lo else None,
                "max": cls._parse_scalar(hi) if hi else None,
            }
        scalar = cls._parse_scalar(value)
        return {"min": scalar, "max": scalar}

    @model_validator(mode="after")
    def _check_order(self) -> _Range[T]:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(
                f"impossible range: min {self._format_scalar(self.min)} is greater than max "
                f"{self._format_scalar(self.max)}"
            )
        return self

    def __str__(self) -> str:
        lo = "" if self.min is None else self._format_scalar(self.min)
        hi = "" if self.max is None else self._format_scalar(self.max)
        if self.min is not None and self.min == self.max:
            return lo
        return f"{lo}..{hi}"

    def contains(self, value: T) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    @model_serializer(mode="plain")
    def _dump(self) -> dict[str, Any]:
        return {"min": self.min, "max": self.max}


class IntRange(_Range[int]):
    """A range of counts (CPUs, GPUs, nodes, replicas)."""

    @classmethod
    def _parse_scalar(cls, value: Any) -> int:
        n = parse_int(value)
        if n < 0:
            raise ValueError(f"expected a non-negative integer, got {value!r}")
        return n


class MemoryRange(_Range[float]):
    """A range of memory sizes in GB."""

    @classmethod
    def _parse_scalar(cls, value: Any) -> float:
        return parse_memory(value)

    @classmethod
    def _format_scalar(cls, value: float) -> str:
        return format_memory(value)
