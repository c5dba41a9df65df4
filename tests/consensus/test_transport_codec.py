"""The transport's wire format: round trips, splitting, and refusal of every kind of bad input.

Decoding faces the network, so beyond round trips these tests throw random bytes, mutated valid
frames and random msgpack values at it: the only exception allowed out is ``FrameError``.
"""

from __future__ import annotations

import struct
import zlib

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.core.types import (
    LOCAL_MESSAGES,
    ConfState,
    Entry,
    EntryType,
    Message,
    MessageType,
    Snapshot,
    SnapshotMetadata,
)
from consensus.transport import codec
from consensus.transport.codec import (
    HEADER,
    MAGIC,
    VERSION,
    FrameReader,
    FrameType,
    StreamKind,
    decode_hello,
    decode_messages,
    decode_snap_ack,
    decode_snap_begin,
    decode_snap_end,
    encode_frame,
    encode_hello,
    encode_message_frames,
    encode_snap_ack,
    encode_snap_begin,
    encode_snap_end,
)
from consensus.transport.errors import FrameError
from consensus.transport.snapshot_stream import SnapshotAssembler

MT = MessageType
WIRE_TYPES = sorted(t for t in MessageType if t not in LOCAL_MESSAGES)

u64 = st.integers(min_value=0, max_value=2**64 - 1)
node_ids = st.integers(min_value=1, max_value=2**64 - 1)
entries = st.builds(
    Entry,
    term=u64,
    index=u64,
    data=st.binary(max_size=64),
    type=st.sampled_from(EntryType),
)
conf_states = st.builds(
    ConfState,
    voters=st.frozensets(node_ids, max_size=5),
    learners=st.frozensets(node_ids, max_size=3),
    removed=st.frozensets(node_ids, max_size=3),
)
snapshots = st.builds(
    Snapshot,
    metadata=st.builds(SnapshotMetadata, index=u64, term=u64, conf_state=conf_states),
    data=st.binary(max_size=256),
)
messages = st.builds(
    Message,
    type=st.sampled_from(WIRE_TYPES),
    to=u64,
    frm=u64,
    term=u64,
    log_term=u64,
    index=u64,
    entries=st.lists(entries, max_size=6).map(tuple),
    commit=u64,
    snapshot=st.none() | snapshots,
    reject=st.booleans(),
    reject_hint=u64,
    context=st.binary(max_size=32),
)


def roundtrip(
    msgs: list[Message], max_frame_size: int = codec.DEFAULT_MAX_FRAME_SIZE
) -> list[Message]:
    data, too_large = encode_message_frames(msgs, max_frame_size)
    assert too_large == []
    frames = FrameReader(max_frame_size).feed(data)
    assert all(t is FrameType.MESSAGES for t, _ in frames)
    return [m for _, body in frames for m in decode_messages(body)]


def append(index: int, payload: bytes = b"x" * 100, n: int = 1) -> Message:
    return Message(
        MT.APP,
        to=2,
        frm=1,
        term=3,
        log_term=3,
        index=index,
        commit=index,
        entries=tuple(Entry(3, index + 1 + k, payload) for k in range(n)),
    )


# ------------------------------------------------------------------------------------------
# Round trips


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=8))
def test_message_batches_roundtrip(msgs: list[Message]) -> None:
    decoded = roundtrip(msgs)
    assert decoded == msgs
    assert [hash(m) for m in decoded] == [hash(m) for m in msgs]
    # Enums come back as the core's enum members, not bare ints.
    for m in decoded:
        assert type(m.type) is MessageType
        assert all(type(e.type) is EntryType for e in m.entries)


@settings(max_examples=100, deadline=None)
@given(st.lists(messages, min_size=1, max_size=30))
def test_batches_split_over_frames_when_large_keep_order(msgs: list[Message]) -> None:
    # A 1 KiB frame limit forces most batches over several frames, written as one buffer.
    data, too_large = encode_message_frames(msgs, 1024)
    kept = [m for m in msgs if m not in too_large]
    frames = FrameReader(1024).feed(data)
    assert [m for _, body in frames for m in decode_messages(body)] == kept
    assert all(len(body) <= 1024 for _, body in frames)


def test_typical_appends_roundtrip_and_frame_count() -> None:
    msgs = [append(100 + 8 * i, n=8) for i in range(64)]
    data, _ = encode_message_frames(msgs)
    frames = FrameReader().feed(data)
    assert len(frames) == 1  # one Ready batch of 64 appends: one frame, one write
    assert decode_messages(frames[0][1]) == msgs


def test_message_too_large_for_a_frame_is_left_out() -> None:
    big = append(1, payload=b"y" * 5000)
    small = append(2)
    data, too_large = encode_message_frames([small, big, small], 4096)
    assert too_large == [big]
    frames = FrameReader(4096).feed(data)
    assert [m for _, b in frames for m in decode_messages(b)] == [small, small]


