"""The ``meshgpu`` command line.

``meshgpu ssh-proxy`` is ssh's ProxyCommand, started for every connection: ``main`` runs it
without importing the rest of the CLI (typer, rich, httpx: ~0.3 s) unless help is asked for."""

from __future__ import annotations

import sys
from typing import Any

_HELP = frozenset({"-h", "--help"})


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["ssh-proxy"] and not _HELP & set(argv):
        from meshgpu.client.tunnel import main as ssh_proxy

        sys.exit(ssh_proxy(argv[1:]))
    from meshgpu.cli._app import main as full

    full()


def __getattr__(name: str) -> Any:
    if name == "app":
        from meshgpu.cli._app import app

        return app
    raise AttributeError(f"module 'meshgpu.cli' has no attribute {name!r}")


__all__ = ["app", "main"]
