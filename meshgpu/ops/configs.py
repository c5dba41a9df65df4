"""A run configuration from a request's YAML, or ``errors.Invalid`` with every located issue."""

from __future__ import annotations

from typing import Any

from meshgpu.errors import Invalid


def parse_run_config(text: str, filename: str, not_a_run: str) -> Any:
    """A run configuration (task, service, dev-environment) from a request's YAML; ``not_a_run``
    says what to do instead when the file is another kind. Blocks: use cases call
    ``parse_run_config_async``."""
    from meshgpu.config import ConfigError, parse_config

    try:
        config = parse_config(text, filename)
    except ConfigError as e:
        raise _invalid_config(e) from None
    return _run_only(config, not_a_run)


async def parse_run_config_async(text: str, filename: str, not_a_run: str) -> Any:
    """``parse_run_config`` in a worker thread under a deadline (``parse_config_async``), so a
    hostile or huge configuration never holds up the event loop."""
    from meshgpu.config import ConfigError, parse_config_async

    try:
        config = await parse_config_async(text, filename)
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
