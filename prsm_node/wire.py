"""Framing shared by every PRSM stream protocol: an unsigned varint length, then the body.

Also the one wrapper every stream handler goes through: py-libp2p stops accepting streams on a
connection whose handler let an exception escape (see PITFALLS), so :func:`guarded_handler`
turns every failure into a log line and a stream reset.
"""

from __future__ import annotations

import logging
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


async def _read_exactly(stream: INetStream, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await stream.read(n - len(buf))
        if not chunk:
            raise FrameError(f"stream ended after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


async def read_frame(stream: INetStream, max_size: int) -> bytes:
    """Read one length-prefixed frame; refuse lengths above ``max_size`` before reading them.

    A stream that ends before a frame starts raises libp2p's StreamEOF (py-libp2p signals a
    clean end that way); one that ends inside a frame raises FrameError.
    """
    length = 0
    for i in range(MAX_VARINT_BYTES):
        byte = (await _read_exactly(stream, 1))[0] if i else (await _first_byte(stream))
        length |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            break
    else:
        raise FrameError("frame length varint is longer than 10 bytes")
    if length > max_size:
        raise FrameError(f"frame of {length} bytes exceeds the limit of {max_size}")
    body = await _read_exactly(stream, length)
    TRAFFIC.bytes_in += len(body) + len(encode_uvarint(length))
    return body


async def _first_byte(stream: INetStream) -> int:
    chunk = await stream.read(1)
    if not chunk:
        raise FrameError("stream ended")
    return chunk[0]


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
