"""``python: X.Y`` and ``nvcc: true`` place a process job only on hosts whose registration says
they have that interpreter (usable by their job user) or a CUDA toolkit; the others say why."""

from __future__ import annotations

from meshgpu.config.spec import compile_placement
from meshgpu.scheduler.filters import run_filters
from meshgpu.state import encode
from tests.scheduler._world import host, jobs, schedule, submit, task, world


def _host(name: str, pythons: list[str], nvcc: bool):  # type: ignore[no-untyped-def]
    return host(name, 2).model_copy(update={"pythons": pythons, "nvcc": nvcc})


def test_python_goes_to_a_host_that_has_the_version() -> None:
    sm = world(
        _host("old", ["3.9"], nvcc=True),
        _host("new", ["3.11", "3.12"], nvcc=False),
        submit("py", task(1, python="3.12")),
    )
    schedule(sm)
    assert jobs(sm, "py")[0].node_id == "new"


def test_a_missing_python_version_is_named_in_why_pending() -> None:
    sm = world(_host("h1", ["3.11", "3.12"], nvcc=False), submit("py", task(1, python="3.9")))
    schedule(sm)
    job = jobs(sm, "py")[0]
    assert job.node_id is None
    assert "h1 has no Python 3.9 (it has 3.11, 3.12)" in job.why_pending


def test_nvcc_needs_a_host_with_a_cuda_toolkit() -> None:
    sm = world(
        _host("bare", ["3.11"], nvcc=False),
        _host("devel", ["3.11"], nvcc=True),
        submit("cc", task(1, nvcc=True)),
    )
    schedule(sm)
    assert jobs(sm, "cc")[0].node_id == "devel"
    lonely = world(_host("bare", ["3.11"], nvcc=False), submit("cc", task(1, nvcc=True)))
    schedule(lonely)
    assert "bare has no CUDA toolkit" in jobs(lonely, "cc")[0].why_pending


def test_an_old_registration_without_toolchain_facts_decodes_and_takes_plain_jobs() -> None:
    old = host("h1", 2)  # no pythons, no nvcc: an entry from before these fields
    assert old.pythons == [] and old.nvcc is False
    # ... and encodes as it did then: older members can still read it.
    assert b"pythons" not in encode(old) and b"nvcc" not in encode(old)
    assert b'"pythons":["3.11"]' in encode(old.model_copy(update={"pythons": ["3.11"]}))
    sm = world(old, submit("plain", task(1)), submit("py", task(1, python="3.11")))
    schedule(sm)
    assert jobs(sm, "plain")[0].node_id == "h1"
    assert (
        "h1 has no Python 3.11 (it has none its job user can run)" in jobs(sm, "py")[0].why_pending
    )


def test_an_image_brings_its_own_toolchain() -> None:
    f = run_filters(compile_placement({"image": "ubuntu", "nvcc": True}))
    assert f.nvcc is False and f.python is None
    assert run_filters(compile_placement({"python": "3.10"})).python == "3.10"
