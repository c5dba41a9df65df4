"""Scenario scripts in the etcd-io/raft datadriven style.

Each ``testdata/*.txt`` file is a sequence of blocks::

    command args...
    ----
    exact expected output

separated by blank lines (``#`` lines are comments). Run with ``REWRITE=1`` to regenerate the
expected output from the code, then review the change as a diff before committing it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from consensus.sim.interaction import InteractionEnv

TESTDATA = Path(__file__).parent / "testdata"
FILES = sorted(TESTDATA.glob("*.txt"))


def parse(text: str) -> list[tuple[list[str], str, list[str]]]:
    """Blocks of (leading comment/blank lines, command, expected output lines)."""
    blocks = []
    lines = text.splitlines()
    i = 0
    prefix: list[str] = []
    while i < len(lines):
        line = lines[i]
        if not line.strip() or line.startswith("#"):
            prefix.append(line)
            i += 1
            continue
        cmd = line
        i += 1
        if i >= len(lines) or lines[i] != "----":
            raise ValueError(f"line {i}: expected '----' after command {cmd!r}")
        i += 1
        expected = []
        while i < len(lines) and lines[i].strip():
            expected.append(lines[i])
            i += 1
        blocks.append((prefix, cmd, expected))
        prefix = []
    if prefix:
        blocks.append((prefix, "", []))
    return blocks


def render(blocks: list[tuple[list[str], str, list[str]]]) -> str:
    out: list[str] = []
    for prefix, cmd, expected in blocks:
        out += prefix
        if cmd:
            out += [cmd, "----", *expected]
    return "\n".join(out).rstrip("\n") + "\n"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_scenario(path: Path) -> None:
    blocks = parse(path.read_text())
    env = InteractionEnv()
    actual_blocks = []
    mismatches = []
    for prefix, cmd, expected in blocks:
        if not cmd:
            actual_blocks.append((prefix, cmd, expected))
            continue
        got = env.handle(cmd) or ["ok"]
        actual_blocks.append((prefix, cmd, got))
        if got != expected:
            mismatches.append((cmd, expected, got))
    if os.environ.get("REWRITE") == "1":
        path.write_text(render(actual_blocks))
        return
    if mismatches:
        cmd, expected, got = mismatches[0]
        pytest.fail(
            f"{path.name}: {len(mismatches)} block(s) differ; first: {cmd!r}\n"
            "--- expected\n"
            + "\n".join(expected)
            + "\n--- got\n"
            + "\n".join(got)
            + "\n(run with REWRITE=1 to regenerate, then review the diff)"
        )


def test_files_exist() -> None:
    assert len(FILES) >= 10