def test_reader_reassembles_frames_fed_byte_by_byte() -> None:
    msgs = [append(i) for i in range(5)]
    data = encode_hello(1, StreamKind.MESSAGES) + encode_message_frames(msgs)[0]
    reader = FrameReader()
    frames = []
    for i in range(len(data)):
        frames += reader.feed(data[i : i + 1])
    assert [t for t, _ in frames] == [FrameType.HELLO, FrameType.MESSAGES]
    assert decode_hello(frames[0][1]) == (1, StreamKind.MESSAGES)
    assert decode_messages(frames[1][1]) == msgs
    assert reader.buffered == 0


def test_control_frames_roundtrip() -> None:
    snap = Snapshot(SnapshotMetadata(10, 2, ConfState(frozenset({1, 2, 3}))), b"state" * 100)
    msg = Message(MT.SNAP, to=2, frm=1, term=2, snapshot=snap)
    ((t, body),) = FrameReader().feed(encode_snap_begin(msg))
    assert t is FrameType.SNAP_BEGIN
    head, size = decode_snap_begin(body)
    assert size == len(snap.data)
    assert head.snapshot is not None and head.snapshot.data == b""
    assert head.snapshot.metadata == snap.metadata
    assert decode_snap_end(FrameReader().feed(encode_snap_end(0xDEADBEEF))[0][1]) == 0xDEADBEEF
    assert decode_snap_ack(FrameReader().feed(encode_snap_ack(True))[0][1]) is True
    assert decode_hello(FrameReader().feed(encode_hello(7, StreamKind.SNAPSHOT))[0][1]) == (
        7,
        StreamKind.SNAPSHOT,
    )


def test_snapshot_assembler_rebuilds_the_message() -> None:
    data = bytes(range(256)) * 1000
    snap = Snapshot(SnapshotMetadata(10, 2, ConfState(frozenset({1, 2}))), data)
    msg = Message(MT.SNAP, to=2, frm=1, term=2, snapshot=snap)
    asm = SnapshotAssembler(max_snapshot_size=1 << 20)
    begin = FrameReader().feed(encode_snap_begin(msg))[0][1]
    assert asm.begin(begin).frm == 1
    for i in range(0, len(data), 7000):
        asm.chunk(data[i : i + 7000])
    assert asm.end(FrameReader().feed(encode_snap_end(zlib.crc32(data)))[0][1]) == msg
    assert not asm.in_progress


# ------------------------------------------------------------------------------------------
# Refusals: each must be a FrameError


