"""Message bodies of ``/prsm/shard/1.0.0`` (framing is prsm_node.wire's varint length prefix).

Every message is a msgpack array whose first element is its type id:

    1 GET_MANIFEST [1, manifest_id: bin32]                       -> MANIFEST | ERROR
    2 MANIFEST     [2, manifest: bin]                             (the canonical manifest bytes)
    3 HAVE         [3, manifest_id: bin32]                        -> HAVE_REPLY | ERROR
    4 HAVE_REPLY   [4, chunk_count: uint, bitmap: bin]
    5 GET_CHUNKS   [5, manifest_id: bin32, indices: [uint, ...]]  -> CHUNK* END | ERROR
    6 CHUNK        [6, index: uint, data: bin]
    7 END          [7]
    8 ERROR        [8, code: uint, message: str]

Decoding is strict like the manifest codec: size limit first, exact field types and lengths,
then a re-encode that must give the same bytes. The rules (who sends what, limits, the
bitmap's bit order, concurrency) are in protocols/shard.md.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias

import msgpack

from ..strict_msgpack import error_reply_problem
from .exceptions import ShardDecodeError, UnknownMessageType
from .manifest import HASH_SIZE, MAX_CHUNK_SIZE, MAX_CHUNKS, MAX_MANIFEST_SIZE, unpack

PROTOCOL_ID = "/prsm/shard/1.0.0"
MAX_CHUNKS_PER_REQUEST = 64
MAX_REQUEST_SIZE = 1024
MAX_ERROR_MESSAGE = 256  # UTF-8 bytes
FRAME_OVERHEAD = 16  # array header, type id, index and bin header around a chunk or manifest
MAX_MESSAGE_SIZE = max(MAX_CHUNK_SIZE, MAX_MANIFEST_SIZE) + FRAME_OVERHEAD
MAX_HAVE_REPLY_SIZE = (MAX_CHUNKS + 7) // 8 + FRAME_OVERHEAD


class MsgType(enum.IntEnum):
    GET_MANIFEST = 1
    MANIFEST = 2
    HAVE = 3
    HAVE_REPLY = 4
    GET_CHUNKS = 5
    CHUNK = 6
    END = 7
    ERROR = 8


class ErrorCode(enum.IntEnum):
    NOT_FOUND = 1  # no such manifest here (or, for GET_CHUNKS, not its manifest)
    BAD_REQUEST = 2  # a request that breaks a rule (indices out of range, unsorted, ...)
    TOO_LARGE = 3  # a frame over the limit for its type
    BUSY = 4  # too many concurrent streams or requests from this peer; retry later
    HALTED = 5  # the circuit breaker halted this model: it is not served
    INTERNAL = 6  # the responder failed (disk error, corrupt chunk)


@dataclass(frozen=True)
class GetManifest:
    TYPE: ClassVar[MsgType] = MsgType.GET_MANIFEST
    manifest_id: bytes


@dataclass(frozen=True)
class ManifestReply:
    TYPE: ClassVar[MsgType] = MsgType.MANIFEST
    manifest: bytes


@dataclass(frozen=True)
class Have:
    TYPE: ClassVar[MsgType] = MsgType.HAVE
    manifest_id: bytes


@dataclass(frozen=True)
class HaveReply:
    """``bitmap`` bit ``i`` (byte ``i // 8``, most significant bit first) is set when the
    responder holds chunk ``i``; it is exactly ``ceil(chunk_count / 8)`` bytes, spare bits 0."""

    TYPE: ClassVar[MsgType] = MsgType.HAVE_REPLY
    chunk_count: int
    bitmap: bytes

    def indices(self) -> list[int]:
        return bitmap_indices(self.bitmap, self.chunk_count)


@dataclass(frozen=True)
class GetChunks:
    """``indices``: 1..MAX_CHUNKS_PER_REQUEST chunk indices, strictly ascending."""

    TYPE: ClassVar[MsgType] = MsgType.GET_CHUNKS
    manifest_id: bytes
    indices: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """``data`` is bytes to encode; a decoded CHUNK's is a read-only view of the received frame
    (no copy of the bulk of the traffic)."""

    TYPE: ClassVar[MsgType] = MsgType.CHUNK
    index: int
    data: bytes | memoryview


@dataclass(frozen=True)
class End:
    TYPE: ClassVar[MsgType] = MsgType.END


@dataclass(frozen=True)
class Error:
    TYPE: ClassVar[MsgType] = MsgType.ERROR
    code: ErrorCode
    message: str = ""


Request: TypeAlias = GetManifest | Have | GetChunks
Message: TypeAlias = GetManifest | ManifestReply | Have | HaveReply | GetChunks | Chunk | End | Error
_ERROR_CODES = frozenset(int(c) for c in ErrorCode)
REQUEST_TYPES = frozenset({MsgType.GET_MANIFEST, MsgType.HAVE, MsgType.GET_CHUNKS})


def max_chunk_frame(chunk_size: int) -> int:
    """The frame limit for reading CHUNK frames of a manifest with this chunk size."""
    return chunk_size + FRAME_OVERHEAD


# ------------------------------------------------------------ bitmaps


def encode_bitmap(present: Iterable[int], count: int) -> bytes:
    """The HAVE_REPLY bitmap of ``count`` chunks with the indices in ``present`` set."""
    bits = bytearray((count + 7) // 8)
    for i in present:
        if not 0 <= i < count:
            raise ValueError(f"chunk index {i} out of range for {count} chunks")
        bits[i >> 3] |= 0x80 >> (i & 7)
    return bytes(bits)


def bitmap_has(bitmap: bytes, index: int) -> bool:
    return bool(bitmap[index >> 3] & (0x80 >> (index & 7)))


def bitmap_indices(bitmap: bytes, count: int) -> list[int]:
    return [i for i in range(count) if bitmap[i >> 3] & (0x80 >> (i & 7))]


# ------------------------------------------------------------ checks


def _problem(msg: Message) -> str | None:
    """What makes ``msg`` unencodable, or None."""
    if isinstance(msg, GetManifest | Have):
        return _hash_problem(msg.manifest_id)
    if isinstance(msg, ManifestReply):
        if type(msg.manifest) is not bytes or not 1 <= len(msg.manifest) <= MAX_MANIFEST_SIZE:
            return f"a manifest must be 1..{MAX_MANIFEST_SIZE} bytes"
        return None
    if isinstance(msg, HaveReply):
        if type(msg.chunk_count) is not int or not 0 <= msg.chunk_count <= MAX_CHUNKS:
            return f"chunk count must be an integer in [0, {MAX_CHUNKS}], got {msg.chunk_count!r}"
        if type(msg.bitmap) is not bytes or len(msg.bitmap) != (msg.chunk_count + 7) // 8:
            return f"bitmap of {msg.chunk_count} chunks must be {(msg.chunk_count + 7) // 8} bytes"
        spare = msg.chunk_count & 7
        if spare and msg.bitmap[-1] & (0xFF >> spare):
            return "bitmap spare bits must be zero"
        return None
    if isinstance(msg, GetChunks):
        problem = _hash_problem(msg.manifest_id)
        if problem:
            return problem
        idx = msg.indices
        if type(idx) is not tuple or not 1 <= len(idx) <= MAX_CHUNKS_PER_REQUEST:
            return f"indices must be a tuple of 1..{MAX_CHUNKS_PER_REQUEST}"
        if any(type(i) is not int or not 0 <= i < MAX_CHUNKS for i in idx):
            return f"every index must be an integer in [0, {MAX_CHUNKS})"
        if any(a >= b for a, b in zip(idx, idx[1:], strict=False)):
            return "indices must be strictly ascending"
        return None
    if isinstance(msg, Chunk):
        if type(msg.index) is not int or not 0 <= msg.index < MAX_CHUNKS:
            return f"chunk index must be an integer in [0, {MAX_CHUNKS}), got {msg.index!r}"
        if type(msg.data) not in (bytes, memoryview) or not 1 <= len(msg.data) <= MAX_CHUNK_SIZE:
            return f"chunk data must be 1..{MAX_CHUNK_SIZE} bytes"
        return None
    if isinstance(msg, End):
        return None
    if isinstance(msg, Error):
        return error_reply_problem(msg.code, msg.message, _ERROR_CODES, MAX_ERROR_MESSAGE)
    return f"not a shard message: {type(msg).__name__}"


def _hash_problem(value: object) -> str | None:
    if type(value) is not bytes or len(value) != HASH_SIZE:
        return f"manifest id must be {HASH_SIZE} bytes"
    return None


def _fields(msg: Message) -> list[Any]:
    if isinstance(msg, GetManifest | Have):
        return [msg.manifest_id]
    if isinstance(msg, ManifestReply):
        return [msg.manifest]
    if isinstance(msg, HaveReply):
        return [msg.chunk_count, msg.bitmap]
    if isinstance(msg, GetChunks):
        return [msg.manifest_id, list(msg.indices)]
    if isinstance(msg, Chunk):
        return [msg.index, bytes(msg.data)]
    if isinstance(msg, Error):
        return [int(msg.code), msg.message]
    return []


# ------------------------------------------------------------ encode / decode


def encode_message(msg: Message) -> bytes:
    """The canonical body of ``msg`` (ValueError if it breaks a rule)."""
    problem = _problem(msg)
    if problem:
        raise ValueError(problem)
    return msgpack.packb([int(msg.TYPE), *_fields(msg)], use_bin_type=True)  # type: ignore[no-any-return]


def _build(value: Any) -> Message:
    if type(value) is not list or not value or type(value[0]) is not int:
        raise ShardDecodeError("a shard message is an array starting with its type id")
    try:
        kind = MsgType(value[0])
    except ValueError:
        raise UnknownMessageType(f"unknown shard message type {value[0]}") from None
    f = value[1:]
    arity = {MsgType.END: 0, MsgType.GET_MANIFEST: 1, MsgType.MANIFEST: 1, MsgType.HAVE: 1}.get(kind, 2)
    if len(f) != arity:
        raise ShardDecodeError(f"{kind.name} has {arity} fields, got {len(f)}")
    if kind is MsgType.GET_MANIFEST:
        return GetManifest(f[0])
    if kind is MsgType.MANIFEST:
        return ManifestReply(f[0])
    if kind is MsgType.HAVE:
        return Have(f[0])
    if kind is MsgType.HAVE_REPLY:
        return HaveReply(f[0], f[1])
    if kind is MsgType.GET_CHUNKS:
        if type(f[1]) is not list:
            raise ShardDecodeError("GET_CHUNKS indices must be an array")
        return GetChunks(f[0], tuple(f[1]))
    if kind is MsgType.CHUNK:
        return Chunk(f[0], f[1])
    if kind is MsgType.END:
        return End()
    if type(f[0]) is not int or f[0] not in _ERROR_CODES:
        raise ShardDecodeError(f"unknown error code {f[0]!r}")
    return Error(ErrorCode(f[0]), f[1])


def chunk_header(index: int, size: int) -> bytes:
    """The canonical bytes of ``CHUNK`` before its data: ``chunk_header(i, len(d)) + d ==
    encode_message(Chunk(i, d))``. Lets a responder frame chunks without copying them twice."""
    if type(index) is not int or not 0 <= index < MAX_CHUNKS:
        raise ValueError(f"chunk index must be an integer in [0, {MAX_CHUNKS}), got {index!r}")
    if not 1 <= size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk data must be 1..{MAX_CHUNK_SIZE} bytes")
    if index < 0x80:
        head = bytes((0x93, 0x06, index))
    elif index < 0x100:
        head = bytes((0x93, 0x06, 0xCC, index))
    else:
        head = b"\x93\x06\xcd" + index.to_bytes(2, "big")
    if size < 0x100:
        return head + bytes((0xC4, size))
    if size < 0x10000:
        return head + b"\xc5" + size.to_bytes(2, "big")
    return head + b"\xc6" + size.to_bytes(4, "big")


def _decode_chunk(data: bytes | memoryview) -> Chunk | None:
    """The fast path for the bulk of the traffic: a canonical, valid CHUNK body is parsed by
    hand (no unpack, no re-encode, no copy: the data is a read-only view of ``data``); None
    sends anything else, valid or not, to the general decoder, which gives the precise error."""
    pos = 2
    first = data[pos] if len(data) > pos else -1
    if 0 <= first < 0x80:
        index, pos = first, pos + 1
    elif first == 0xCC and len(data) > pos + 1 and data[pos + 1] >= 0x80:
        index, pos = data[pos + 1], pos + 2
    elif first == 0xCD and len(data) > pos + 2 and int.from_bytes(data[pos + 1:pos + 3], "big") >= 0x100:
        index, pos = int.from_bytes(data[pos + 1:pos + 3], "big"), pos + 3
    else:
        return None
    tag = data[pos] if len(data) > pos else -1
    if tag == 0xC4 and len(data) > pos + 1:
        size, pos = data[pos + 1], pos + 2
    elif tag == 0xC5 and len(data) > pos + 2:
        size, pos = int.from_bytes(data[pos + 1:pos + 3], "big"), pos + 3
        if size < 0x100:
            return None
    elif tag == 0xC6 and len(data) > pos + 4:
        size, pos = int.from_bytes(data[pos + 1:pos + 5], "big"), pos + 5
        if size < 0x10000:
            return None
    else:
        return None
    if len(data) - pos != size or not 1 <= size <= MAX_CHUNK_SIZE:
        return None
    return Chunk(index, memoryview(data)[pos:].toreadonly())


def decode_message(data: bytes | memoryview, *, max_size: int = MAX_MESSAGE_SIZE) -> Message:
    """Parse one message body from untrusted bytes; any defect raises ShardDecodeError."""
    if len(data) <= max_size and data[:2] == b"\x93\x06":
        chunk = _decode_chunk(data)
        if chunk is not None:
            return chunk
    data = bytes(data)
    msg = _build(unpack(data, max_size, "shard message"))
    problem = _problem(msg)
    if problem:
        raise ShardDecodeError(f"{msg.TYPE.name}: {problem}")
    if encode_message(msg) != bytes(data):
        raise ShardDecodeError(f"{msg.TYPE.name} is not in canonical form")
    return msg


def decode_request(data: bytes) -> Request:
    """Parse a request (GET_MANIFEST, HAVE or GET_CHUNKS) of at most MAX_REQUEST_SIZE bytes."""
    msg = decode_message(data, max_size=MAX_REQUEST_SIZE)
    if not isinstance(msg, GetManifest | Have | GetChunks):
        raise UnknownMessageType(f"{msg.TYPE.name} is not a request")
    return msg
