"""The job-environment fields compile into the run's spec: ``python``, ``nvcc``, the one repo
(with ``single_branch``'s per-type default) and the ``files`` mappings."""

from __future__ import annotations

from meshgpu.config import parse_config
from meshgpu.config.render import to_json
from meshgpu.config.spec import FileMap, RepoSpecC, compile_run


def _spec(text: str):  # type: ignore[no-untyped-def]
    return compile_run(to_json(parse_config(text)))


def test_environment_fields_compile() -> None:
    spec = _spec(
        """
type: task
python: 3.1
nvcc: true
repos:
  - url: https://example.com/r.git
    branch: dev
    hash: abc123
    path: /src
    if_exists: skip
files: [a.txt, "b:/tmp/b"]
commands: [ls]
"""
    )
    assert spec.python == "3.10" and spec.nvcc is True
    assert spec.repo == RepoSpecC(
        url="https://example.com/r.git",
        branch="dev",
        hash="abc123",
        path="/src",
        if_exists="skip",
        single_branch=True,
    )
    assert spec.files == (FileMap("a.txt", "a.txt"), FileMap("b", "/tmp/b"))
    assert spec.placement.python == "3.10" and spec.placement.nvcc is True


def test_defaults_and_per_type_single_branch() -> None:
    plain = _spec("type: task\ncommands: [ls]\n")
    assert (plain.python, plain.nvcc, plain.repo, plain.files) == (None, False, None, ())
    dev = _spec("type: dev-environment\nrepos: ['.']\n")
    assert dev.repo == RepoSpecC(local_path=".", single_branch=False)
    # A different interpreter is a different placement class (hosts differ in what they have).
    assert _spec("type: task\npython: '3.9'\ncommands: [ls]\n").placement.key != plain.placement.key
