"""An async client of the KV service (tests and the benchmark)."""

from __future__ import annotations

import os
from typing import Any

import trio

from consensus.kv.protocol import Reader, send_obj


class KVClient:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._stream: trio.SocketStream | None = None
        self._reader: Reader | None = None

    async def connect(self) -> None:
        self._stream = await trio.open_tcp_stream(self.host, self.port)
        self._reader = Reader(self._stream)

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()
            self._stream = None

    async def call(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request; raises OSError/BrokenResourceError if the member is unreachable."""
        if self._stream is None:
            await self.connect()
        assert self._stream is not None and self._reader is not None
        try:
            await send_obj(self._stream, req)
            resp = await self._reader.recv_obj()
        except BaseException:
            await self.aclose()  # a half-finished exchange leaves the connection unusable
            raise
        if resp is None:
            await self.aclose()
            raise trio.BrokenResourceError("connection closed")
        return resp

    async def put(
        self, key: str, value: Any, rid: bytes | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        return await self.call(
            {
                "op": "put",
                "key": key,
                "value": value,
                "rid": rid or os.urandom(16),
                "timeout": timeout,
            }
        )

    async def cas(
        self, key: str, expected: Any, value: Any, rid: bytes | None = None, timeout: float = 5.0
    ) -> dict[str, Any]:
        return await self.call(
            {
                "op": "cas",
                "key": key,
                "value": value,
                "expected": expected,
                "rid": rid or os.urandom(16),
                "timeout": timeout,
            }
        )

    async def get(self, key: str, consistent: bool = True, timeout: float = 5.0) -> dict[str, Any]:
        return await self.call(
            {"op": "get", "key": key, "consistent": consistent, "timeout": timeout}
        )

    async def status(self) -> dict[str, Any]:
        return (await self.call({"op": "status"}))["value"]

    async def fault(self, blocked: list[int]) -> None:
        await self.call({"op": "fault", "blocked": blocked})
