"""Test data kept in the repository (a fresh clone needs nothing beside it)."""

from __future__ import annotations

from pathlib import Path

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# dstack's configurations for compatibility tests: see fixtures/dstack-configs/PROVENANCE.md.
CORPUS = FIXTURES / "dstack-configs"
