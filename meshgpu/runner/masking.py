"""Secret values masked in a job's output as the supervisor (``shim.py``) writes its log.

Standard library only: the shim imports it as a sibling script module, like ``sandbox``.
"""

from __future__ import annotations


class Masker:
    """Replaces secret values in a byte stream with ``***``, a value split across two chunks
    included: the longest tail of a chunk that could begin a value is held back until the next
    chunk (or ``flush``)."""

    MASK = b"***"

    def __init__(self, values: list[bytes]) -> None:
        # Longest first: a value that contains another is masked whole. Values under 4 bytes
        # are not masked (they would mask ordinary output everywhere).
        self.values = sorted({v for v in values if len(v) >= 4}, key=len, reverse=True)
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        if not self.values:
            return chunk
        data = self.held + chunk
        for v in self.values:
            data = data.replace(v, self.MASK)
        keep = 0
        for v in self.values:
            for n in range(min(len(v) - 1, len(data)), 0, -1):
                if data.endswith(v[:n]):
                    keep = max(keep, n)
                    break
        self.held = data[len(data) - keep :] if keep else b""
        return data[: len(data) - keep] if keep else data

    def flush(self) -> bytes:
        out, self.held = self.held, b""
        return out
