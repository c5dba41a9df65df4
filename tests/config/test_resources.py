"""The resources grammar: dstack's verified parses, round trips and ranges that never invert."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from meshgpu.config import GPUSpec, IntRange, MemoryRange, ResourcesSpec, parse_memory
from meshgpu.config.resources import CPUSpec, DiskSpec


def gpu(spec: object) -> dict[str, object]:
    return GPUSpec.model_validate(spec).model_dump()


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("24GB..80GB:2", {"memory": {"min": 24.0, "max": 80.0}, "count": {"min": 2, "max": 2}}),
        ("A100:8", {"name": ["A100"], "count": {"min": 8, "max": 8}}),
        ("nvidia:1", {"vendor": "nvidia", "count": {"min": 1, "max": 1}}),
        (
            "H100,A100:4:80GB",
            {
                "name": ["H100", "A100"],
                "count": {"min": 4, "max": 4},
                "memory": {"min": 80.0, "max": 80.0},
            },
        ),
        (
            "A100:40GB..:1..2",
            {"name": ["A100"], "memory": {"min": 40.0, "max": None}, "count": {"min": 1, "max": 2}},
        ),
        ("A100", {"name": ["A100"], "count": {"min": 1, "max": None}}),
        (
            "tpu-v5litepod-8",
            {"vendor": "google", "name": ["v5litepod-8"], "count": {"min": 1, "max": None}},
        ),
        ("v5litepod-8", {"name": ["v5litepod-8"], "count": {"min": 1, "max": None}}),
        ("24GB", {"memory": {"min": 24.0, "max": 24.0}, "count": {"min": 1, "max": None}}),
        (
            "tt:galaxy-wh",
            {"vendor": "tenstorrent", "name": ["galaxy-wh"], "count": {"min": 1, "max": None}},
        ),
        ("AMD:MI300X:8", {"vendor": "amd", "name": ["MI300X"], "count": {"min": 8, "max": 8}}),
        ("1..8", {"count": {"min": 1, "max": 8}}),
        ("..4", {"count": {"min": None, "max": 4}}),
        (2, {"count": {"min": 2, "max": 2}}),
        (0, {"count": {"min": 0, "max": 0}}),
        ("512MB:1", {"memory": {"min": 0.5, "max": 0.5}, "count": {"min": 1, "max": 1}}),
        (
            {"name": "H100", "count": 2, "total_memory": "160GB..", "compute_capability": 9.0},
            {
                "name": ["H100"],
                "count": {"min": 2, "max": 2},
                "total_memory": {"min": 160.0, "max": None},
                "compute_capability": "9.0",
            },
        ),
    ],
)
def test_gpu_grammar(spec: object, expected: dict[str, object]) -> None:
    base = {
        "vendor": None,
        "name": None,
        "count": {"min": 1, "max": None},
        "memory": None,
        "total_memory": None,
        "compute_capability": None,
    }
    assert gpu(spec) == base | expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("A100:8:8", "count twice"),
        ("A100::8", "empty token"),
        ("8..2", "impossible range"),
        ("A100:80XB", "invalid memory size"),
        ("..", "at least one end"),
        (True, "expected a GPU spec"),
        ({"vendor": "acme"}, "unknown GPU vendor"),
        ({"compute_capability": "nine"}, "compute capability"),
    ],
)
def test_gpu_grammar_errors(spec: object, fragment: str) -> None:
    with pytest.raises(ValidationError, match=fragment):
        GPUSpec.model_validate(spec)


def test_defaults_are_dstacks() -> None:
    r = ResourcesSpec()
    assert (r.cpu.count.min, r.cpu.count.max) == (2, None)
    assert (r.memory.min, r.memory.max) == (8.0, None)
    assert (r.disk.size.min, r.disk.size.max) == (100.0, None)
    assert (r.gpu.count.min, r.gpu.count.max) == (0, None)
    assert r.shm_size is None


def test_cpu_and_disk_forms() -> None:
    assert CPUSpec.model_validate("arm:8").model_dump() == {
        "arch": "arm",
        "count": {"min": 8, "max": 8},
    }
    assert CPUSpec.model_validate("4..:x86").arch == "x86"
    assert CPUSpec.model_validate({"arch": "aarch64", "count": "2.."}).arch == "arm"
    assert DiskSpec.model_validate("1TB..").size.min == 1024.0
    assert DiskSpec.model_validate({"size": "200GB..400GB"}).size.max == 400.0
    with pytest.raises(ValidationError, match="unknown CPU architecture"):
        CPUSpec.model_validate("sparc:4")


def test_memory_units() -> None:
    assert parse_memory("512MB") == 0.5
    assert parse_memory("2tb") == 2048.0
    assert parse_memory(16) == 16.0
    assert parse_memory("1.5GB") == 1.5
    with pytest.raises(ValueError, match="MB, GB or TB"):
        parse_memory("16 gigs")


# --- properties ---------------------------------------------------------------------------

_counts = st.integers(min_value=0, max_value=1024)
_gb = st.sampled_from([0.5, 1.0, 8.0, 16.0, 24.0, 40.0, 80.0, 141.0, 192.0, 1024.0, 2048.0, 0.25])


def _ranges(values: st.SearchStrategy, cls: type) -> st.SearchStrategy:
    def build(lo: object, hi: object) -> object:
        if lo is not None and hi is not None and lo > hi:
            lo, hi = hi, lo
        return cls(min=lo, max=hi)

    return st.builds(build, st.none() | values, st.none() | values).filter(
        lambda r: r.min is not None or r.max is not None
    )


_names = st.lists(
    st.from_regex(r"[A-Z][A-Za-z0-9-]{0,10}", fullmatch=True).filter(
        lambda n: (
            n.lower() not in {"nvidia", "amd", "google", "tpu", "intel", "tt", "tenstorrent"}
            and not n.lower().startswith("tpu-")
        )
    ),
    min_size=1,
    max_size=3,
)
_gpus = st.builds(
    GPUSpec,
    vendor=st.none() | st.sampled_from(["nvidia", "amd", "google", "intel", "tenstorrent"]),
    name=st.none() | _names,
    count=_ranges(_counts, IntRange),
    memory=st.none() | _ranges(_gb, MemoryRange),
    total_memory=st.none() | _ranges(_gb, MemoryRange),
    compute_capability=st.none() | st.sampled_from(["7.5", "8.0", "9.0"]),
)
_resources = st.builds(
    ResourcesSpec,
    cpu=st.builds(
        CPUSpec, arch=st.none() | st.sampled_from(["x86", "arm"]), count=_ranges(_counts, IntRange)
    ),
    memory=_ranges(_gb, MemoryRange),
    shm_size=st.none() | _gb,
    gpu=_gpus,
    disk=st.builds(DiskSpec, size=_ranges(_gb, MemoryRange)),
)


@settings(max_examples=300, deadline=None)
@given(_resources)
def test_parse_print_roundtrip(spec: ResourcesSpec) -> None:
    assert ResourcesSpec.model_validate(spec.to_spec()) == spec


@settings(max_examples=300, deadline=None)
@given(_gpus)
def test_gpu_print_parse_roundtrip(spec: GPUSpec) -> None:
    assert GPUSpec.model_validate(spec.to_spec()) == spec


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(_counts, st.text(alphabet="0123456789.", max_size=8)), st.one_of(_counts, st.none())
)
def test_ranges_never_invert(a: object, b: object) -> None:
    text = f"{a}..{'' if b is None else b}"
    try:
        r = IntRange.model_validate(text)
    except ValidationError:
        return
    assert r.min is None or r.max is None or r.min <= r.max
