"""Where the shared design material lives: ``shared/`` beside the checkout (or MESHGPU_SHARED)."""

from __future__ import annotations

import os
from pathlib import Path


def shared_dir() -> Path:
    env = os.environ.get("MESHGPU_SHARED")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "compat"
        if candidate.is_dir():
            return parent / "shared"
    return Path(__file__).resolve().parents[2] / "shared"


CORPUS = shared_dir() / "compat" / "dstack-configs"
