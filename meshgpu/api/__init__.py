"""The REST API served by every node."""

from meshgpu.api.app import APPLIED_HEADER, create_app

__all__ = ["APPLIED_HEADER", "create_app"]
