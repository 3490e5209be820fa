"""Messages of ``/prsm/tx/1.0.0`` and ``/prsm/sync/1.0.0`` (protocols/tx.md, protocols/sync.md).

Each frame (prsm_node.wire framing) is one msgpack array whose first element is its type.
Requests: ``[SUBMIT, tx]``, ``[WAIT, tx_hash, timeout_ms]``, ``[SUBMIT_MANY, [tx, ...]]``,
``[GET_BLOCKS, from, max, wait_ms]``. Replies: ``[OK, ...]`` or ``[ERROR, code, message]``.
Decoding is strict: a wrong shape is a ``MessageError`` (the peer gets a ``malformed`` error, and the stream is closed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from ..ledger.block import MAX_BLOCK_SIZE
from ..ledger.codec import MAX_TX_SIZE
from ..strict_msgpack import unpack_strict

TX_PROTOCOL = "/prsm/tx/1.0.0"
SYNC_PROTOCOL = "/prsm/sync/1.0.0"

SUBMIT = 1
WAIT = 2
GET_BLOCKS = 3
SUBMIT_MANY = 4
OK = 0
ERROR = 1

MAX_TX_REQUEST = MAX_TX_SIZE + 64
MAX_SYNC_REQUEST = 64
MAX_REPLY = 1024
MAX_SUBMIT_MANY = 1024  # txs in one SUBMIT_MANY
MAX_SUBMIT_MANY_BYTES = 1024 * 1024  # sum of their encodings
MAX_TX_REQUESTS = MAX_SUBMIT_MANY_BYTES + 16 * 1024  # a SUBMIT_MANY frame, with its msgpack overhead
MAX_MANY_REPLY = MAX_SUBMIT_MANY * 68 + 64  # one nil or error code (<= 64 bytes) per tx
MAX_CODE = 64
MAX_SYNC_REPLY = 2 * MAX_BLOCK_SIZE + 64 * 1024
MAX_WAIT_MS = 30_000
MAX_BLOCKS_PER_REPLY = 64
MAX_ERROR_MESSAGE = 512


class MessageError(Exception):
    """Raised when a frame is not a well-formed message of the protocol."""


@dataclass(frozen=True)
class Submit:
    tx: bytes


@dataclass(frozen=True)
class SubmitMany:
    txs: tuple[bytes, ...]


@dataclass(frozen=True)
class Wait:
    tx_hash: bytes
    timeout_ms: int


@dataclass(frozen=True)
class GetBlocks:
    start: int
    count: int
    wait_ms: int


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)  # type: ignore[no-any-return]


def _unpack(data: bytes, limit: int) -> list[Any]:
    value = unpack_strict(data, limit, "message", MessageError)
    if type(value) is not list or not value or type(value[0]) is not int:
        raise MessageError("a message is an array that starts with its type")
    return value


def _uint(value: Any, what: str, maximum: int) -> int:
    if type(value) is not int or not 0 <= value <= maximum:
        raise MessageError(f"{what} must be an integer in [0, {maximum}]")
    return value


def _bytes(value: Any, what: str, size: int | None = None, limit: int = MAX_TX_SIZE) -> bytes:
    if type(value) is not bytes or (size is not None and len(value) != size) or len(value) > limit:
        raise MessageError(f"{what} must be bin" + (f" of {size} bytes" if size else f" of at most {limit} bytes"))
    return value


# ------------------------------------------------------------ requests


def encode_submit(tx: bytes) -> bytes:
    return _pack([SUBMIT, tx])


def encode_submit_many(txs: list[bytes]) -> bytes:
    return _pack([SUBMIT_MANY, txs])


def encode_wait(tx_hash: bytes, timeout_ms: int) -> bytes:
    return _pack([WAIT, tx_hash, timeout_ms])


def encode_get_blocks(start: int, count: int, wait_ms: int) -> bytes:
    return _pack([GET_BLOCKS, start, count, wait_ms])


def decode_tx_request(data: bytes) -> Submit | Wait | SubmitMany:
    f = _unpack(data, MAX_TX_REQUESTS)
    if f[0] == SUBMIT and len(f) == 2:
        return Submit(_bytes(f[1], "tx"))
    if f[0] == SUBMIT_MANY and len(f) == 2:
        if type(f[1]) is not list or not 1 <= len(f[1]) <= MAX_SUBMIT_MANY:
            raise MessageError(f"SUBMIT_MANY holds an array of 1..{MAX_SUBMIT_MANY} txs")
        txs = tuple(_bytes(tx, f"tx {i}") for i, tx in enumerate(f[1]))
        if sum(len(tx) for tx in txs) > MAX_SUBMIT_MANY_BYTES:
            raise MessageError(f"the txs of a SUBMIT_MANY total more than {MAX_SUBMIT_MANY_BYTES} bytes")
        return SubmitMany(txs)
    if f[0] == WAIT and len(f) == 3:
        return Wait(_bytes(f[1], "tx hash", 32), _uint(f[2], "timeout_ms", MAX_WAIT_MS))
    raise MessageError(f"unknown request type {f[0]} (or wrong length {len(f)})")


def decode_sync_request(data: bytes) -> GetBlocks:
    f = _unpack(data, MAX_SYNC_REQUEST)
    if f[0] == GET_BLOCKS and len(f) == 4:
        return GetBlocks(
            _uint(f[1], "from height", 2**63),
            _uint(f[2], "count", MAX_BLOCKS_PER_REPLY),
            _uint(f[3], "wait_ms", MAX_WAIT_MS),
        )
    raise MessageError(f"unknown request type {f[0]} (or wrong length {len(f)})")


# ------------------------------------------------------------ replies


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` UTF-8 bytes of ``text``, never splitting a character."""
    return text.encode("utf-8")[:limit].decode("utf-8", "ignore")


