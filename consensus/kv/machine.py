"""The reference key-value state machine: put, get, cas, delete on string keys."""

from __future__ import annotations

from typing import Any

import msgpack


class KVStateMachine:
    """Commands are msgpack ``[op, key, value?, expected?]``; results are plain values."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def apply(self, batch: list[tuple[int, bytes]]) -> list[Any]:
        out: list[Any] = []
        for _, raw in batch:
            if not raw:
                out.append(None)
                continue
            op, key, *rest = msgpack.unpackb(raw)
            if op == "put":
                self.data[key] = rest[0]
                out.append(True)
            elif op == "cas":
                value, expected = rest
                if self.data.get(key) == expected:
                    self.data[key] = value
                    out.append(True)
                else:
                    out.append(False)
            elif op == "delete":
                out.append(self.data.pop(key, None) is not None)
            elif op == "append":
                self.data[key] = (self.data.get(key) or "") + rest[0]
                out.append(self.data[key])
            else:
                out.append(None)
        return out

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def snapshot(self) -> bytes:
        return msgpack.packb(self.data)

    def restore(self, data: bytes) -> None:
        self.data = dict(msgpack.unpackb(data)) if data else {}


def put(key: str, value: Any) -> bytes:
    return msgpack.packb(["put", key, value])


def cas(key: str, value: Any, expected: Any) -> bytes:
    return msgpack.packb(["cas", key, value, expected])


def append(key: str, value: str) -> bytes:
    return msgpack.packb(["append", key, value])
