"""Code archives: stored here and copied to other members before the upload is answered."""

from __future__ import annotations

from typing import TYPE_CHECKING

from meshgpu.client.archive import ArchiveRefused
from meshgpu.errors import Invalid, NotFound, TooLarge
from meshgpu.runner.code import CodeDigestError, push_targets, valid_sha256

if TYPE_CHECKING:
    from pathlib import Path

    from meshgpu.runner.code import CodeStore
    from meshgpu.state import StateMachine


class Code:
    def __init__(
        self, store: CodeStore, state: StateMachine, node_id: str, copies: int, limit: int
    ) -> None:
        self.store, self.state, self.node_id = store, state, node_id
        self.copies = copies  # other members an upload is copied to before it is answered
        self.limit = limit  # bytes an upload may have

    def too_large(self) -> TooLarge:
        return TooLarge("code archive too large", f"over the {self.limit} byte limit", "too_large")

    async def store_upload(self, data: bytes, claimed_sha: str | None) -> tuple[str, list[str]]:
        """``POST /api/v1/code``: store the archive, then copy it to up to ``copies`` other
        active members before answering, so the run outlives this host. Returns the SHA-256 and
        the names of the members that hold a copy."""
        sha = await self.put(data, claimed_sha)
        nodes = self.state.nodes
        holders = await self.store.push(sha, data, push_targets(nodes, self.node_id), self.copies)
        return sha, [nodes[h].name for h in holders if h in nodes]

    async def put(self, data: bytes, claimed_sha: str | None) -> str:
        """Store an archive here only (a copy pushed by the member that accepted it)."""
        try:
            return await self.store.put(data, claimed_sha)
        except CodeDigestError as e:
            raise Invalid("code archive corrupted in transit", str(e), "bad_digest") from None
        except ArchiveRefused as e:
            kind = TooLarge if e.status == 413 else Invalid
            raise kind("code archive refused", str(e), e.code) from None

    def path(self, sha: str) -> Path:
        """The archive ``sha`` held here; NotFound otherwise."""
        if not valid_sha256(sha):
            raise NotFound("unknown code archive", f"{sha!r} is not a SHA-256", "not_found")
        if not self.store.has(sha):
            raise NotFound("unknown code archive", f"this node has no {sha}", "not_found")
        return self.store.path(sha)
