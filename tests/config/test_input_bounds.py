"""Hostile or oversized input: refused with a located, actionable ConfigError, quickly, without
building what it would expand to (YAML alias bombs, deep nesting, huge text, lone surrogates,
environments a process cannot be started with)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import trio
from pydantic import ValidationError

from meshgpu.config import (
    ConfigError,
    TaskConfiguration,
    load_config,
    loader,
    parse_config,
)
from meshgpu.config.common import MAX_ENV_ENTRY_BYTES, MAX_ENV_TOTAL_BYTES
from meshgpu.ops import configs as ops_configs
from meshgpu.ops.configs import parse_config_async

ROOT = Path(__file__).resolve().parents[2]


def bomb(levels: int = 8, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` references to the one before: a few hundred
    bytes that expand to ``width ** levels`` scalars (43 million for 8 x 9)."""
    lines = ["type: task", "commands: [x]", "a0: &a0 [" + ",".join(["x"] * width) + "]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "f.yml")
    return [str(i) for i in info.value.issues]


def test_the_classic_alias_bomb_is_refused_at_the_alias_that_crosses_the_limit() -> None:
    # In a child process with 1 GiB of address space and a time limit: the unbounded parser
    # (which expanded every alias) grows past 18 GB on this input instead of failing.
    text = bomb()
    assert len(text) < 400
    code = textwrap.dedent(
        """
        import resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        from meshgpu.config import ConfigError, parse_config
        t = time.monotonic()
        try:
            parse_config(sys.stdin.read(), "bomb.yml")
        except ConfigError as e:
            print(f"{time.monotonic() - t:.3f}")
            print(e)
        """
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    elapsed, *message = r.stdout.splitlines()
    assert float(elapsed) < 0.5
    # Line 7 is the first anchor whose expansion passes 50 000 nodes (9**5 = 59049).
    assert message[1] == (
        "  bomb.yml:7:30: YAML aliases expand to more than 50000 nodes: write the values out or "
        "use fewer anchors"
    )


def test_a_smaller_bomb_is_refused_without_building_it() -> None:
    t = time.perf_counter()
    out = problems(bomb(levels=6))
    assert time.perf_counter() - t < 0.2
    assert out == [
        "f.yml:7:30: YAML aliases expand to more than 50000 nodes: write the values out or use "
        "fewer anchors"
    ]


def test_a_merge_key_bomb_is_counted_too() -> None:
    lines = [
        "type: task",
        "commands: [x]",
        "m0: &m0 {" + ", ".join(f"k{j}: v" for j in range(9)) + "}",
    ]
    for i in range(1, 7):
        refs = ", ".join(f"k{j}: *m{i - 1}" for j in range(9))
        lines.append(f"m{i}: &m{i} {{<<: *m{i - 1}, {refs}}}")
    out = problems("\n".join(lines) + "\n")
    assert len(out) == 1 and "YAML aliases expand to more than 50000 nodes" in out[0]


def test_an_alias_inside_its_own_anchor_is_refused_not_recursed_into() -> None:
    assert problems("type: task\ncommands: [x]\nx: &a [1, *a]\n") == [
        "f.yml:3:11: alias *a is inside the value of its own anchor &a, which makes it "
        "infinitely deep: refer to it after the value ends"
    ]


def test_too_many_aliases() -> None:
    text = "type: task\ncommands: [x]\na: &a x\nb: [" + ", ".join(["*a"] * 129) + "]\n"
    out = problems(text)
    assert out == [
        f"f.yml:4:{5 + 4 * 128}: more than 128 YAML aliases (*name): write the values out or use "
        "fewer aliases"
    ]


def test_aliases_that_expand_to_too_much_text() -> None:
    text = "type: task\ncommands: [x]\na: &a " + "y" * 200_000 + "\nb: [" + ", ".join(["*a"] * 6)
    out = problems(text + "]\n")
    assert out == [
        "f.yml:4:21: YAML aliases expand to more than 1048576 characters of values: write the "
        "values out or use fewer anchors"
    ]


def test_nesting_depth_written_out_and_through_aliases() -> None:
    assert problems("type: task\nx: " + "[" * 70 + "]" * 70 + "\n") == [
        "f.yml:2:67: nested more than 64 levels deep: flatten the structure"
    ]
    # Each anchor is 10 levels deep and holds the one before: 8 of them nest 80 levels.
    text = "type: task\ncommands: [x]\n" + "".join(
        f"a{i}: &a{i} " + "[" * 10 + (f"*a{i - 1}" if i else "x") + "]" * 10 + "\n"
        for i in range(8)
    )
    assert problems(text) == [
        "f.yml:9:19: with its aliases expanded, the value is nested more than 64 levels deep: "
        "write the values out or use fewer nested anchors"
    ]
    # Python's recursion limit is not what stops it (it was: RecursionError, a 500).
    assert problems("type: task\nx: " + "[" * 900 + "]" * 900 + "\n")


def test_too_many_values_without_aliases() -> None:
    text = "type: task\ncommands: [" + ",".join(["a"] * 60_000) + "]\n"
    assert problems(text) == [
        "f.yml:2:100002: more than 50000 values in one configuration: split it or keep the data "
        "in files the run reads"
    ]


def test_text_over_the_size_limit(tmp_path: Path) -> None:
    text = "type: task\ncommands:\n" + "  - echo " + "x" * (300 << 10) + "\n"
    assert problems(text) == [
        f"f.yml: the configuration is at least {len(text)} bytes, over the 262144-byte limit: "
        "keep large data (scripts, lists) in files the run reads instead"
    ]
    # Counted in UTF-8 bytes: 100 000 three-byte characters are 300 000 bytes.
    assert "300024 bytes" in problems("type: task\ncommands: [" + "€" * 100_000 + "]\n")[0]
    big = tmp_path / "big.yml"
    big.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(big)
    assert str(info.value.issues[0]).endswith(
        "over the 262144-byte limit: keep large data (scripts, lists) in files the run reads "
        "instead"
    )


def test_load_config_reads_text_as_before(tmp_path: Path) -> None:
    f = tmp_path / "t.yml"
    f.write_bytes(b"type: task\r\ncommands:\r\n  - |\r\n    echo a\r\n    echo b\r\n")
    config = load_config(f)
    assert config.commands == ["echo a\necho b\n"]  # type: ignore[union-attr]


def test_ordinary_anchors_and_merge_keys_still_work() -> None:
    config = parse_config(
        textwrap.dedent(
            """\
            type: service
            port: 8000
            replicas:
              - count: 1
                commands: &c [serve]
                resources: &r {gpu: 1}
              - count: 2
                commands: *c
                resources: {<<: *r, cpu: 4..}
            """
        )
    )
    first, second = config.groups  # type: ignore[union-attr]
    assert first.commands == second.commands == ["serve"]
    assert second.resources.gpu.count.min == 1 and second.resources.cpu.count.min == 4


def test_a_lone_surrogate_is_a_located_error() -> None:
    assert problems('type: task\ncommands: ["\ud800"]\n') == [
        "f.yml:2:13: character U+D800 is a lone UTF-16 surrogate, not text: remove it or write "
        "the character it was meant to be (a client sent half of a surrogate pair)"
    ]
    # In the file name (echoed in every issue) it is escaped, not an encoding error later.
    with pytest.raises(ConfigError) as info:
        parse_config("type: nope\n", "a\udc80.yml")
    str(info.value).encode("utf-8")
    assert info.value.issues[0].file == "a\\udc80.yml"


def test_a_value_its_explicit_tag_does_not_fit_is_a_located_error() -> None:
    # These raised ValueError/ConstructorError (HTTP 500) before.
    assert problems("type: task\ncommands: [!!binary xyz!]\n") == [
        "f.yml:2:12: commands[0]: cannot read this value as !!binary: failed to decode base64 "
        "data: Incorrect padding"
    ]
    assert problems("type: task\ncommands: [x]\nx: !!timestamp 2020-99-99\n") == [
        "f.yml:3:4: x: cannot read this value as !!timestamp: month must be in 1..12"
    ]
    out = problems("type: task\ncommands: [x]\nx: !!python/object:os.system ls\n")
    assert out[0].startswith("f.yml:3:4: x: cannot read this value as !!python/object:os.system")


def test_an_env_value_too_large_to_exec_is_refused_naming_the_variable() -> None:
    big = "v" * 200_000
    assert problems(f"type: task\ncommands: [x]\nenv:\n  SMALL: a\n  BIG: {big}\n") == [
        "f.yml:5:3: env.BIG: env BIG: the variable is 200005 bytes (BIG=VALUE), over Linux's "
        "131072-byte limit for one variable (the job could not start): put the value in a file "
        "the run reads and pass its path"
    ]
    out = problems(f"type: task\ncommands: [x]\nenv:\n  - BIG={big}\n")
    assert out[0].startswith("f.yml:4:3: env: env BIG: the variable is 200005 bytes")
    # The limit counts "KEY=", the value and the NUL, as the kernel does.
    fits = "v" * (MAX_ENV_ENTRY_BYTES - len("BIG=") - 1)
    parse_config(f"type: task\ncommands: [x]\nenv:\n  BIG: {fits}\n")
    assert problems(f"type: task\ncommands: [x]\nenv:\n  BIG: {fits}v\n")


def test_an_environment_too_large_in_total_is_refused() -> None:
    # A file within the text limit cannot hold 1 MiB of variables: the model's own check, for
    # configurations built from a mapping (and the API's overrides, tests/security).
    value = "v" * 100_000
    n = MAX_ENV_TOTAL_BYTES // 100_000 + 1
    ok = {"type": "task", "commands": ["x"], "env": {f"K{i}": value for i in range(n - 1)}}
    TaskConfiguration.model_validate(ok)
    with pytest.raises(ValidationError) as info:
        TaskConfiguration.model_validate(ok | {"env": {f"K{i}": value for i in range(n)}})
    assert (
        f"env: the variables up to K{n - 1} take more than 1048576 bytes, too many for a "
        "process's environment (the job could not start)"
    ) in str(info.value)


async def test_parse_config_async_answers_within_its_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    release = threading.Event()

    def slow(text: str, file: str) -> object:
        release.wait(10)
        return None

    monkeypatch.setattr(ops_configs, "parse_config", slow)
    t = trio.current_time()
    with pytest.raises(ConfigError) as info:
        await parse_config_async("type: task\n", "slow.yml", timeout=0.3)
    assert trio.current_time() - t < 2
    assert str(info.value.issues[0]) == (
        "slow.yml: reading the configuration took more than 0.3 s (this agent may be busy "
        "reading others): try again, or make the file smaller and simpler"
    )
    release.set()


async def test_parse_config_async_runs_a_few_parses_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running, most = 0, 0
    lock = threading.Lock()

    def counted(text: str, file: str) -> object:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        time.sleep(0.05)
        with lock:
            running -= 1
        return file

    monkeypatch.setattr(ops_configs, "parse_config", counted)
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(parse_config_async, "", f"{i}.yml")
    assert most == loader.PARSE_THREADS


async def test_parse_config_async_parses() -> None:
    config = await parse_config_async("type: task\ncommands: [x]\n", "a.yml")
    assert config.commands == ["x"]  # type: ignore[union-attr]
    with pytest.raises(ConfigError):
        await parse_config_async(bomb(), "bomb.yml")