def header(frame_type: int, length: int, version: int = VERSION, magic: bytes = MAGIC) -> bytes:
    return HEADER.pack(magic, version, frame_type, length)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (header(FrameType.MESSAGES, 0, magic=b"GE"), "magic"),
        (b"GET / HTTP/1.1\r\n", "magic"),
        (header(FrameType.MESSAGES, 0, version=VERSION + 1), "version"),
        (header(99, 0), "frame type"),
        (header(FrameType.MESSAGES, 4097), "exceeds"),
    ],
)
def test_bad_headers_are_refused_before_the_body(data: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        FrameReader(max_frame_size=4096).feed(data)


def wire(m: Message) -> list[object]:
    return msgpack.unpackb(msgpack.packb(codec._message_to_wire(m)))


GOOD = wire(append(5, n=2))


def mutated(position: int, value: object) -> bytes:
    w = list(GOOD)
    w[position] = value
    return msgpack.packb([w])


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb({"a": 1}),
        msgpack.packb([[1, 2, 3]]),
        msgpack.packb([GOOD + [0]]),
        mutated(0, int(MT.HUP)),  # local message types never come from a peer
        mutated(0, int(MT.SNAP_STATUS)),
        mutated(0, 999),
        mutated(0, True),
        mutated(1, -1),
        mutated(3, "3"),
        mutated(3, 1.0),
        mutated(4, True),  # a msgpack bool is not an integer here
        mutated(6, [1, 2, 3]),  # entries must come in fours
        mutated(6, [1, 2, "data", 0]),
        mutated(6, [1, 2, b"data", 5]),  # unknown entry type
        mutated(6, [1, -2, b"data", 0]),
        mutated(8, [1, 1, [0], [], [], b""]),  # node id 0 in a configuration
        mutated(8, [1, 1, [1], [], [], "not bytes"]),
        mutated(8, [1, 1, [1], []]),
        mutated(9, 0),
        mutated(11, "ctx"),
        msgpack.packb([GOOD]) + b"\x00",  # trailing bytes
        msgpack.packb([GOOD])[:-3],  # truncated
        b"\xc1",  # never-used msgpack byte
        b"\xdd\xff\xff\xff\xff",  # array claiming 4 billion elements
        msgpack.packb([msgpack.ExtType(5, b"x")]),
        msgpack.packb([[[[[[[[]]]]]]]]),
    ],
)
def test_invalid_message_bodies_are_refused(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_messages(body)


def test_deep_nesting_is_refused_not_a_crash() -> None:
    body = b"\x91" * 100_000 + b"\xc0"
    with pytest.raises(FrameError):
        decode_messages(body)


@pytest.mark.parametrize(
    "body",
    [
        msgpack.packb([0, 0]),  # node id 0 is "none"
        msgpack.packb([1, 5]),
        msgpack.packb([1]),
        msgpack.packb([-1, 0]),
        msgpack.packb(["node-1", 0]),
    ],
)
def test_invalid_hello_is_refused(body: bytes) -> None:
    with pytest.raises(FrameError):
        decode_hello(body)


def test_snap_begin_must_be_a_snapshot_without_data() -> None:
    heartbeat = codec._message_to_wire(Message(MT.HEARTBEAT, to=2, frm=1))
    with pytest.raises(FrameError):
        decode_snap_begin(msgpack.packb([heartbeat, 10]))
    snap = Snapshot(SnapshotMetadata(1, 1, ConfState(frozenset({1}))), b"inline")
    with_data = codec._message_to_wire(Message(MT.SNAP, to=2, frm=1, snapshot=snap))
    with pytest.raises(FrameError):
        decode_snap_begin(msgpack.packb([with_data, 6]))


def begin_body(size: int) -> bytes:
    snap = Snapshot(SnapshotMetadata(1, 1, ConfState(frozenset({1}))), b"x" * size)
    return FrameReader().feed(encode_snap_begin(Message(MT.SNAP, to=2, frm=1, snapshot=snap)))[0][1]


def test_snapshot_assembler_refuses_inconsistent_streams() -> None:
    asm = SnapshotAssembler(max_snapshot_size=100)
    with pytest.raises(FrameError, match="outside"):
        asm.chunk(b"x")
    with pytest.raises(FrameError, match="exceeds limit"):
        asm.begin(begin_body(101))
    asm.begin(begin_body(10))
    with pytest.raises(FrameError, match="inside"):
        asm.begin(begin_body(10))
    asm.chunk(b"x" * 6)
    with pytest.raises(FrameError, match="ended at 6 of 10"):
        asm.end(msgpack.packb([zlib.crc32(b"x" * 6)]))
    asm = SnapshotAssembler(max_snapshot_size=100)
    asm.begin(begin_body(10))
    with pytest.raises(FrameError, match="exceed"):
        asm.chunk(b"x" * 11)
    asm = SnapshotAssembler(max_snapshot_size=100)
    asm.begin(begin_body(4))
    asm.chunk(b"xxxx")
    with pytest.raises(FrameError, match="checksum"):
        asm.end(msgpack.packb([zlib.crc32(b"xxxy")]))


# ------------------------------------------------------------------------------------------
# Fuzzing: nothing but FrameError escapes


DECODERS = {
    FrameType.HELLO: decode_hello,
    FrameType.MESSAGES: decode_messages,
    FrameType.SNAP_BEGIN: decode_snap_begin,
    FrameType.SNAP_END: decode_snap_end,
    FrameType.SNAP_ACK: decode_snap_ack,
    FrameType.SNAP_CHUNK: lambda body: body,
    FrameType.APP: lambda body: body,  # opaque: the embedding application decodes it
}


def feed_and_decode(data: bytes, max_frame_size: int = 1 << 16) -> None:
    try:
        for frame_type, body in FrameReader(max_frame_size).feed(data):
            DECODERS[frame_type](body)
    except FrameError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_frame_error(data: bytes) -> None:
    feed_and_decode(data)
    # Also with a valid header in front, so that the body decoders see the garbage.
    for frame_type in FrameType:
        feed_and_decode(encode_frame(frame_type, data))


VALID_STREAM = (
    encode_hello(1, StreamKind.MESSAGES)
    + encode_message_frames(
        [
            append(5, n=3),
            Message(
                MT.SNAP,
                to=2,
                frm=1,
                snapshot=Snapshot(SnapshotMetadata(3, 1, ConfState(frozenset({1, 2}))), b"s"),
            ),
            Message(MT.VOTE_RESP, to=2, frm=1, term=4, reject=True, context=b"ctx"),
        ]
    )[0]
    + encode_snap_end(12345)
)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutated_valid_frames_only_raise_frame_error(data: st.DataObject) -> None:
    buf = bytearray(VALID_STREAM)
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(buf) - 1))
        buf[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buf)))
    feed_and_decode(bytes(buf[:cut]))


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.binary(max_size=8)
    | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=13) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=40,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgpack_values)
def test_random_msgpack_values_only_raise_frame_error(value: object) -> None:
    body = msgpack.packb(value)
    for decoder in DECODERS.values():
        try:
            decoder(body)
        except FrameError:
            pass
    try:
        decode_messages(msgpack.packb([value]))
    except FrameError:
        pass


def test_version_byte_is_in_every_header() -> None:
    data = encode_message_frames([append(1)])[0]
    magic, version, frame_type, length = struct.unpack(">2sBBI", data[:8])
    assert (magic, version, frame_type, length) == (
        MAGIC,
        VERSION,
        FrameType.MESSAGES,
        len(data) - 8,
    )
