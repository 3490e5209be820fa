"""Property tests of the canonical codecs: manifests and /prsm/shard/1.0.0 messages round-trip,
and strict decoding refuses every truncation, corruption and non-canonical form."""

from __future__ import annotations

import dataclasses
import math
import struct

import msgpack
import nacl.signing
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from prsm_node.shards import (
    MAX_CHUNKS_PER_REQUEST,
    MAX_REQUEST_SIZE,
    BadManifestSignature,
    Chunk,
    End,
    Error,
    ErrorCode,
    FileEntry,
    GetChunks,
    GetManifest,
    Have,
    HaveReply,
    InvalidManifest,
    Manifest,
    ManifestReply,
    Message,
    ShardDecodeError,
    ShardError,
    TensorInfo,
    UnknownMessageType,
    bitmap_has,
    bitmap_indices,
    decode_manifest,
    decode_message,
    decode_request,
    encode_bitmap,
    encode_manifest,
    encode_message,
    max_chunk_frame,
    sign_manifest,
    verify_manifest,
)
from prsm_node.shards.header import DTYPE_SIZES

KEY = nacl.signing.SigningKey(bytes([0x11]) * 32)
# derandomize: the same examples on every run (and no example database on disk)
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

hashes = st.binary(min_size=32, max_size=32)
names = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12)
tags = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,8}", fullmatch=True)
meta_leaf = (
    st.text(max_size=8)
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
)
meta_value = st.recursive(
    meta_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3), max_leaves=10
)


