"""A run configuration from a request's YAML, or ``errors.Invalid`` with every located issue."""

from __future__ import annotations

from typing import Any

import trio

from meshgpu.config import ConfigError, Configuration, parse_config
from meshgpu.config.errors import ConfigIssue
from meshgpu.config.loader import PARSE_THREADS, PARSE_TIMEOUT, parse_config_located, printable
from meshgpu.config.support import MeshCapabilities, check_config
from meshgpu.errors import Invalid

_NO_CHECK: Any = object()  # ``caps`` default: parse only (no ``check_support``)


def parse_run_config(text: str, filename: str, not_a_run: str) -> Any:
    """A run configuration (task, service, dev-environment) from a request's YAML; ``not_a_run``
    says what to do instead when the file is another kind. Blocks: use cases call
    ``parse_run_config_async``."""
    try:
        config = parse_config(text, filename)
    except ConfigError as e:
        raise _invalid_config(e) from None
    return _run_only(config, not_a_run)


async def parse_run_config_async(
    text: str, filename: str, not_a_run: str, caps: MeshCapabilities | None = _NO_CHECK
) -> Any:
    """``parse_run_config`` in a worker thread under a deadline (``parse_config_async``), so a
    hostile or huge configuration never holds up the event loop. With ``caps`` (None: offline),
    the same thread also checks that every field is honoured (``config/support.py``): a refused
    field is an issue at its line like a parse error."""
    try:
        config = await parse_config_async(text, filename, caps=caps)
    except ConfigError as e:
        raise _invalid_config(e) from None
    return _run_only(config, not_a_run)


def _invalid_config(e: Any) -> Invalid:
    return Invalid(
        "invalid configuration", str(e), "invalid_config", issues=[i.to_dict() for i in e.issues]
    )


def _run_only(config: Any, not_a_run: str) -> Any:
    from meshgpu.config.runs import BaseRunConfiguration

    if not isinstance(config, BaseRunConfiguration):
        raise Invalid(
            f"{config.type} configurations are not runs",
            not_a_run.format(type=config.type),
            "not_a_run",
        )
    return config


def parse_and_check(
    text: str, file: str, caps: MeshCapabilities | None = _NO_CHECK
) -> Configuration:
    """``parse_config``, then (unless ``caps`` is left out) ``check_support`` with ``caps``:
    a ConfigError lists the parse errors, or else the refused fields."""
    if caps is _NO_CHECK:
        return parse_config(text, file)
    config, positions = parse_config_located(text, file)
    issues = check_config(config, positions, caps)
    if issues:
        raise ConfigError(issues)
    return config


async def parse_config_async(
    text: str,
    file: str = "<string>",
    timeout: float = PARSE_TIMEOUT,
    caps: MeshCapabilities | None = _NO_CHECK,
) -> Configuration:
    """``parse_config`` off the event loop: in a worker thread (``PARSE_THREADS`` at most), with
    an answer within ``timeout`` seconds; past it, a ConfigError (the thread, which cannot be
    stopped, finishes on its own and keeps its slot until then). With ``caps``, the thread also
    checks the fields (``parse_and_check``)."""
    global _PARSE_LIMITER
    if _PARSE_LIMITER is None:
        _PARSE_LIMITER = trio.lowlevel.RunVar("meshgpu.ops.parse_limiter")
    limiter = _PARSE_LIMITER.get(None)
    if limiter is None:
        limiter = trio.CapacityLimiter(PARSE_THREADS)
        _PARSE_LIMITER.set(limiter)
    with trio.move_on_after(timeout):
        return await trio.to_thread.run_sync(
            parse_and_check, text, file, caps, abandon_on_cancel=True, limiter=limiter
        )
    raise ConfigError(
        [
            ConfigIssue(
                printable(file),
                None,
                None,
                "",
                f"reading the configuration took more than {timeout:g} s (this agent may be busy "
                "reading others): try again, or make the file smaller and simpler",
            )
        ]
    )


# One limiter per trio run (a CapacityLimiter belongs to the run that uses it).
_PARSE_LIMITER: Any = None
