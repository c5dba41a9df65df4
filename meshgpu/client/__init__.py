"""The Python client of a meshgpu mesh (the CLI uses it; so can users' scripts)."""

from meshgpu.client.archive import DEFAULT_CODE_LIMIT, CodeTooLarge, extract_archive, make_archive
from meshgpu.client.http import APIError, Client, load_profile

__all__ = [
    "DEFAULT_CODE_LIMIT",
    "APIError",
    "Client",
    "CodeTooLarge",
    "extract_archive",
    "load_profile",
    "make_archive",
]
