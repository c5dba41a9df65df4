"""Top-level ``meshgpu`` command; each command group lives in its own module."""

from __future__ import annotations

import typer

from meshgpu.cli import _config

app = typer.Typer(
    name="meshgpu",
    help="meshgpu: a peer-to-peer GPU orchestrator that reads dstack configurations.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(_config.app, name="config")


def main() -> None:
    app()
