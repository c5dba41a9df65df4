"""The KV service's client protocol: 4-byte big-endian length + msgpack map, one request then one
response per round trip on a connection (clients open one connection each)."""

from __future__ import annotations

import struct
from typing import Any

import msgpack
import trio

MAX_FRAME = 16 << 20


class ProtocolError(Exception):
    pass


async def send_obj(stream: trio.abc.Stream, obj: Any) -> None:
    body = msgpack.packb(obj)
    await stream.send_all(struct.pack(">I", len(body)) + body)


class Reader:
    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buf = bytearray()

    async def _fill(self, n: int) -> bool:
        while len(self.buf) < n:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    async def recv_obj(self) -> Any | None:
        if not await self._fill(4):
            return None
        (n,) = struct.unpack(">I", self.buf[:4])
        if n > MAX_FRAME:
            raise ProtocolError(f"frame of {n} bytes is over the limit")
        if not await self._fill(4 + n):
            return None
        body = bytes(self.buf[4 : 4 + n])
        del self.buf[: 4 + n]
        try:
            return msgpack.unpackb(body, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
            raise ProtocolError(f"bad frame: {e}") from None