@st.composite
def file_entries(draw: st.DrawFn, path: str, chunk_size: int) -> FileEntry:
    data_offset = draw(st.integers(10, 300))
    position = data_offset
    tensors = []
    for name in draw(st.lists(names, unique=True, max_size=5)):
        dtype = draw(st.sampled_from(sorted(DTYPE_SIZES)))
        shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
        length = math.prod(shape) * DTYPE_SIZES[dtype]
        tensors.append(TensorInfo(name, dtype, shape, position, position + length))
        position += length
    tensors.sort(key=lambda t: (t.begin, t.end, t.name.encode()))
    size = position
    chunks = tuple(draw(st.lists(hashes, min_size=-(-size // chunk_size), max_size=-(-size // chunk_size))))
    return FileEntry(path, size, draw(hashes), data_offset, chunks, tuple(tensors))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    chunk_size = 1 << draw(st.integers(10, 22))
    dirs = draw(st.lists(st.from_regex(r"[a-z0-9_]{1,6}(/[a-z0-9_]{1,6})?", fullmatch=True), min_size=1, max_size=3))
    paths = sorted({f"{d}.safetensors" for d in dirs}, key=str.encode)
    # a path must not also be a folder of another ("a.safetensors/...": impossible with these)
    files = tuple(draw(file_entries(p, chunk_size)) for p in paths)
    m = Manifest(
        name=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,10}(/[a-z0-9]{1,5})?", fullmatch=True)),
        version=draw(st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,10}", fullmatch=True)),
        description=draw(st.text(max_size=40)),
        license=draw(st.sampled_from(["", "MIT", "Apache-2.0"])),
        tags=tuple(sorted(set(draw(st.lists(tags, max_size=4))))),
        metadata=draw(st.dictionaries(names, meta_value, max_size=4)),
        chunk_size=chunk_size,
        files=files,
        total_size=sum(f.size for f in files),
        publisher=b"",
        created=draw(st.integers(0, 2**64 - 1)),
    )
    return sign_manifest(KEY, m)


@SETTINGS
@given(manifests())
def test_manifest_round_trip(m: Manifest) -> None:
    data = encode_manifest(m)
    back = decode_manifest(data)
    assert back == m and encode_manifest(back) == data
    verify_manifest(back)


@SETTINGS
@given(manifests(), st.data())
def test_manifest_truncation_rejected(m: Manifest, data: st.DataObject) -> None:
    encoded = encode_manifest(m)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ShardDecodeError):
        decode_manifest(encoded[:cut])


@SETTINGS
@given(manifests(), st.data())
def test_manifest_corruption_never_verifies(m: Manifest, data: st.DataObject) -> None:
    encoded = bytearray(encode_manifest(m))
    i = data.draw(st.integers(0, len(encoded) - 1))
    encoded[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises((ShardDecodeError, BadManifestSignature)):
        verify_manifest(decode_manifest(bytes(encoded)))


@SETTINGS
@given(manifests())
def test_manifest_non_minimal_int_rejected(m: Manifest) -> None:
    fields = msgpack.unpackb(encode_manifest(m))
    # rewrite `created` (index 11) as a uint64 whatever its value: canonical only if >= 2**32
    head = msgpack.packb(fields[:11], use_bin_type=True)
    body = head[1:] + b"\xcf" + struct.pack(">Q", fields[11]) + msgpack.packb(fields[12], use_bin_type=True)
    data = bytes([0x9D]) + body
    if fields[11] >= 2**32:
        assert decode_manifest(data) == m
    else:
        with pytest.raises(ShardDecodeError):
            decode_manifest(data)


def test_manifest_unknown_fields_and_types_rejected() -> None:
    m = _tiny()
    fields = msgpack.unpackb(encode_manifest(m))
    for bad in (
        [*fields, 0],  # an extra field
        fields[:-1],
        [True, *fields[1:]],  # format as a boolean
        [*fields[:7], True, *fields[8:]],  # chunk size as a boolean
        [*fields[:10], fields[10].hex(), *fields[11:]],  # publisher as str
        [*fields[:8], [[*fields[8][0][:4], list(fields[8][0][4]), fields[8][0][5]]], *fields[9:]],
    ):
        with pytest.raises(ShardDecodeError):
            decode_manifest(msgpack.packb(bad, use_bin_type=True))
    ext = msgpack.packb([msgpack.ExtType(1, b"x")])
    with pytest.raises(ShardDecodeError):
        decode_manifest(ext)
    with pytest.raises(ShardDecodeError):
        decode_manifest("not bytes")  # type: ignore[arg-type]


def _tiny() -> Manifest:
    t = TensorInfo("x", "U8", (2,), 16, 18)
    f = FileEntry("m.safetensors", 18, bytes(32), 16, (bytes(32),), (t,))
    m = Manifest("tiny", "1", "", "", (), {}, 1024, (f,), 18, b"", 0)
    return sign_manifest(KEY, m)


def test_unsigned_manifest_is_not_encodable() -> None:
    with pytest.raises(InvalidManifest):
        encode_manifest(dataclasses.replace(_tiny(), signature=b""))


# ------------------------------------------------------------ messages


def messages() -> st.SearchStrategy[Message]:
    indices = st.lists(st.integers(0, 65535), min_size=1, max_size=MAX_CHUNKS_PER_REQUEST, unique=True)
    have = st.integers(0, 200).flatmap(
        lambda n: st.sets(st.integers(0, n - 1) if n else st.nothing(), max_size=n).map(
            lambda s: HaveReply(n, encode_bitmap(s, n))
        )
    )
    return st.one_of(
        hashes.map(GetManifest),
        hashes.map(Have),
        st.binary(min_size=1, max_size=4096).map(ManifestReply),
        have,
        st.builds(GetChunks, hashes, indices.map(lambda xs: tuple(sorted(xs)))),
        st.builds(Chunk, st.integers(0, 65535), st.binary(min_size=1, max_size=4096)),
        st.just(End()),
        st.builds(Error, st.sampled_from(ErrorCode), st.text(max_size=60)),
    )


@settings(max_examples=300, deadline=None, derandomize=True)
@given(messages())
def test_message_round_trip(msg: Message) -> None:
    data = encode_message(msg)
    assert decode_message(data) == msg
    if isinstance(msg, GetManifest | Have | GetChunks):
        assert len(data) <= MAX_REQUEST_SIZE and decode_request(data) == msg
    else:
        with pytest.raises(UnknownMessageType):
            decode_request(data)
    if isinstance(msg, Chunk):
        assert len(data) <= max_chunk_frame(len(msg.data))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(messages(), st.data())
def test_message_truncation_rejected(msg: Message, data: st.DataObject) -> None:
    encoded = encode_message(msg)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(ShardDecodeError):
        decode_message(encoded[:cut])


@settings(max_examples=200, deadline=None, derandomize=True)
@given(messages(), st.data())
def test_message_corruption_rejected_or_differs(msg: Message, data: st.DataObject) -> None:
    encoded = bytearray(encode_message(msg))
    i = data.draw(st.integers(0, len(encoded) - 1))
    encoded[i] ^= data.draw(st.integers(1, 255))
    try:
        back = decode_message(bytes(encoded))
    except ShardError:
        return
    assert back != msg and encode_message(back) == bytes(encoded)


def test_message_limits() -> None:
    mid = bytes(32)
    big_request = msgpack.packb([5, mid, list(range(64))]) + b""
    assert decode_request(big_request) == GetChunks(mid, tuple(range(64)))
    with pytest.raises(ShardDecodeError):
        decode_request(b"\x00" * (MAX_REQUEST_SIZE + 1))
    with pytest.raises(ShardDecodeError):
        decode_message(encode_message(Chunk(0, b"x" * 100)), max_size=50)
    for bad_obj in (
        GetChunks(mid, (1, 0)),
        GetChunks(mid, ()),
        GetChunks(mid, (65536,)),
        GetChunks(mid, tuple(range(65))),
        GetChunks(mid, [0]),  # type: ignore[arg-type]
        Chunk(-1, b"x"),
        Chunk(0, b""),
        Chunk(0, b"x" * ((4 << 20) + 1)),
        HaveReply(9, b"\xff\x01"),
        HaveReply(9, b"\xff\xc0"),
        HaveReply(8, b""),
        Error(ErrorCode.BUSY, "x" * 257),
        Error(99, "x"),  # type: ignore[arg-type]
        Error(True, "x"),  # type: ignore[arg-type]
        GetManifest(b"short"),
        ManifestReply(b""),
        "not a message",
    ):
        with pytest.raises(ValueError):
            encode_message(bad_obj)  # type: ignore[arg-type]
    assert decode_message(encode_message(Error(ErrorCode.HALTED, "é" * 128))) == Error(ErrorCode.HALTED, "é" * 128)


def test_unknown_and_malformed_messages() -> None:
    for data in (
        msgpack.packb([0]),
        msgpack.packb([9, b""]),
        msgpack.packb([255]),
    ):
        with pytest.raises(UnknownMessageType):
            decode_message(data)
    for data in (
        b"",
        msgpack.packb([]),
        msgpack.packb(["1", bytes(32)]),
        msgpack.packb([True, bytes(32)]),
        msgpack.packb([1, bytes(32), 0]),
        msgpack.packb([1, bytes(32)]) + b"\x00",
        msgpack.packb([2, "manifest as str"]),
        msgpack.packb([1, bytes(32)], use_bin_type=False),
        msgpack.packb([5, bytes(32), 0]),
        msgpack.packb([6, 0, b"x"], use_bin_type=True).replace(b"\xc4\x01x", b"\xc5\x00\x01x"),
    ):
        with pytest.raises(ShardDecodeError):
            decode_message(data)


@settings(deadline=None, derandomize=True)
@given(st.integers(0, 300).flatmap(lambda n: st.tuples(st.just(n), st.sets(st.integers(0, max(n - 1, 0)), max_size=n))))
def test_bitmap(case: tuple[int, set[int]]) -> None:
    n, present = case
    present = {i for i in present if i < n}
    bitmap = encode_bitmap(present, n)
    assert len(bitmap) == (n + 7) // 8
    assert set(bitmap_indices(bitmap, n)) == present
    assert all(bitmap_has(bitmap, i) == (i in present) for i in range(n))
    assert HaveReply(n, bitmap).indices() == sorted(present)


def test_bitmap_bit_order() -> None:
    assert encode_bitmap([0], 1) == b"\x80"
    assert encode_bitmap([0, 2, 9], 10) == b"\xa0\x40"
    with pytest.raises(ValueError):
        encode_bitmap([10], 10)
