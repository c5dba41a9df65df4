"""Chunked snapshot transfer on a connection of its own.

A MsgSnap can carry a snapshot of hundreds of megabytes. Sent inline it would sit in front of
every heartbeat to that peer for as long as it takes to write (and, on the receiving side, it
would have to fit one frame). So each snapshot gets a fresh connection (``StreamKind.SNAPSHOT``,
etcd's "pipeline" as opposed to its "stream"), and goes as::

    SNAP_BEGIN [message without snapshot data, total size]
    SNAP_CHUNK raw bytes            (repeated; ``snapshot_chunk_size`` each)
    SNAP_END   [crc32 of the data]
                                    ◄── SNAP_ACK [true], once the receiver's node has it

The CRC is computed incrementally per chunk on both sides, so a large snapshot never blocks the
event loop in one long checksum. TLS already protects integrity on the wire; the CRC guards
the reassembly (and plaintext mode).
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable

import trio

from consensus.core.types import Message, MessageType, Snapshot

from . import codec
from .codec import FrameType
from .config import TransportConfig
from .connection import FramedStream
from .errors import FrameError


async def send_snapshot(conn: FramedStream, msg: Message, config: TransportConfig) -> bool:
    """Send the MsgSnap ``msg`` over ``conn`` and wait for the receiver's acknowledgement.

    Returns whether the receiver accepted it; raises one of ``CONNECTION_ERRORS`` when the
    connection fails or stalls."""
    snap = msg.snapshot
    if msg.type is not MessageType.SNAP or snap is None:
        raise ValueError("send_snapshot needs a SNAP message with a snapshot")
    data = snap.data
    await conn.send_all(codec.encode_snap_begin(msg), config.write_timeout)
    view = memoryview(data)
    step = config.snapshot_chunk_size
    crc = 0
    for offset in range(0, len(data), step):
        piece = view[offset : offset + step]
        crc = zlib.crc32(piece, crc)
        await conn.send_all(
            codec.frame_header(FrameType.SNAP_CHUNK, len(piece)) + piece, config.write_timeout
        )
    await conn.send_all(codec.encode_snap_end(crc), config.write_timeout)
    with trio.fail_after(config.snapshot_ack_timeout):
        frame = await conn.receive_frame()
    if frame is None:
        raise trio.BrokenResourceError("peer closed the snapshot stream before acknowledging")
    frame_type, body = frame
    if frame_type is not FrameType.SNAP_ACK:
        raise FrameError(f"expected SNAP_ACK, got {frame_type.name}")
    return codec.decode_snap_ack(body)


class SnapshotAssembler:
    """Sans-I/O reassembly of one snapshot at a time from BEGIN / CHUNK / END frame bodies."""

    __slots__ = ("_chunks", "_crc", "_head", "_max_size", "_received", "_size")

    def __init__(self, max_snapshot_size: int) -> None:
        self._max_size = max_snapshot_size
        self._head: Message | None = None
        self._chunks: list[bytes] = []
        self._size = 0
        self._received = 0
        self._crc = 0

    @property
    def in_progress(self) -> bool:
        return self._head is not None

    def begin(self, body: bytes) -> Message:
        """Start a snapshot; returns the message head (for the caller's sender checks)."""
        if self._head is not None:
            raise FrameError("SNAP_BEGIN inside a snapshot")
        head, size = codec.decode_snap_begin(body)
        if size > self._max_size:
            raise FrameError(f"snapshot of {size} bytes exceeds limit {self._max_size}")
        self._head, self._size = head, size
        self._chunks, self._received, self._crc = [], 0, 0
        return head

    def chunk(self, body: bytes) -> None:
        if self._head is None:
            raise FrameError("SNAP_CHUNK outside a snapshot")
        self._received += len(body)
        if self._received > self._size:
            raise FrameError(f"snapshot chunks exceed the announced {self._size} bytes")
        self._crc = zlib.crc32(body, self._crc)
        self._chunks.append(body)

    def end(self, body: bytes) -> Message:
        """Finish the snapshot: the complete MsgSnap."""
        head = self._head
        if head is None or head.snapshot is None:
            raise FrameError("SNAP_END outside a snapshot")
        crc = codec.decode_snap_end(body)
        if self._received != self._size:
            raise FrameError(f"snapshot ended at {self._received} of {self._size} bytes")
        if crc != self._crc:
            raise FrameError("snapshot checksum mismatch")
        data = b"".join(self._chunks)
        self._head, self._chunks = None, []
        snap = head.snapshot
        return Message(
            head.type,
            head.to,
            head.frm,
            head.term,
            head.log_term,
            head.index,
            head.entries,
            head.commit,
            Snapshot(metadata=snap.metadata, data=data),
            head.reject,
            head.reject_hint,
            head.context,
        )


async def receive_snapshots(
    conn: FramedStream,
    config: TransportConfig,
    check: Callable[[Message], None],
    deliver: Callable[[Message], Awaitable[None]],
) -> int:
    """Receive snapshots on ``conn`` until the sender closes it; returns how many arrived.

    ``check`` vets each message head (sender identity, destination) as soon as SNAP_BEGIN
    arrives, before any chunk is buffered; ``deliver`` hands a complete MsgSnap to the node,
    after which the sender gets its SNAP_ACK."""
    assembler = SnapshotAssembler(config.max_snapshot_size)
    count = 0
    while True:
        with trio.fail_after(config.snapshot_idle_timeout):
            frame = await conn.receive_frame()
        if frame is None:
            if assembler.in_progress:
                raise FrameError("snapshot stream closed mid-transfer")
            return count
        frame_type, body = frame
        if frame_type is FrameType.SNAP_CHUNK:
            assembler.chunk(body)
        elif frame_type is FrameType.SNAP_BEGIN:
            check(assembler.begin(body))
        elif frame_type is FrameType.SNAP_END:
            msg = assembler.end(body)
            await deliver(msg)
            count += 1
            await conn.send_all(codec.encode_snap_ack(True), config.write_timeout)
        else:
            raise FrameError(f"{frame_type.name} frame on a snapshot stream")
