"""The wire format: every message survives a round trip, and nothing but DecodeError comes out
of bytes that are not a valid packet."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshgpu.mesh.gossip import (
    VERSION,
    Ack,
    Alive,
    Dead,
    DecodeError,
    IndirectPing,
    MemberRecord,
    MemberState,
    Nack,
    Ping,
    PushPull,
    Suspect,
    decode,
    encode,
)
from meshgpu.mesh.gossip.codec import encode_message, pack

uint = st.integers(min_value=0, max_value=(1 << 64) - 1)
ids = st.text(min_size=1, max_size=40)
addrs = st.tuples(st.text(min_size=1, max_size=40), st.integers(0, 65535))
scalars = st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.text(max_size=20)
scalars |= st.binary(max_size=20) | st.floats(allow_nan=False)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
metas = st.dictionaries(st.text(max_size=12), values, max_size=6)

messages = st.one_of(
    st.builds(Ping, uint, ids),
    st.builds(IndirectPing, uint, ids, addrs, st.booleans()),
    st.builds(Ack, uint),
    st.builds(Nack, uint),
    st.builds(Alive, ids, uint, addrs, metas),
    st.builds(Suspect, ids, uint, ids),
    st.builds(Dead, ids, uint, ids),
    st.builds(
        PushPull,
        st.lists(
            st.builds(MemberRecord, ids, addrs, uint, st.sampled_from(MemberState), metas),
            max_size=5,
        ).map(tuple),
        join=st.booleans(),
        reply=st.booleans(),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=6))
def test_round_trip(msgs: list[object]) -> None:
    data = encode(msgs)  # type: ignore[arg-type]
    assert data[0] == VERSION
    assert list(decode(data)) == msgs
    # Splicing pre-encoded messages (how broadcasts are piggybacked) gives the same bytes.
    assert pack([encode_message(m) for m in msgs]) == data  # type: ignore[arg-type]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_decode_error_only(data: bytes) -> None:
    try:
        decode(data)
    except DecodeError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(messages, min_size=1, max_size=3), st.data())
def test_truncated_or_corrupted_packets_raise_decode_error_only(
    msgs: list[object], data: st.DataObject
) -> None:
    packet = bytearray(encode(msgs))  # type: ignore[arg-type]
    cut = data.draw(st.integers(0, len(packet) - 1))
    with pytest.raises(DecodeError):
        decode(bytes(packet[:cut]))
    i = data.draw(st.integers(1, len(packet) - 1))
    packet[i] ^= data.draw(st.integers(1, 255))
    try:
        decode(bytes(packet))
    except DecodeError:
        pass


def _raw(body: object, version: int = VERSION) -> bytes:
    return bytes([version]) + msgpack.packb(body, use_bin_type=True)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x01",
        _raw([[3, 1]], version=2),  # another protocol version
        _raw([]),  # no messages
        _raw({"a": 1}),  # not an array
        _raw([[99, 1]]),  # unknown message type
        _raw([[3]]),  # missing field
        _raw([[3, 1, 2]]),  # extra field
        _raw([[3, True]]),  # a boolean is not a sequence number
        _raw([[3, -1]]),  # negative
        _raw([[1, 1, ""]]),  # empty member id
        _raw([[2, 1, "t", ["h"], True]]),  # address without port
        _raw([[2, 1, "t", ["h", 70000], True]]),  # port out of range
        _raw([[2, 1, "t", ["h", 1], 1]]),  # nack flag not a boolean
        _raw([[5, "a", 1, ["h", 1], []]]),  # metadata not a map
        _raw([[5, "a", 1, ["h", 1], {"t": msgpack.ExtType(5, b"x")}]]),  # extension type
        _raw([[8, False, False, [["a", ["h", 1], 1, 9, {}]]]]),  # unknown member state
        _raw([[8, False, False, "x"]]),
        _raw([[3, 1], "junk"]),
        b"\x01\xc1",  # reserved msgpack byte
        b"\x01" + b"\x91" * 5000,  # absurd nesting
    ],
)
def test_malformed_packets_are_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        decode(data)


def test_encoding_an_unencodable_value_is_a_programming_error() -> None:
    with pytest.raises(TypeError):
        encode([Alive("a", 1, ("h", 1), {"x": object()})])
    with pytest.raises(TypeError):
        encode_message("not a message")  # type: ignore[arg-type]
