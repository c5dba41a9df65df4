"""Crash points for crash-consistency tests (the gofail idea, without a build step).

``MESHGPU_STORAGE_CRASH_AT=<point>`` makes the process exit abruptly (``os._exit``, no cleanup,
no flush) when it reaches that point; tests run a writer in a subprocess, crash it at every point
in turn and check what recovery makes of the files. Unset, each check is one dict lookup.
"""

from __future__ import annotations

import os

_TARGET = os.environ.get("MESHGPU_STORAGE_CRASH_AT")


def crash_point(name: str) -> None:
    if _TARGET is not None and name == _TARGET:
        os._exit(86)
