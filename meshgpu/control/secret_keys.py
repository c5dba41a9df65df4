"""Secret key rotation as a leader controller: after ``meshgpu secret rotate-key`` installed a
new cluster data key, re-encrypt every value still under an older key, a batch of Raft
proposals at a time (each with ``if_ciphertext``: a concurrent ``secret set`` wins). The state
drops an older key as soon as no value uses it. A new leader picks up where the old one
stopped: what is left to do is in the replicated state."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from consensus.core import ProposalDropped
from consensus.node import NotLeader, Timeout
from consensus.storage import StorageFull
from meshgpu.clock import SYSTEM_CLOCK, Clock
from meshgpu.errors import Unavailable

if TYPE_CHECKING:
    from meshgpu.ops.access import AccessOps

log = logging.getLogger(__name__)


class SecretKeys:
    def __init__(
        self,
        access: AccessOps,
        batch: int = 64,
        interval_s: float = 1.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.access, self.batch, self.interval_s, self.clock = access, batch, interval_s, clock

    async def run(self) -> None:
        while True:
            if not await self.step():
                await self.clock.sleep(self.interval_s)

    async def step(self) -> int:
        """One batch; how many values were re-encrypted (0: nothing to do, or deferred)."""
        try:
            done = await self.access.reencrypt(self.batch)
        except (NotLeader, Timeout, ProposalDropped, StorageFull, Unavailable) as e:
            log.info("secret re-encryption deferred: %s", e)
            return 0
        if done:
            left = self.access.key_status()["to_reencrypt"]
            log.info("re-encrypted %d secret value(s) under the new data key; %d left", done, left)
        return done
