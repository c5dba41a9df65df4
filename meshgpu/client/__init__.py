"""The Python client of a meshgpu mesh (the CLI uses it; so can users' scripts).

Names are imported on first use: ``meshgpu ssh-proxy`` (run by ssh for every connection) needs
only ``meshgpu.client.profile`` and ``meshgpu.client.tunnel``, not httpx."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from meshgpu.client.archive import (
        DEFAULT_CODE_LIMIT,
        CodeTooLarge,
        extract_archive,
        make_archive,
    )
    from meshgpu.client.http import Client
    from meshgpu.client.profile import APIError, load_profile

_WHERE = {
    "DEFAULT_CODE_LIMIT": "archive",
    "CodeTooLarge": "archive",
    "extract_archive": "archive",
    "make_archive": "archive",
    "APIError": "profile",
    "Client": "http",
    "load_profile": "profile",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'meshgpu.client' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"meshgpu.client.{module}"), name)
    globals()[name] = value
    return value


__all__ = [
    "DEFAULT_CODE_LIMIT",
    "APIError",
    "Client",
    "CodeTooLarge",
    "extract_archive",
    "load_profile",
    "make_archive",
]
