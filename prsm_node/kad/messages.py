"""Wire codec for the libp2p kad-dht ``Message`` (used under ``/prsm/kad/1.0.0``).

A small hand-written protobuf codec (varints, length-delimited fields), free of
google.protobuf and libp2p, so that tests can check it byte for byte against an
encoder that is not ours (py-libp2p's ``libp2p.kad_dht.pb.kademlia_pb2``), and
strict where a generic protobuf parser is lenient: its input is untrusted.

The spec's schema has no field labels, i.e. it is proto3 (py-libp2p and
go-libp2p-kad-dht say ``syntax = "proto3"``): scalars have implicit presence, so
default values (``type=PUT_VALUE``, ``clusterLevelRaw=0``, empty bytes/strings,
``connection=NOT_CONNECTED``) are never written -- a PUT_VALUE has no type field.
``record`` is a sub-message with explicit presence: ``Record()`` is an empty
field 3, ``None`` is absent.  Fields go in ascending field-number order (as upb
writes them), so ``encode`` equals ``SerializeToString()`` of the same content.
``decode`` accepts written defaults, repeated scalars (last wins) and repeated
records (merged), and truncates int32/enum varints to 32 bits, like protobuf.
py-libp2p's extra fields (``senderRecord`` 11, ``Peer.signedRecord`` 4,
``Record.author`` 3 / ``signature`` 4) are not modelled: skipped as unknown.
Stricter than protobuf (KadDecodeError): unknown enum values, a known field with
the wrong wire type, groups (wire types 3/4), varints over 10 bytes or 2**64-1,
tags over 5 bytes, invalid UTF-8 and the caps below.  ``encode`` raises
ValueError rather than produce bytes that ``decode`` would reject.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

MAX_MESSAGE_SIZE = 64 * 1024
MAX_CLOSER_PEERS = 64
MAX_PROVIDER_PEERS = 64
MAX_ADDRS_PER_PEER = 32
MAX_PEER_ID_LEN = 128

_U64 = (1 << 64) - 1
_WT_VARINT, _WT_I64, _WT_LEN, _WT_I32 = 0, 1, 2, 5


class KadDecodeError(ValueError):
    """Raised when bytes are not a valid kad-dht message (or varint) for us."""


class MessageType(enum.IntEnum):
    PUT_VALUE = 0
    GET_VALUE = 1
    ADD_PROVIDER = 2
    GET_PROVIDERS = 3
    FIND_NODE = 4
    PING = 5


class ConnectionType(enum.IntEnum):
    NOT_CONNECTED = 0
    CONNECTED = 1
    CAN_CONNECT = 2
    CANNOT_CONNECT = 3


@dataclass(frozen=True)
class KadPeer:
    id: bytes
    addrs: tuple[bytes, ...] = ()  # binary multiaddrs
    connection: ConnectionType = ConnectionType.NOT_CONNECTED


@dataclass(frozen=True)
class Record:
    key: bytes = b""
    value: bytes = b""
    time_received: str = ""


@dataclass(frozen=True)
class KadMessage:
    type: MessageType
    key: bytes = b""
    record: Record | None = None
    closer_peers: tuple[KadPeer, ...] = ()
    provider_peers: tuple[KadPeer, ...] = ()
    cluster_level_raw: int = 0


def varint_encode(n: int) -> bytes:
    """Unsigned LEB128 varint of ``0 <= n < 2**64`` (ValueError otherwise)."""
    if not 0 <= n <= _U64:
        raise ValueError(f"varint out of range: {n}")
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def varint_decode(buf: bytes, pos: int = 0) -> tuple[int, int]:
    """Read one unsigned varint at ``buf[pos:]``; return ``(value, new_pos)``."""
    if pos < 0:
        raise KadDecodeError(f"negative position {pos}")
    value = 0
    for i in range(10):
        if pos + i >= len(buf):
            raise KadDecodeError("truncated varint")
        b = buf[pos + i]
        value |= (b & 0x7F) << (7 * i)
        if not b & 0x80:
            if value > _U64:
                raise KadDecodeError("varint overflows 64 bits")
            return value, pos + i + 1
    raise KadDecodeError("varint longer than 10 bytes")


def _ld(field: int, payload: bytes) -> bytes:
    return varint_encode(field << 3 | _WT_LEN) + varint_encode(len(payload)) + payload


def _vi(field: int, value: int) -> bytes:
    return varint_encode(field << 3 | _WT_VARINT) + varint_encode(value & _U64)


def _encode_peer(p: KadPeer) -> bytes:
    if len(p.id) > MAX_PEER_ID_LEN:
        raise ValueError(f"peer id longer than {MAX_PEER_ID_LEN} bytes")
    if len(p.addrs) > MAX_ADDRS_PER_PEER:
        raise ValueError(f"more than {MAX_ADDRS_PER_PEER} addrs for one peer")
    parts = [_ld(1, bytes(p.id))] if p.id else []
    parts += [_ld(2, bytes(a)) for a in p.addrs]
    conn = ConnectionType(p.connection)
    if conn:
        parts.append(_vi(3, conn))
    return b"".join(parts)


def _encode_record(r: Record) -> bytes:
    parts = [_ld(1, bytes(r.key))] if r.key else []
    if r.value:
        parts.append(_ld(2, bytes(r.value)))
    if r.time_received:
        parts.append(_ld(5, r.time_received.encode("utf-8")))
    return b"".join(parts)


def encode(msg: KadMessage) -> bytes:
    """Protobuf bytes of ``msg`` (no length prefix); ValueError if invalid."""
    mtype = MessageType(msg.type)
    if not -(1 << 31) <= msg.cluster_level_raw < 1 << 31:
        raise ValueError("cluster_level_raw out of int32 range")
    if len(msg.closer_peers) > MAX_CLOSER_PEERS:
        raise ValueError(f"more than {MAX_CLOSER_PEERS} closer peers")
    if len(msg.provider_peers) > MAX_PROVIDER_PEERS:
        raise ValueError(f"more than {MAX_PROVIDER_PEERS} provider peers")
    parts = [_vi(1, mtype)] if mtype else []
    if msg.key:
        parts.append(_ld(2, bytes(msg.key)))
    if msg.record is not None:
        parts.append(_ld(3, _encode_record(msg.record)))
    parts += [_ld(8, _encode_peer(p)) for p in msg.closer_peers]
    parts += [_ld(9, _encode_peer(p)) for p in msg.provider_peers]
    if msg.cluster_level_raw:
        parts.append(_vi(10, msg.cluster_level_raw))
    out = b"".join(parts)
    if len(out) > MAX_MESSAGE_SIZE:
        raise ValueError(f"encoded message is {len(out)} bytes > {MAX_MESSAGE_SIZE}")
    return out


def encode_frame(msg: KadMessage) -> bytes:
    """``encode(msg)`` prefixed with its length as an unsigned varint."""
    body = encode(msg)
    return varint_encode(len(body)) + body


_E = TypeVar("_E", bound=enum.IntEnum)


def _fields(data: bytes) -> Iterator[tuple[int, int, int | bytes]]:
    """Yield ``(field, wire_type, value)``; value is bytes for wire type 2."""
    pos, end = 0, len(data)
    while pos < end:
        tag, tag_end = varint_decode(data, pos)
        field, wt = tag >> 3, tag & 7
        if field == 0 or tag > 0xFFFFFFFF or tag_end - pos > 5:  # tags are 32-bit
            raise KadDecodeError(f"invalid field tag {tag:#x}")
        pos = tag_end
        if wt == _WT_VARINT:
            value, pos = varint_decode(data, pos)
            yield field, wt, value
        elif wt == _WT_LEN:
            n, pos = varint_decode(data, pos)
            if n > end - pos:
                raise KadDecodeError(f"field {field} runs past the end")
            yield field, wt, data[pos : pos + n]
            pos += n
        elif wt in (_WT_I64, _WT_I32):
            n = 8 if wt == _WT_I64 else 4
            if n > end - pos:
                raise KadDecodeError(f"truncated fixed-width field {field}")
            yield field, wt, int.from_bytes(data[pos : pos + n], "little")
            pos += n
        else:
            raise KadDecodeError(f"unsupported wire type {wt} (field {field})")


def _as_int(wt: int, value: int | bytes, what: str) -> int:
    if wt != _WT_VARINT or not isinstance(value, int):
        raise KadDecodeError(f"{what}: wire type {wt}, expected varint")
    return value


def _as_bytes(wt: int, value: int | bytes, what: str) -> bytes:
    if wt != _WT_LEN or not isinstance(value, bytes):
        raise KadDecodeError(f"{what}: wire type {wt}, expected length-delimited")
    return value


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _enum(cls: type[_E], raw: int, what: str) -> _E:
    try:
        return cls(_int32(raw))
    except ValueError:
        raise KadDecodeError(f"unknown {what} value {_int32(raw)}") from None


def _decode_peer(data: bytes) -> KadPeer:
    pid, conn = b"", ConnectionType.NOT_CONNECTED
    addrs: list[bytes] = []
    for field, wt, value in _fields(data):
        if field == 1:
            pid = _as_bytes(wt, value, "Peer.id")
            if len(pid) > MAX_PEER_ID_LEN:
                raise KadDecodeError(f"peer id longer than {MAX_PEER_ID_LEN} bytes")
        elif field == 2:
            if len(addrs) >= MAX_ADDRS_PER_PEER:
                raise KadDecodeError(f"more than {MAX_ADDRS_PER_PEER} addrs for a peer")
            addrs.append(_as_bytes(wt, value, "Peer.addrs"))
        elif field == 3:
            conn = _enum(ConnectionType, _as_int(wt, value, "Peer.connection"), "connection")
    return KadPeer(id=pid, addrs=tuple(addrs), connection=conn)


def _decode_record(data: bytes) -> Record:
    key, val, when = b"", b"", b""
    for field, wt, value in _fields(data):
        if field == 1:
            key = _as_bytes(wt, value, "Record.key")
        elif field == 2:
            val = _as_bytes(wt, value, "Record.value")
        elif field == 5:
            when = _as_bytes(wt, value, "Record.timeReceived")
    try:
        return Record(key=key, value=val, time_received=when.decode("utf-8"))
    except UnicodeDecodeError:
        raise KadDecodeError("Record.timeReceived is not valid UTF-8") from None


def decode(data: bytes) -> KadMessage:
    """Parse protobuf bytes (no length prefix); KadDecodeError if invalid."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise KadDecodeError(f"message is {len(data)} bytes > {MAX_MESSAGE_SIZE}")
    data = bytes(data)
    mtype, key, level = MessageType.PUT_VALUE, b"", 0
    record: list[bytes] | None = None
    closer: list[KadPeer] = []
    providers: list[KadPeer] = []
    for field, wt, value in _fields(data):
        if field == 1:
            mtype = _enum(MessageType, _as_int(wt, value, "Message.type"), "type")
        elif field == 2:
            key = _as_bytes(wt, value, "Message.key")
        elif field == 3:  # repeated sub-message fields merge, as in protobuf
            record = [] if record is None else record
            record.append(_as_bytes(wt, value, "Message.record"))
        elif field in (8, 9):
            peers = closer if field == 8 else providers
            cap = MAX_CLOSER_PEERS if field == 8 else MAX_PROVIDER_PEERS
            if len(peers) >= cap:
                raise KadDecodeError(f"more than {cap} peers in field {field}")
            peers.append(_decode_peer(_as_bytes(wt, value, f"Message field {field}")))
        elif field == 10:
            level = _int32(_as_int(wt, value, "Message.clusterLevelRaw"))
    return KadMessage(
        type=mtype,
        key=key,
        record=None if record is None else _decode_record(b"".join(record)),
        closer_peers=tuple(closer),
        provider_peers=tuple(providers),
        cluster_level_raw=level,
    )
