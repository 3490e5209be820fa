"""Framing shared by every PRSM stream protocol: an unsigned varint length, then the body.

Also the one wrapper every stream handler goes through: py-libp2p stops accepting streams on a
connection whose handler let an exception escape (see PITFALLS), so :func:`guarded_handler`
turns every failure into a log line and a stream reset.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio
from libp2p.abc import INetStream
from libp2p.io.exceptions import IOException

from .logs import kv

log = logging.getLogger(__name__)

MAX_VARINT_BYTES = 10


class FrameError(Exception):
    """Raised when a peer sends a frame we refuse: too long, a bad length, or a cut-off body."""


@dataclass
class Traffic:
    """Bytes and frames through PRSM protocols, for metrics."""

    bytes_in: int = 0
    bytes_out: int = 0
    streams_open: int = 0


TRAFFIC = Traffic()


def encode_uvarint(n: int) -> bytes:
    if n < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


READ_SIZE = 64 * 1024  # asked of the stream per read: whatever has arrived, up to this
_REST: weakref.WeakKeyDictionary[INetStream, bytes] = weakref.WeakKeyDictionary()


async def _read_some(stream: INetStream, n: int, have: int) -> bytes:
    chunk = await stream.read(n)
    if not chunk:
        raise FrameError(f"stream ended after {have} bytes of a frame")
    return chunk


def _parse_length(data: bytes) -> tuple[int, int] | None:
    """The frame length varint at the start of ``data`` and its size, or None if incomplete."""
    length = 0
    for pos in range(min(len(data), MAX_VARINT_BYTES)):
        byte = data[pos]
        length |= (byte & 0x7F) << (7 * pos)
        if not byte & 0x80:
            return length, pos + 1
    if len(data) >= MAX_VARINT_BYTES:
        raise FrameError("frame length varint is longer than 10 bytes")
    return None


async def read_frame(stream: INetStream, max_size: int) -> bytes:
    """Read one length-prefixed frame; refuse a length above ``max_size`` before reading its body.

    Each read takes whatever has arrived on the stream (up to ``READ_SIZE``), so a frame that
    has arrived whole costs one read; bytes beyond it (a frame the peer sent right behind) are
    kept, per stream, for the next call. Every py-libp2p read costs Python work in the muxer
    and may send the peer a window update, so reading the length and the body separately
    doubled a small exchange's cost.

    A stream that ends before a frame starts raises libp2p's StreamEOF (py-libp2p signals a
    clean end that way); one that ends inside a frame raises FrameError.
    """
    data = _REST.pop(stream, b"")
    while (parsed := _parse_length(data)) is None:
        if not data:
            data = await _first_bytes(stream)
        else:
            data += await _read_some(stream, READ_SIZE, len(data))
    length, pos = parsed
    if length > max_size:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_size}")
    end = pos + length
    if len(data) < end:
        pieces = [data]
        have = len(data)
        while have < end:
            piece = await _read_some(stream, max(end - have, READ_SIZE), have - pos)
            pieces.append(piece)
            have += len(piece)
        data = b"".join(pieces)
    if len(data) > end:
        _REST[stream] = data[end:]
    TRAFFIC.bytes_in += end
    return data[pos:end]


async def _first_bytes(stream: INetStream) -> bytes:
    chunk = await stream.read(READ_SIZE)
    if not chunk:
        raise FrameError("stream ended")
    return chunk


async def write_frame(stream: INetStream, body: bytes) -> None:
    frame = encode_uvarint(len(body)) + body
    await stream.write(frame)
    TRAFFIC.bytes_out += len(frame)


StreamHandler = Callable[[INetStream], Awaitable[None]]


def guarded_handler(protocol: str, handler: StreamHandler) -> StreamHandler:
    """Wrap a stream handler so no exception escapes into py-libp2p, and the stream always closes."""

    async def run(stream: INetStream) -> None:
        TRAFFIC.streams_open += 1
        try:
            await handler(stream)
        except (IOException, FrameError, trio.TooSlowError) as exc:
            log.debug("stream ended with an error", extra=kv(protocol=protocol, error=repr(exc)))
            await _reset(stream)
        except Exception:
            log.exception("stream handler failed", extra=kv(protocol=protocol))
            await _reset(stream)
        else:
            try:
                await stream.close()
            except Exception:  # the peer may be gone already; nothing left to do
                pass
        finally:
            TRAFFIC.streams_open -= 1

    return run


async def _reset(stream: INetStream) -> None:
    try:
        await stream.reset()
    except Exception:  # a reset on a dead connection has nothing left to reset
        pass
