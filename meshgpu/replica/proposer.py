"""How use cases and controllers write: ``Proposer.propose`` takes an encoded command and
returns its ``Result`` once it is committed and applied here."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from consensus.node import Duplicate
from meshgpu.state import Result

if TYPE_CHECKING:
    from consensus.node import RaftNode


class Proposer(Protocol):
    async def propose(self, cmd: bytes, request_id: bytes | None = None) -> Result: ...


class RaftProposer:
    """The proposer over this node's Raft log (forwarded to the leader; held while there is
    none, up to ``timeout``)."""

    def __init__(self, node: RaftNode, timeout: float = 30.0) -> None:
        self.node = node
        self.timeout = timeout

    async def propose(self, cmd: bytes, request_id: bytes | None = None) -> Result:
        result: Any = await self.node.propose(cmd, request_id=request_id, timeout=self.timeout)
        if isinstance(result, Duplicate):
            # Applied once already. Its result is forgotten after a restart of this node: then
            # the caller reads the outcome from the state (a submission: by its request id).
            return result.result if result.known else Result(True, None, code="duplicate")
        return result