def encode_error(code: str, message: str) -> bytes:
    return _pack([ERROR, _cut(code, 64), _cut(message, MAX_ERROR_MESSAGE)])


def encode_submitted(tx_hash: bytes) -> bytes:
    return _pack([OK, tx_hash])


def encode_submitted_many(codes: list[str | None]) -> bytes:
    """One entry per tx, in order: nil when admitted, else the error code that refused it."""
    return _pack([OK, [None if c is None else _cut(c, MAX_CODE) for c in codes]])


def encode_committed(tx_hash: bytes, height: int, block_hash: bytes) -> bytes:
    return _pack([OK, tx_hash, height, block_hash])


def encode_blocks(tip: int, blocks: list[tuple[bytes, bytes]]) -> bytes:
    return _pack([OK, tip, [[b, c] for b, c in blocks]])


def _error(f: list[Any]) -> ErrorReply | None:
    if f[0] != ERROR:
        return None
    if len(f) != 3 or type(f[1]) is not str or type(f[2]) is not str:
        raise MessageError("an error reply is [1, code, message]")
    return ErrorReply(f[1], f[2])


def decode_submit_reply(data: bytes) -> bytes | ErrorReply:
    f = _unpack(data, MAX_REPLY)
    err = _error(f)
    if err is not None:
        return err
    if f[0] == OK and len(f) == 2:
        return _bytes(f[1], "tx hash", 32)
    raise MessageError("a submit reply is [0, tx_hash] or an error")


def decode_submit_many_reply(data: bytes, count: int) -> list[str | None] | ErrorReply:
    f = _unpack(data, MAX_MANY_REPLY)
    err = _error(f)
    if err is not None:
        return err
    if f[0] != OK or len(f) != 2 or type(f[1]) is not list or len(f[1]) != count:
        raise MessageError(f"a SUBMIT_MANY reply is [0, [nil | code, ...]] with {count} entries, or an error")
    for c in f[1]:
        if c is not None and (type(c) is not str or len(c.encode()) > MAX_CODE):
            raise MessageError("a SUBMIT_MANY reply entry is nil or an error code")
    return list(f[1])


def decode_wait_reply(data: bytes) -> tuple[bytes, int, bytes] | ErrorReply:
    f = _unpack(data, MAX_REPLY)
    err = _error(f)
    if err is not None:
        return err
    if f[0] == OK and len(f) == 4:
        return _bytes(f[1], "tx hash", 32), _uint(f[2], "height", 2**63), _bytes(f[3], "block hash", 32)
    raise MessageError("a wait reply is [0, tx_hash, height, block_hash] or an error")


def decode_blocks_reply(data: bytes) -> tuple[int, list[tuple[bytes, bytes]]] | ErrorReply:
    f = _unpack(data, MAX_SYNC_REPLY)
    err = _error(f)
    if err is not None:
        return err
    if f[0] != OK or len(f) != 3 or type(f[2]) is not list or len(f[2]) > MAX_BLOCKS_PER_REPLY:
        raise MessageError("a blocks reply is [0, tip, [[block, certificate], ...]] or an error")
    blocks = []
    for i, item in enumerate(f[2]):
        if type(item) is not list or len(item) != 2:
            raise MessageError(f"blocks reply entry {i} is not [block, certificate]")
        block = _bytes(item[0], "block", limit=MAX_BLOCK_SIZE)
        blocks.append((block, _bytes(item[1], "certificate", limit=MAX_BLOCK_SIZE)))
    return _uint(f[1], "tip", 2**63), blocks
