"""The ``meshgpu`` command line."""

from meshgpu.cli._app import app, main

__all__ = ["app", "main"]
