"""What every probe scenario checks besides its own outcome: the agent's API keeps answering."""

from __future__ import annotations

import time

import httpx
import trio

from meshgpu.testing import AgentProcess


class Watch:
    """Samples /healthz while a scenario runs (``nursery.start_soon(watch.run, client)``); the
    scenario then checks ``worst``, the slowest answer, against a second."""

    def __init__(self, agent: AgentProcess) -> None:
        self.agent, self.worst, self.samples = agent, 0.0, 0

    async def run(self, client: httpx.AsyncClient) -> None:
        while True:
            t = time.monotonic()
            r = await client.get(f"{self.agent.url}/healthz", timeout=5)
            assert r.status_code == 200
            self.worst = max(self.worst, time.monotonic() - t)
            self.samples += 1
            await trio.sleep(0.05)
